"""The `der` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from der_sdk.errors import DerSdkError
from tests.e2e.conftest import INVENTORY
from tests.e2e.process_kit import started

DER = [sys.executable, "-m", "der_sdk.cli"]
EPHEMERAL = ("--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0")


def der(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DER, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def demo_once(
    *args: str, cwd: Path, data: Path | None = None, seconds: float = 1
) -> subprocess.CompletedProcess[str]:
    """``der demo ARGS`` on ephemeral ports for ``seconds``, its data in ``data`` (default
    ``cwd/data``)."""
    return der(
        "demo",
        *args,
        "--data-dir",
        str(data or cwd / "data"),
        *EPHEMERAL,
        "--duration",
        str(seconds),
        cwd=cwd,
    )


@contextlib.contextmanager
def running_demo(
    *args: str, cwd: Path, data: Path, ready: str, timeout_s: float = 30
) -> Iterator[str]:
    """``der demo ARGS`` on ephemeral ports with its data in ``data``, in a subprocess:
    yields its output once it printed ``ready``, and stops it afterwards."""
    log = data.parent / "demo.log"
    cmd = [
        *DER,
        "demo",
        *args,
        "--data-dir",
        str(data),
        *EPHEMERAL,
        "--duration",
        str(timeout_s * 2),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with started(cmd, log=log, ready=ready, cwd=cwd, env=env, timeout_s=timeout_s):
        yield log.read_text()


@pytest.mark.parametrize(
    ("example", "counts"),
    [("examples", "2 sites, 5 assets"), ("examples/mixed", "3 sites, 6 assets")],
    ids=["batteries", "mixed"],
)
def test_check_config_accepts_each_example_inventory_and_agent_config(
    repo_root: Path, example: str, counts: str
) -> None:
    result = der(
        "check-config",
        f"{example}/assets.yaml",
        "--agent-config",
        f"{example}/agent.yaml",
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr
    assert f"ok: {counts}" in result.stdout


GOOD_SITE = "11111111-1111-4111-8111-111111111111"
GOOD_ASSET = "aaaaaaaa-0000-4000-8000-000000000001"


def _asset(**fields: object) -> str:
    base: dict[str, object] = {
        "asset_id": GOOD_ASSET,
        "site_id": GOOD_SITE,
        "name": "B1",
        "capacity_mwh": 2,
        "max_mw": 1,
        "min_mw": -1,
    }
    base.update(fields)
    body = "".join(f"    {k}: {v}\n" for k, v in base.items() if v is not None)
    return "  -\n" + body


SITES = f"sites:\n  - site_id: {GOOD_SITE}\n    name: Yard\nassets:\n"


@pytest.mark.parametrize(
    ("name", "text", "line", "needle"),
    [
        ("missing-site-id", SITES + _asset(site_id=None), 6, "site_id"),
        ("duplicate-asset", SITES + _asset() + _asset(name="B2"), 13, "duplicate asset_id"),
        ("min-above-max", SITES + _asset(min_mw=2, max_mw=1), 11, "min_mw"),
        (
            "unknown-site",
            SITES + _asset(site_id="22222222-2222-4222-8222-222222222222"),
            7,
            "unknown site",
        ),
        ("bad-uuid", SITES + _asset(asset_id="not-a-uuid"), 6, "UUID"),
        (
            "unknown-asset-type",
            SITES + _asset(asset_type="hydro"),
            12,
            "bess, ev_charger, pv, wind",
        ),
    ],
)
def test_bad_inventory_exits_2_naming_file_line_and_field(
    tmp_path: Path, name: str, text: str, line: int, needle: str
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    result = der("check-config", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert f"{path}:" in result.stderr
    assert needle in result.stderr, result.stderr
    assert f":{line}:" in result.stderr, result.stderr


def test_plugins_json_lists_sim_bess_with_its_hooks() -> None:
    result = der("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    sim = [r for r in rows if r["package"] == "der-sdk-sim-bess"]
    assert sim and sim[0]["hooks"] == ["der_adapter_types"]
    assert sim[0]["provides"] == {"adapter_types": ["sim-bess"]}
    assert any(r["builtin"] and r["package"] == "der-sdk" for r in rows)


@pytest.mark.parametrize(
    "command",
    ["headend", "agent", "launch", "plugins", "check-config", "demo"],
)
def test_every_command_has_help(command: str) -> None:
    result = der(command, "--help")
    assert result.returncode == 0 and "usage: der" in result.stdout


def test_headend_without_inventory_says_what_to_set(tmp_path: Path) -> None:
    result = subprocess.run(
        [*DER, "headend"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "ASSETS_PATH" in result.stderr and "Traceback" not in result.stderr


def test_agent_with_unknown_asset_exits_2(tmp_path: Path) -> None:
    (tmp_path / "assets.yaml").write_text(INVENTORY)
    result = subprocess.run(
        [
            *DER,
            "agent",
            "--assets",
            "assets.yaml",
            "--asset-id",
            "cccccccc-0000-4000-8000-000000000009",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "cccccccc-0000-4000-8000-000000000009" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_headend_and_gateway_agents_and_prints_what_to_try(
    repo_root: Path, tmp_path: Path
) -> None:
    result = demo_once(
        "--assets", str(repo_root / "examples" / "assets.yaml"), cwd=tmp_path, seconds=2
    )
    assert result.returncode == 0, result.stderr
    assert "REST API     http://127.0.0.1:" in result.stdout
    assert "curl -X POST" in result.stdout
    assert (tmp_path / "data" / "der.db").exists()


SUNFIELD = "3b8f6a52-1c4e-4f0a-9d7b-5e2c8a1f6d30"  # examples/mixed: the PV + battery site
NORTH_YARD = "ed7332b8-d686-44d3-938c-9ddfd76b4791"  # examples/assets.yaml


def test_demo_runs_the_mixed_fleet_by_default_with_each_types_control(
    repo_root: Path, tmp_path: Path
) -> None:
    import httpx

    # from the repository root, where the examples are found
    with running_demo(cwd=repo_root, data=tmp_path / "data", ready="Try:") as text:
        url = re.search(r"REST API\s+(http://127\.0\.0\.1:\d+)", text)
        assert url, text
        assert f'"site_id": "{SUNFIELD}", "mw": 3.0' in text, "the banner's site is Sunfield"
        assert '"policy": "headroom"' in text
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=url[1], timeout=5) as http:
            while True:
                rows = http.get("/assets").json()
                bases = [r["control"]["basis"] for r in rows]
                if not any(b.startswith("no telemetry") for b in bases):
                    break  # every asset has reported
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
    assert len(rows) == 6
    assert {r["asset_type"]: r["control"]["kind"] for r in rows} == {
        "bess": "setpoint",
        "pv": "export_limit",
        "wind": "export_limit",
        "ev_charger": "import_limit",
    }


def test_demo_example_batteries_runs_the_battery_fleet_from_any_folder(tmp_path: Path) -> None:
    result = demo_once("--example", "batteries", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f'"site_id": "{NORTH_YARD}"' in result.stdout
    assert SUNFIELD not in result.stdout
    assert (tmp_path / "data" / "der.db").exists()


def test_demo_refuses_an_example_and_an_inventory_together(repo_root: Path) -> None:
    result = der("demo", "--example", "batteries", "--assets", "examples/assets.yaml")
    assert result.returncode == 2
    assert "--assets: not allowed with argument --example" in result.stderr


def test_demo_names_an_inventory_path_that_does_not_exist(tmp_path: Path) -> None:
    result = der("demo", "--assets", "nowhere/assets.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "--assets nowhere/assets.yaml: demo inventory not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_without_the_simulator_plugins_names_them_before_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [*DER, "demo", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "DER_SDK_DISABLE_PLUGINS": "der-sdk-sim-plant"},
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "unknown adapter 'sim-pv'" in result.stderr
    assert "pip install 'der-sdk[demo]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists(), "nothing started"


def test_demo_examples_are_found_in_the_repository_without_the_package_link(
    tmp_path: Path,
) -> None:
    from der_sdk_headend.demo import EXAMPLES, example_file

    # a checkout where git made no symbolic link: the package folder has no examples/
    package = tmp_path / "der_sdk_headend"
    package.mkdir()
    (tmp_path / "examples" / "mixed").mkdir(parents=True)
    (tmp_path / "examples" / "mixed" / "assets.yaml").write_text("sites: []\n")
    found = example_file(EXAMPLES["mixed"].assets, package_dir=package)
    assert found == tmp_path / "examples" / "mixed" / "assets.yaml"
    with pytest.raises(DerSdkError, match=r"demo example file agent\.yaml not found"):
        example_file(EXAMPLES["batteries"].config, package_dir=package)


def test_headend_stops_on_sigterm_while_it_waits_for_unreachable_storage(tmp_path: Path) -> None:
    pytest.importorskip("der_sdk_postgres", reason="needs the der-sdk-postgres plugin")
    import os
    import signal
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(INVENTORY)
    env = {
        **os.environ,
        "ASSETS_PATH": str(inventory),
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{dead_port}/nothing",
        "HEADEND_GRPC_ADDR": "127.0.0.1:0",
        "HEADEND_HTTP_ADDR": "127.0.0.1:0",
    }
    log = tmp_path / "headend.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*DER, "headend"], env=env, stdout=out, stderr=out, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 30
            while "not available (attempt 1)" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 0, text
    assert "stop signal received while starting" in text
    assert "Traceback" not in text


def test_demo_with_tls_serves_mutual_tls_agents_https_and_requires_a_token(
    repo_root: Path, tmp_path: Path
) -> None:
    import ssl

    import httpx

    data = tmp_path / "data"
    inventory = str(repo_root / "examples" / "assets.yaml")
    with running_demo(
        "--tls", "--assets", inventory, cwd=tmp_path, data=data, ready="export DER_TOKEN="
    ) as text:
        deadline = time.monotonic() + 30
        url = re.search(r"REST API\s+(https://127\.0\.0\.1:\d+)", text)
        token = re.search(r"export DER_TOKEN=(\S+)", text)
        assert url and token, text
        ca = data / "demo-tls" / "ca.pem"
        verify = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(base_url=url[1], verify=verify, timeout=5) as http:
            assert http.get("/agents").status_code == 401
            auth = {"Authorization": f"Bearer {token[1]}"}
            while True:
                rows = http.get("/agents", headers=auth).json()
                if rows and all(r["connected"] for r in rows):
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
            assert http.get("/healthz").status_code == 200
    log = tmp_path / "demo.log"
    bound = (data / "demo-tls" / "assets.yaml").read_text()
    assert bound.count("fingerprint: sha256:") == 2, "each site binds its agent certificate"
    assert token[1] not in log.read_text().replace(f"export DER_TOKEN={token[1]}", ""), (
        "the token is printed once, in the banner, and never logged"
    )


def test_launch_reads_the_agent_tls_settings_and_names_a_missing_file(
    repo_root: Path, tmp_path: Path
) -> None:
    import os

    result = subprocess.run(
        [
            *DER,
            "launch",
            "--assets",
            str(repo_root / "examples" / "assets.yaml"),
            "--duration",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "AGENT_TLS_CA": str(tmp_path / "missing-ca.pem")},
    )
    assert result.returncode == 2, result.stderr
    assert "AGENT_TLS_CA=" in result.stderr and "missing-ca.pem: file not found" in result.stderr
