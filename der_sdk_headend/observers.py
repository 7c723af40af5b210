"""Firing the observer hooks (``der_telemetry_received``, ``der_dispatch_validated``...)."""

from __future__ import annotations

import logging

from der_sdk.plugins import Plugins

__all__ = ["notify"]

log = logging.getLogger("der.headend.observers")


def notify(plugins: Plugins, hook_name: str, **kwargs: object) -> None:
    """Call every implementation of observer hook ``hook_name``.

    A failing observer is logged with the hook's name and otherwise ignored: an exporter
    or guardrail plugin must not stop telemetry ingest or dispatch.
    """
    try:
        getattr(plugins.hook, hook_name)(**kwargs)
    except Exception:
        log.exception("observer hook %s raised; the headend carries on without it", hook_name)
