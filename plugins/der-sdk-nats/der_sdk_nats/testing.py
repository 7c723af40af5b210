"""Test helpers: where the test NATS server is, and a skip (or failure) without it.

``DER_SDK_TEST_NATS_URL`` names the server (default ``nats://127.0.0.1:4222``); it must run
JetStream. :func:`require_nats` gates on :func:`der_sdk.testing.services.require_tcp_service`,
so a test skips with a reason when the server is not there and fails under
``DER_SDK_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os

from der_sdk.testing.services import require_tcp_service
from der_sdk_nats.settings import DEFAULT_PORT, NatsSettings

__all__ = ["NATS_URL_VARIABLE", "nats_url", "require_nats"]

NATS_URL_VARIABLE = "DER_SDK_TEST_NATS_URL"
DEFAULT_NATS_URL = f"nats://127.0.0.1:{DEFAULT_PORT}"


def nats_url() -> str:
    """The URL of the test NATS server."""
    return os.environ.get(NATS_URL_VARIABLE, "").strip() or DEFAULT_NATS_URL


def require_nats() -> str:
    """Skip (or fail, when services are required) unless NATS accepts connections; return
    its URL."""
    url = nats_url()
    host, _, port = NatsSettings.from_url(url).servers[0].removeprefix("nats://").rpartition(":")
    require_tcp_service("NATS", host, int(port))
    return url
