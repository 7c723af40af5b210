"""Secure defaults: plaintext only on loopback, unless the operator says --insecure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from headend_kit import make_config

from der_sdk.errors import DerSdkError
from der_sdk.plugins import Plugins
from der_sdk_headend.config import HeadendConfig
from der_sdk_headend.service import Headend, check_exposure, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("headend.example.com", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_defaults_bind_to_loopback(inventory_path: Path) -> None:
    config = HeadendConfig.from_env({"ASSETS_PATH": str(inventory_path)})
    assert config.grpc_addr.startswith("127.0.0.1:")
    assert config.http_addr.startswith("127.0.0.1:")
    check_exposure(config)  # no error, no TLS needed


@pytest.mark.parametrize("variable", ["HEADEND_GRPC_ADDR", "HEADEND_HTTP_ADDR"])
async def test_a_non_loopback_address_without_tls_is_refused_at_start(
    inventory_path: Path, plugins: Plugins, variable: str
) -> None:
    headend = Headend(make_config(inventory_path, **{variable: "0.0.0.0:0"}), plugins=plugins)
    with pytest.raises(DerSdkError) as caught:
        await headend.start()
    message = str(caught.value)
    assert variable in message
    assert "HEADEND_TLS_CERT" in message and "--insecure" in message
    await headend.stop()


async def test_insecure_serves_plaintext_beyond_loopback_and_says_so_loudly(
    inventory_path: Path, plugins: Plugins, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(inventory_path, HEADEND_GRPC_ADDR="0.0.0.0:0", HEADEND_INSECURE="1")
    headend = Headend(config, plugins=plugins)
    await headend.start()
    try:
        assert headend.grpc_port > 0
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert any("INSECURE" in r.getMessage() for r in warnings)
    finally:
        await headend.stop()


def test_der_headend_refuses_a_public_address_without_tls_with_exit_2(
    inventory_path: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "der_sdk.cli",
            "headend",
            "--assets",
            str(inventory_path),
            "--database-url",
            "memory://",
            "--grpc-addr",
            "0.0.0.0:0",
            "--http-addr",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "HEADEND_GRPC_ADDR=0.0.0.0:0 is not a loopback address" in result.stderr
    assert "Traceback" not in result.stderr
