"""The ``opcua`` adapter against the simulated OPC UA battery: node maps, security,
subscriptions and polling, setpoints, quality on bad status and disconnects, reconnects,
``telemetry_write_sim``."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from asyncua import ua
from der_sdk_opcua.adapter import OpcuaAdapter, OpcuaAdapterOptions
from der_sdk_opcua.simulator import SIM_PROFILE_NAME, BessSimulator, sim_node_id
from opcua_kit import Pki, SimulatorThread, eventually

from der_sdk import load_plugins
from der_sdk.errors import DerSdkError
from der_sdk.extensions import AdapterContext
from der_sdk.models import Asset, TelemetrySample
from der_sdk_agent.adapters import AdapterRuntime, convert_options

ASSET = Asset(
    asset_id="aaaaaaaa-0000-4000-8000-0000000000a1",
    site_id="11111111-1111-4111-8111-111111111111",
    name="OPC BESS",
    capacity_mwh=4.0,
    max_mw=2.0,
    min_mw=-2.0,
)


def profiles() -> dict[str, Any]:
    return {p.name: p for p in load_plugins().device_profiles}


def make_adapter(endpoint: str, **options: Any) -> OpcuaAdapter:
    raw = {"endpoint": endpoint, "profile": SIM_PROFILE_NAME, **options}
    if "security_policy" not in raw and "certificate" not in raw:
        raw.update(security_policy="None", allow_insecure=True)
    opts = convert_options(raw, OpcuaAdapterOptions, what="test")
    return OpcuaAdapter(AdapterContext(asset=ASSET, options=opts, profiles=profiles()))


def runtime(adapter: OpcuaAdapter, timeout_s: float = 5.0) -> AdapterRuntime:
    return AdapterRuntime(
        asset=ASSET,
        adapter=adapter,
        adapter_name="opcua",
        package="der-sdk-opcua",
        timeout_s=timeout_s,
    )


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"security_policy": "None"}, "allow_insecure: true"),
        ({}, "options.certificate and options.private_key are required"),
        (
            {"security_policy": "None", "allow_insecure": True, "nodes": {"ns=2;x=1": "mw"}},
            "is not an OPC UA node id",
        ),
        (
            {"security_policy": "None", "allow_insecure": True, "nodes": {"ns=2;s=P": "power"}},
            "unknown telemetry field 'power'",
        ),
        (
            {"security_policy": "None", "allow_insecure": True, "profile": None},
            "no node feeds 'mw'",
        ),
        (
            {"security_policy": "None", "allow_insecure": True, "profile": "nope"},
            "no device profile 'nope'",
        ),
        (
            {
                "security_policy": "None",
                "allow_insecure": True,
                "profile": None,
                "nodes": {"ns=2;s=A": "mw", "ns=2;s=B": "mw"},
            },
            "several nodes feed mw",
        ),
    ],
)
def test_bad_options_are_refused_with_a_reason(options: dict[str, Any], message: str) -> None:
    raw = {"endpoint": "opc.tcp://127.0.0.1:4840/", "profile": SIM_PROFILE_NAME, **options}
    opts = msgspec.convert(raw, OpcuaAdapterOptions)
    with pytest.raises(DerSdkError, match=message):
        OpcuaAdapter(AdapterContext(asset=ASSET, options=opts, profiles=profiles()))


def test_unknown_option_names_the_field() -> None:
    with pytest.raises(DerSdkError, match="endpiont"):
        convert_options({"endpiont": "x"}, OpcuaAdapterOptions, what="asset a1 adapter 'opcua'")


def test_a_missing_certificate_file_is_named(tmp_path: Path) -> None:
    opts = msgspec.convert(
        {
            "endpoint": "opc.tcp://127.0.0.1:4840/",
            "profile": SIM_PROFILE_NAME,
            "certificate": str(tmp_path / "nope.der"),
            "private_key": str(tmp_path / "nope.pem"),
        },
        OpcuaAdapterOptions,
    )
    with pytest.raises(DerSdkError, match=r"options.certificate .*nope.der: cannot read"):
        OpcuaAdapter(AdapterContext(asset=ASSET, options=opts, profiles=profiles()))


def test_options_node_map_wins_over_the_profile_and_adds_details() -> None:
    adapter = make_adapter(
        "opc.tcp://127.0.0.1:4840/",
        nodes={sim_node_id("SocPct"): "details.state_of_charge", "ns=2;s=Extra": "details.x"},
    )
    fields = {p.node_id: p.field for p in adapter.points}
    assert fields[sim_node_id("SocPct")] == "details.state_of_charge"
    assert fields["ns=2;s=Extra"] == "details.x"
    assert fields[sim_node_id("ActivePowerMW")] == "mw"
    assert adapter.setpoint is not None and adapter.setpoint.node_id == sim_node_id("SetpointMW")


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("subscribe", [False, True], ids=["polling", "subscription"])
async def test_reads_the_device_and_writes_its_setpoint(
    device: SimulatorThread, subscribe: bool
) -> None:
    adapter = make_adapter(device.endpoint_url, subscribe=subscribe, publishing_interval_ms=50)
    rt = runtime(adapter)
    try:
        assert await rt.connect()
        sample = await rt.read()
        assert sample.quality == "good", sample.quality_reason
        assert sample.asset_id == ASSET.asset_id
        assert sample.details["soc_pct"] == pytest.approx(50.0, abs=1)
        assert sample.details["soh_pct"] == 100.0
        assert sample.online is True and sample.status == "idle"
        if subscribe:
            await eventually(_async(lambda: adapter.subscribed), what="subscription values")

        result = await rt.apply_setpoint(1.5)
        assert result.status == "applied" and result.applied_mw == 1.5

        async def discharging() -> TelemetrySample | None:
            s = await rt.read()
            return s if s.mw == pytest.approx(1.5) and s.status == "discharging" else None

        sample = await eventually(discharging, what="the device to follow 1.5 MW")
        assert await device.run(lambda sim: sim.setpoint_mw) == 1.5
        assert sample.mw_setpoint == pytest.approx(1.5)
    finally:
        await rt.close()


async def test_secure_connection_with_a_client_certificate(
    device: SimulatorThread, pki: Pki
) -> None:
    for mode in ("SignAndEncrypt", "Sign"):
        adapter = make_adapter(
            device.endpoint_url,
            certificate=str(pki.agent_cert),
            private_key=str(pki.agent_key),
            security_mode=mode,
            subscribe=False,
        )
        try:
            await adapter.connect()
            sample = await adapter.read()
            assert sample.quality == "good", (mode, sample.quality_reason)
            assert (await adapter.apply_setpoint(-1.0)).status == "applied"
        finally:
            await adapter.close()
    assert adapter.application_uri == "urn:der-sdk:test:agent"  # taken from the certificate


async def test_a_pinned_server_certificate_that_does_not_match_fails(
    device: SimulatorThread, pki: Pki
) -> None:
    adapter = make_adapter(
        device.endpoint_url,
        certificate=str(pki.agent_cert),
        private_key=str(pki.agent_key),
        server_certificate=str(pki.server_cert),  # not the simulator's certificate
        subscribe=False,
        timeout_s=1.0,
    )
    rt = runtime(adapter, timeout_s=1.5)
    try:
        assert not await rt.connect()
        sample = await rt.read()
        assert sample.quality == "bad" and "failed to connect" in (sample.quality_reason or "")
    finally:
        await rt.close()


@pytest.mark.parametrize("subscribe", [False, True], ids=["polling", "subscription"])
async def test_a_bad_status_code_makes_the_sample_bad_with_the_reason(
    device: SimulatorThread, subscribe: bool
) -> None:
    adapter = make_adapter(device.endpoint_url, subscribe=subscribe, publishing_interval_ms=50)
    rt = runtime(adapter)
    try:
        assert await rt.connect()
        await eventually(_good(rt), what="a good sample")
        await device.run(
            lambda sim: sim.set_point_status("ActivePowerMW", ua.StatusCodes.BadSensorFailure)
        )

        async def bad() -> TelemetrySample | None:
            s = await rt.read()
            return s if s.quality == "bad" else None

        sample = await eventually(bad, what="a bad sample")
        assert "BadSensorFailure" in (sample.quality_reason or "")
        assert sim_node_id("ActivePowerMW") in (sample.quality_reason or "")
        assert sample.details == {} and sample.mw == 0.0  # no stale value passed as fresh
        await device.run(lambda sim: sim.set_point_status("ActivePowerMW", None))
        await eventually(_good(rt), what="a good sample again")
    finally:
        await rt.close()


async def test_an_uncertain_status_makes_the_sample_uncertain(device: SimulatorThread) -> None:
    adapter = make_adapter(device.endpoint_url, subscribe=False)
    try:
        await adapter.connect()
        await device.run(
            lambda sim: sim.set_point_status(
                "InverterTempC", ua.StatusCodes.UncertainLastUsableValue
            )
        )

        async def uncertain() -> TelemetrySample | None:
            s = await adapter.read()
            return s if s.quality == "uncertain" else None

        sample = await eventually(uncertain, what="an uncertain sample")
        assert "UncertainLastUsableValue" in (sample.quality_reason or "")
    finally:
        await adapter.close()


async def test_disconnect_gives_bad_quality_then_it_reconnects(device: SimulatorThread) -> None:
    adapter = make_adapter(device.endpoint_url, subscribe=True, publishing_interval_ms=50)
    rt = runtime(adapter, timeout_s=3.0)
    try:
        assert await rt.connect()
        await eventually(_good(rt), what="a good sample")
        await device.run(lambda sim: sim.stop())

        async def bad() -> TelemetrySample | None:
            s = await rt.read()
            return s if s.quality == "bad" else None

        sample = await eventually(bad, what="a bad sample after the device went away")
        assert sample.online is False and sample.details == {}
        assert "adapter 'opcua' (der-sdk-opcua)" in (sample.quality_reason or "")

        await device.restart()  # the same endpoint
        await eventually(_good(rt), what="a good sample after the device came back")
    finally:
        await rt.close()


async def test_dropped_connections_are_reopened(device: SimulatorThread) -> None:
    adapter = make_adapter(device.endpoint_url, subscribe=False)
    rt = runtime(adapter, timeout_s=3.0)
    try:
        assert await rt.connect()
        await eventually(_good(rt), what="a good sample")
        assert await device.run(lambda sim: sim.drop_connections()) >= 1
        seen: list[str] = []

        async def good_again() -> bool:
            # The old connection is gone, so a good sample comes over a new one. Whether a
            # read first reports it bad depends on when the drop reaches the client (the
            # adapter may reconnect within that read), so a bad sample is not required.
            s = await rt.read()
            seen.append(s.quality)
            return s.quality == "good"

        await eventually(good_again, what="a good sample over a reopened connection")
        assert (await rt.apply_setpoint(0.5)).status == "applied"
    finally:
        await rt.close()


# --------------------------------------------------------------------------- users


async def test_username_and_password_are_sent(pki: Pki) -> None:
    simulator = BessSimulator(
        endpoint="opc.tcp://127.0.0.1:0/der-sim/", step_s=0.05, users={"agent": "s3cret"}
    )
    async with simulator:
        anonymous = make_adapter(simulator.endpoint_url, subscribe=False)
        operator = make_adapter(
            simulator.endpoint_url, subscribe=False, username="agent", password="s3cret"
        )
        try:
            await anonymous.connect()
            await operator.connect()
            assert (await anonymous.read()).quality == "good"  # anonymous may read
            refused = await anonymous.apply_setpoint(1.0)
            assert refused.status == "failed" and "BadUserAccessDenied" in (refused.reason or "")
            assert (await operator.apply_setpoint(1.0)).status == "applied"
            await eventually(_async(lambda: simulator.setpoint_mw == 1.0), what="setpoint")
        finally:
            await anonymous.close()
            await operator.close()


# --------------------------------------------------------------------------- write sim


async def test_telemetry_write_sim_writes_the_simulation_into_the_nodes() -> None:
    # A device that does not drive its own nodes: the agent's simulation does.
    device = BessSimulator(
        endpoint="opc.tcp://127.0.0.1:0/der-sim/", step_s=3600, writable_points=True
    )
    async with device:
        adapter = make_adapter(device.endpoint_url, telemetry_write_sim=True)
        try:
            await adapter.connect()
            assert (await adapter.apply_setpoint(1.25)).status == "applied"
            sample = await adapter.read()
            assert sample.quality == "good" and sample.mw == pytest.approx(1.25)
            assert sample.details["soc_pct"] <= 50.0
            assert device.read_point("ActivePowerMW") == pytest.approx(1.25)
            assert device.read_point("SetpointMW") == pytest.approx(1.25)
            assert device.read_point("SocPct") == pytest.approx(sample.details["soc_pct"])
            assert device.read_point("Status") == "discharging"
        finally:
            await adapter.close()


# --------------------------------------------------------------------------- helpers


def _async(check: Any) -> Any:
    async def probe() -> bool:
        return bool(check())

    return probe


def _good(rt: AdapterRuntime) -> Any:
    async def probe() -> bool:
        s = await rt.read()
        assert s.quality == "good", s.quality_reason
        return math.isfinite(s.mw)

    return probe


async def test_reads_do_not_block_each_other_across_assets(device: SimulatorThread) -> None:
    adapters = [make_adapter(device.endpoint_url, subscribe=False) for _ in range(3)]
    try:
        await asyncio.gather(*(a.connect() for a in adapters))
        samples = await asyncio.gather(*(a.read() for a in adapters))
        assert all(s.quality == "good" for s in samples)
    finally:
        await asyncio.gather(*(a.close() for a in adapters))
