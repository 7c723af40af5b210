"""Firing the observer hooks (``der_telemetry_received``, ``der_dispatch_validated``...)."""

from __future__ import annotations

from der_sdk.plugins import Plugins

__all__ = ["notify"]


def notify(plugins: Plugins, hook_name: str, **kwargs: object) -> None:
    """Call every implementation of observer hook ``hook_name``, each on its own.

    A failing observer is logged with its plugin and package and the others are still
    called (:meth:`der_sdk.plugins.Plugins.notify`): an exporter or guardrail plugin must
    not stop telemetry ingest or dispatch.
    """
    plugins.notify(hook_name, **kwargs)
