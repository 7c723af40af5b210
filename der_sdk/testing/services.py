"""External services in tests: skip with a reason when unreachable, fail when required.

``DER_SDK_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns every such skip into a failure, so
CI cannot go green by skipping the PostgreSQL or NATS tests.
"""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest

__all__ = ["require_tcp_service", "service_missing", "services_required"]


def services_required() -> bool:
    """Whether ``DER_SDK_REQUIRE_SERVICES`` asks for every external service to be present."""
    return os.environ.get("DER_SDK_REQUIRE_SERVICES", "").strip().lower() in {"1", "true", "yes"}


def require_tcp_service(name: str, host: str, port: int, *, timeout_s: float = 1.0) -> None:
    """Skip the calling test (or fail it, when services are required) unless ``host:port``
    accepts a TCP connection.

    :param name: what the service is, for the message ("PostgreSQL").
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        service_missing(f"{name} is not reachable at {host}:{port} ({exc})")


def service_missing(reason: str) -> NoReturn:
    """Skip the calling test because an external service or tool is missing (``reason``
    says which and how to get it), or fail it when services are required."""
    if services_required():
        pytest.fail(f"{reason}; DER_SDK_REQUIRE_SERVICES=1 requires it", pytrace=False)
    pytest.skip(f"{reason}; set DER_SDK_REQUIRE_SERVICES=1 to make this a failure")
