"""``der commission``: a good site passes with each device's values and quality; each kind
of failure (unreachable device, wrong register map, missing SunSpec model, unreachable
headend, a certificate the headend refuses, an asset an inventory does not know) fails its
asset or check with one line saying what and what to fix; the headend probe opens no
session and leaves a running agent alone. Real headend over real gRPC, real Modbus and
OPC UA simulators, the sim plugins."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from der_sdk import certs
from der_sdk.cli import main
from der_sdk.plugins import Plugins
from der_sdk.testing import certs as bad_certs
from der_sdk.testing import free_port, wait_until
from der_sdk_agent.commission import AssetReport, CommissionReport, commission, render_text
from der_sdk_headend import Headend
from der_sdk_headend.testing import headend_config
from tests.agent.conftest import A1, A2, SITE, MakeAgent, fast_config
from tests.agent.conftest import site_inventory as inventory
from tests.agent.fake_headend import FakeHeadend

PV = "00000000-0000-4000-8000-000000000003"
STRANGER = "00000000-0000-4000-8000-0000000000aa"


PV_ASSET = (
    f"  - {{asset_id: {PV}, site_id: {SITE}, name: PV 1, asset_type: pv, max_mw: 5, min_mw: 0}}\n"
)

StartHeadend = Callable[..., Awaitable[Headend]]


@pytest.fixture
async def start_headend(tmp_path: Path, plugins: Plugins) -> AsyncIterator[StartHeadend]:
    """A real headend on memory storage and free ports, serving ``assets_yaml``."""
    started: list[Headend] = []

    async def start(assets_yaml: str, **env: str) -> Headend:
        folder = tmp_path / f"headend-{len(started)}"
        folder.mkdir()
        (folder / "assets.yaml").write_text(assets_yaml)
        config = headend_config(folder / "assets.yaml", {"HEADEND_AUTH": "off", **env})
        headend = Headend(config, plugins=plugins)
        await headend.start()
        started.append(headend)
        return headend

    yield start
    for headend in started:
        await headend.stop()


def site_env(tmp_path: Path, headend: str, assets_yaml: str, config_yaml: str) -> dict[str, str]:
    """The environment der agent would get at the site: its own inventory and config."""
    (tmp_path / "assets.yaml").write_text(assets_yaml)
    (tmp_path / "agent.yaml").write_text(config_yaml)
    return {
        "ASSETS_PATH": str(tmp_path / "assets.yaml"),
        "AGENT_CONFIG": str(tmp_path / "agent.yaml"),
        "GATEWAY_SITE_ID": SITE,
        "HEADEND_GRPC": headend,
    }


def row(report: CommissionReport, asset_id: str) -> AssetReport:
    return next(r for r in report.assets if r.asset_id == asset_id)


def check(report_or_row: CommissionReport | AssetReport, name: str) -> tuple[str, str, str]:
    c = next(c for c in report_or_row.checks if c.name == name)
    return c.result, c.detail, c.fix or ""


SIM_CONFIG = f"""\
default_adapter: sim-bess
assets:
  {A1}: {{adapter: sim-bess, options: {{initial_soc_pct: 40}}}}
  {PV}: {{adapter: sim-pv}}
"""


# ----------------------------------------------------------------------------- good site


async def test_a_good_site_passes_with_every_devices_values_and_quality(
    tmp_path: Path, plugins: Plugins, start_headend: StartHeadend
) -> None:
    assets = inventory(extra=PV_ASSET)
    headend = await start_headend(assets)
    env = site_env(tmp_path, f"127.0.0.1:{headend.grpc_port}", assets, SIM_CONFIG)

    report = await commission(env, plugins)

    assert report.ok, render_text(report)
    assert [r.result for r in report.assets] == ["pass", "pass", "pass"]
    bess = row(report, A1)
    assert bess.adapter == "sim-bess" and bess.package == "der-sdk-sim-bess"
    assert bess.reading is not None and bess.reading.quality == "good"
    assert bess.reading.details["soc_pct"] == pytest.approx(40, abs=1)
    assert row(report, PV).adapter == "sim-pv" and row(report, PV).reading is not None
    assert check(report, f"headend 127.0.0.1:{headend.grpc_port}")[0] == "pass"
    text = render_text(report)
    assert "RESULT: PASS (3 asset(s) ready)" in text and "soc_pct=40" in text


async def test_the_probe_opens_no_session_and_leaves_the_running_agent_alone(
    tmp_path: Path, plugins: Plugins, start_headend: StartHeadend, make_agent: MakeAgent
) -> None:
    assets = inventory()
    headend = await start_headend(assets)
    address = f"127.0.0.1:{headend.grpc_port}"
    env = site_env(tmp_path, address, assets, "default_adapter: sim-bess\n")

    report = await commission(env, plugins)
    assert report.ok, render_text(report)
    assert headend.presence.connected_asset_ids() == []
    assert await headend.storage.events(kind="registration_refused") == []

    agent = make_agent(address, config=fast_config(default_adapter="sim-bess"))
    await agent.start()
    await wait_until(lambda: _connected(agent), "the production agent to register")
    report = await commission(env, plugins)
    assert report.ok, render_text(report)
    stats = agent.stats()
    assert stats.connected and stats.reconnects == 0 and stats.failed_attempts == 0
    assert sorted(headend.presence.connected_asset_ids()) == [A1, A2]


async def _connected(agent: object) -> bool:
    return bool(agent.stats().connected)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- devices


async def test_modbus_and_opcua_simulators_pass_and_a_dead_device_fails_with_one_line(
    tmp_path: Path, plugins: Plugins, start_headend: StartHeadend
) -> None:
    from der_sdk_modbus.simulator import ModbusSimServer, SimulatedDevice
    from der_sdk_opcua.simulator import BessSimulator

    profile = plugins.device_profiles.get("example-bess-inverter")
    dead = free_port()
    async with (
        ModbusSimServer(SimulatedDevice([profile], ramp_s=0, seed=1)) as modbus,
        BessSimulator(endpoint="opc.tcp://127.0.0.1:0/der-sim/", soc_pct=60) as opcua,
    ):
        assets = inventory(extra=PV_ASSET.replace("PV 1", "BESS 3").replace("pv", "bess"))
        headend = await start_headend(assets)
        config = f"""\
assets:
  {A1}:
    adapter: modbus
    options: {{host: 127.0.0.1, port: {modbus.port}, profile: example-bess-inverter,
               timeout_s: 0.5}}
  {A2}:
    adapter: opcua
    options: {{endpoint: "{opcua.endpoint_url}", profile: der-sim-bess-opcua,
               security_policy: "None", allow_insecure: true}}
  {PV}:
    adapter: modbus
    options: {{host: 127.0.0.1, port: {dead}, profile: example-bess-inverter, timeout_s: 0.5}}
"""
        env = site_env(tmp_path, f"127.0.0.1:{headend.grpc_port}", assets, config)
        report = await commission(env, plugins, read_timeout_s=5)

    assert not report.ok
    assert row(report, A1).result == "pass", render_text(report)
    result, detail, _ = check(row(report, A1), "plugin")
    assert "device profile example-bess-inverter 1.0.0 (der-sdk-example-pack)" in detail
    opcua_row = row(report, A2)
    assert opcua_row.result == "pass", render_text(report)
    assert opcua_row.reading is not None
    assert opcua_row.reading.details["soc_pct"] == pytest.approx(60, abs=1)
    result, detail, fix = check(row(report, PV), "device")
    assert result == "fail" and "\n" not in detail and f"127.0.0.1:{dead}" in detail
    assert "not reachable" in fix and "host and port" in fix
    assert row(report, PV).result == "fail"
    assert "RESULT: FAIL (1 of 3 asset(s)" in render_text(report)


async def test_a_wrong_register_map_names_the_illegal_address_and_says_to_check_the_profile(
    tmp_path: Path, plugins: Plugins, start_headend: StartHeadend
) -> None:
    from der_sdk_modbus.simulator import ModbusSimServer, SimulatedDevice

    meter = plugins.device_profiles.get("example-meter")
    sunspec_battery_only = [plugins.device_profiles.get("sunspec-802")]
    async with (
        ModbusSimServer(SimulatedDevice([meter], strict=True)) as wrong_map,
        ModbusSimServer(SimulatedDevice(sunspec_battery_only, seed=2)) as no_inverter_model,
    ):
        assets = inventory()
        headend = await start_headend(assets)
        config = f"""\
assets:
  {A1}:
    adapter: modbus
    options: {{host: 127.0.0.1, port: {wrong_map.port}, profile: example-bess-inverter}}
  {A2}:
    adapter: modbus
    options: {{host: 127.0.0.1, port: {no_inverter_model.port}, sunspec_scan: true}}
"""
        env = site_env(tmp_path, f"127.0.0.1:{headend.grpc_port}", assets, config)
        report = await commission(env, plugins, read_timeout_s=5)

    result, detail, fix = check(row(report, A1), "device")
    assert result == "fail" and "illegal data address" in detail, detail
    assert "register or node map does not match" in fix and "profile" in fix
    result, detail, fix = check(row(report, A2), "device")
    assert result == "fail" and "802" in detail and "mw" in detail, detail
    assert "register or node map does not match" in fix
    assert check(row(report, A1), "headend")[0] == "pass"  # the headend side is fine


async def test_an_adapter_or_profile_that_is_not_installed_fails_its_asset_only(
    tmp_path: Path, plugins: Plugins, start_headend: StartHeadend
) -> None:
    assets = inventory()
    headend = await start_headend(assets)
    config = f"""\
default_adapter: sim-bess
assets:
  {A1}: {{adapter: modbus, options: {{host: 127.0.0.1, profile: no-such-profile}}}}
  {A2}: {{adapter: no-such-adapter}}
"""
    env = site_env(tmp_path, f"127.0.0.1:{headend.grpc_port}", assets, config)
    report = await commission(env, plugins)
    result, detail, _ = check(row(report, A1), "plugin")
    assert result == "fail" and "no-such-profile" in detail
    result, detail, fix = check(row(report, A2), "plugin")
    assert result == "fail" and "unknown adapter 'no-such-adapter'" in detail
    assert "agent.yaml:" in detail and "der plugins" in fix
    assert check(report, "agent config")[0] == "pass"


# ----------------------------------------------------------------------------- headend


async def test_an_unreachable_headend_fails_every_asset_with_what_to_check(
    tmp_path: Path, plugins: Plugins
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = site_env(tmp_path, address, inventory(), "default_adapter: sim-bess\n")
    report = await commission(env, plugins, probe_timeout_s=5)
    result, detail, fix = check(report, f"headend {address}")
    assert result == "fail" and detail.startswith("UNAVAILABLE")
    assert "HEADEND_GRPC" in fix and "firewall" in fix
    assert [check(r, "device")[0] for r in report.assets] == ["pass", "pass"]
    assert [check(r, "headend")[0] for r in report.assets] == ["fail", "fail"]


async def test_assets_the_inventories_do_not_know_are_named_with_the_fix(
    tmp_path: Path, plugins: Plugins, start_headend: StartHeadend
) -> None:
    headend = await start_headend(inventory())  # the headend does not know the PV asset
    address = f"127.0.0.1:{headend.grpc_port}"
    env = site_env(tmp_path, address, inventory(extra=PV_ASSET), SIM_CONFIG)
    report = await commission(env, plugins)
    result, detail, fix = check(row(report, PV), "headend")
    assert result == "fail" and detail == f"{address}: not in the inventory"
    assert "add the asset to the headend's inventory" in fix
    assert row(report, A1).result == "pass" and not report.ok
    assert await headend.storage.events(kind="registration_refused") == []

    env["ASSET_ID"], env["GATEWAY_SITE_ID"] = STRANGER, ""
    report = await commission(env, plugins)
    result, detail, fix = check(report, "inventory")
    assert result == "fail" and f"ASSET_ID {STRANGER} is not in the inventory" in detail
    assert "add the asset" in fix and report.assets == [] and not report.ok


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    certs.init_ca(folder)
    certs.issue_headend(folder, ["localhost", "127.0.0.1"])
    certs.issue_agent(folder, SITE, agent_id="gateway-test")
    certs.issue_agent(folder, SITE, agent_id="unbound")
    return folder


async def test_mutual_tls_passes_and_certificates_the_headend_refuses_are_explained(
    tmp_path: Path, pki: Path, plugins: Plugins, start_headend: StartHeadend
) -> None:
    good = pki / "agent-gateway-test.pem"
    headend = await start_headend(
        inventory(f"fingerprint: {certs.fingerprint(good.read_bytes())}"),
        HEADEND_TLS_CERT=str(pki / "headend.pem"),
        HEADEND_TLS_KEY=str(pki / "headend.key"),
        HEADEND_CLIENT_CA=str(pki / "ca.pem"),
    )
    address = f"127.0.0.1:{headend.grpc_port}"
    env = site_env(tmp_path, address, inventory(), "default_adapter: sim-bess\n")
    env["AGENT_TLS_CA"] = str(pki / "ca.pem")

    def with_cert(cert: Path, key: Path) -> dict[str, str]:
        return {**env, "AGENT_TLS_CERT": str(cert), "AGENT_TLS_KEY": str(key)}

    report = await commission(with_cert(good, pki / "agent-gateway-test.key"), plugins)
    assert report.ok, render_text(report)
    assert "client certificate sha256:" in check(report, "link security")[1]

    unbound = with_cert(pki / "agent-unbound.pem", pki / "agent-unbound.key")
    report = await commission(unbound, plugins)
    result, detail, fix = check(report, f"headend {address}")
    assert result == "fail" and detail.startswith("PERMISSION_DENIED"), detail
    assert "is not bound to site" in detail and "der certs issue-agent" in fix
    audits = await headend.storage.events(kind="audit")
    refused = [a for a in audits if a.data["action"] == "agent.refused"]
    assert refused and "(commissioning probe) refused" in refused[-1].message

    other = bad_certs.agent_from_other_ca(tmp_path, SITE)
    report = await commission(with_cert(other.cert_path, other.key_path), plugins)
    result, detail, fix = check(report, f"headend {address}")
    assert result == "fail" and detail.startswith("UNAVAILABLE"), detail
    assert "does not trust the client certificate" in fix and "HEADEND_CLIENT_CA" in fix
    assert [r.result for r in report.assets] == ["fail", "fail"]


# ----------------------------------------------------------------------------- the command


async def test_der_commission_prints_the_table_or_json_and_exits_1_on_a_failure(
    tmp_path: Path, start_headend: StartHeadend, capsys: pytest.CaptureFixture[str]
) -> None:
    headend = await start_headend(inventory())
    address = f"127.0.0.1:{headend.grpc_port}"
    site_env(tmp_path, address, inventory(extra=PV_ASSET), SIM_CONFIG)
    flags = [
        "--assets", str(tmp_path / "assets.yaml"), "--config", str(tmp_path / "agent.yaml"),
        "--site-id", SITE, "--headend", address,
    ]  # fmt: skip

    import asyncio

    code = await asyncio.to_thread(main, ["commission", *flags])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert "asset" in out and "plugin" in out and "device" in out and "headend" in out
    assert f"FAIL asset {PV} (PV 1) headend: {address}: not in the inventory" in out
    assert "fix: add the asset to the headend's inventory" in out

    code = await asyncio.to_thread(main, ["commission", "--json", *flags])
    document = json.loads(capsys.readouterr().out)
    assert code == 1 and document["ok"] is False
    assert {a["asset_id"]: a["result"] for a in document["assets"]} == {
        A1: "pass",
        A2: "pass",
        PV: "fail",
    }
    assert document["assets"][0]["reading"]["quality"] == "good"


async def test_a_headend_that_predates_probes_is_reported_as_a_warning(
    tmp_path: Path, plugins: Plugins
) -> None:
    async with FakeHeadend() as older:  # answers every Register for real, probe or not
        env = site_env(tmp_path, older.address, inventory(), "default_adapter: sim-bess\n")
        report = await commission(env, plugins)
        await wait_until(lambda: _all_closed(older), "the prober to close the stream")
    result, detail, fix = check(report, f"headend {older.address}")
    assert result == "warn" and "does not know probes" in detail and "upgrade" in fix
    assert report.ok  # the assets were accepted; the warning says what it cost
    assert [check(r, "headend")[0] for r in report.assets] == ["pass", "pass"]


async def _all_closed(headend: FakeHeadend) -> bool:
    return all(stream.closed for stream in headend.streams)


async def test_settings_without_a_mode_fail_the_settings_check(
    tmp_path: Path, plugins: Plugins
) -> None:
    env = site_env(tmp_path, "127.0.0.1:1", inventory(), "default_adapter: sim-bess\n")
    del env["GATEWAY_SITE_ID"]
    report = await commission(env, plugins)
    result, detail, _ = check(report, "settings")
    assert result == "fail" and "no agent mode" in detail and not report.ok
    assert "RESULT: FAIL (0 of 0 asset(s), 1 site check(s) failed)" in render_text(report)


def test_a_timeout_that_is_not_a_positive_number_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["commission", "--site-id", SITE, "--timeout", "0"])
    assert exited.value.code == 2
    assert "--timeout: must be a positive number of seconds" in capsys.readouterr().err
