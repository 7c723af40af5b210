"""der-sdk reference headend: REST (Litestar on uvicorn) for operators, gRPC for agents.

The layout follows the flow: :mod:`~der_sdk_headend.link` (the agents' gRPC stream),
:mod:`~der_sdk_headend.presence` (which stream serves which asset),
:mod:`~der_sdk_headend.ingest` (telemetry), :mod:`~der_sdk_headend.dispatch` (commands),
:mod:`~der_sdk_headend.rest` (the HTTP API), assembled by :mod:`~der_sdk_headend.service`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from der_sdk.lazy_exports import lazy_getattr

if TYPE_CHECKING:
    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import Headend, run_headend

__all__ = ["Headend", "HeadendConfig", "run_headend"]

# Imported on first use: the ``der`` command loads this package's command plugin
# (:mod:`der_sdk_headend.commands`) on every run, and must not start Litestar and gRPC.
_EXPORTS = {"Headend": "service", "HeadendConfig": "config", "run_headend": "service"}


__getattr__ = lazy_getattr(__name__, _EXPORTS)
