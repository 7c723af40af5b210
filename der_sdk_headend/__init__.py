"""der-sdk reference headend: REST (Litestar on uvicorn) for operators, gRPC for agents.

The layout follows the flow: :mod:`~der_sdk_headend.link` (the agents' gRPC stream),
:mod:`~der_sdk_headend.presence` (which stream serves which asset),
:mod:`~der_sdk_headend.ingest` (telemetry), :mod:`~der_sdk_headend.dispatch` (commands),
:mod:`~der_sdk_headend.rest` (the HTTP API), assembled by :mod:`~der_sdk_headend.service`.
"""

from der_sdk_headend.config import HeadendConfig
from der_sdk_headend.service import Headend, run_headend

__all__ = ["Headend", "HeadendConfig", "run_headend"]
