"""The external-service gate: skip with a reason, or fail when services are required."""

from __future__ import annotations

import socket

import pytest

from der_sdk.testing.services import require_tcp_service


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_service_skips_with_its_name_and_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DER_SDK_REQUIRE_SERVICES", raising=False)
    port = _closed_port()
    with pytest.raises(
        pytest.skip.Exception, match=rf"Widget DB is not reachable at 127.0.0.1:{port}"
    ):
        require_tcp_service("Widget DB", "127.0.0.1", port)


def test_unreachable_service_fails_when_services_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DER_SDK_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="DER_SDK_REQUIRE_SERVICES=1 requires it"):
        require_tcp_service("Widget DB", "127.0.0.1", _closed_port())


def test_reachable_service_passes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        require_tcp_service("listener", "127.0.0.1", server.getsockname()[1])
