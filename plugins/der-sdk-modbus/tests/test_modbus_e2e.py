"""Acceptance, end to end on real ports: a gateway agent serving three Modbus assets (a
SunSpec battery found by scan and two vendor batteries on a vendor profile) streams
telemetry to a real headend; a dispatch writes the scaled register and reads back."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest_asyncio
from der_sdk_modbus.simulator import ModbusSimServer, SimulatedDevice
from modbus_kit import SUNSPEC_BESS, load_test_profile, profile

from der_sdk import hookimpl
from der_sdk.agent_config import parse_agent_config
from tests.e2e.conftest import B1, B2, B3, SITE, Fleet, eventually


@pytest_asyncio.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        await f.close()


@pytest_asyncio.fixture
async def devices() -> AsyncIterator[dict[str, tuple[SimulatedDevice, ModbusSimServer]]]:
    acme = load_test_profile("acme-bess.yaml")
    made = {
        B1: SimulatedDevice(
            [profile(name) for name in SUNSPEC_BESS], rating_mw=0.5, ramp_s=0, seed=1
        ),
        B2: SimulatedDevice([acme], rating_mw=2.0, ramp_s=0, seed=2),
        B3: SimulatedDevice([acme], rating_mw=3.0, ramp_s=0, seed=3, initial_soc_pct=80),
    }
    servers = {asset_id: ModbusSimServer(device) for asset_id, device in made.items()}
    for server in servers.values():
        await server.start()
    try:
        yield {asset_id: (made[asset_id], servers[asset_id]) for asset_id in made}
    finally:
        for server in servers.values():
            await server.stop()


def _agent_config(devices: dict[str, tuple[SimulatedDevice, ModbusSimServer]]) -> str:
    fast = "poll_interval_s: 0.1, timeout_s: 0.5"
    return f"""
telemetry_interval_s: 0.2
heartbeat_interval_s: 0.5
reconnect_initial_s: 0.05
reconnect_max_s: 0.3
assets:
  {B1}:
    adapter: modbus
    options: {{host: 127.0.0.1, port: {devices[B1][1].port}, sunspec_scan: true, {fast}}}
  {B2}:
    adapter: modbus
    options: {{host: 127.0.0.1, port: {devices[B2][1].port}, profile: acme-bess, {fast}}}
  {B3}:
    adapter: modbus
    options: {{host: 127.0.0.1, port: {devices[B3][1].port}, profile: acme-bess, {fast}}}
"""


async def _latest(fleet: Fleet, asset_id: str) -> dict[str, Any] | None:
    response = await fleet.http.get(f"/telemetry/{asset_id}")
    return response.json() if response.status_code == 200 else None


async def test_gateway_streams_three_modbus_assets_and_a_dispatch_reads_back(
    fleet: Fleet, devices: dict[str, tuple[SimulatedDevice, ModbusSimServer]]
) -> None:
    acme = load_test_profile("acme-bess.yaml")
    fleet.plugins.register(
        SimpleNamespace(der_device_profiles=hookimpl(lambda: [acme])), "modbus-test-profiles"
    )
    fleet.agent_config = parse_agent_config(_agent_config(devices), "agent.yaml")
    headend = await fleet.start_headend()
    await fleet.start_agent(headend, site_id=SITE)
    rows = await eventually(lambda: fleet.connected_rows(3), what="3 connected assets")
    assert {r["asset_id"] for r in rows} == {B1, B2, B3}

    async def all_good() -> dict[str, dict[str, Any]] | None:
        latest = {a: await _latest(fleet, a) for a in (B1, B2, B3)}
        if all(s is not None and s["quality"] == "good" for s in latest.values()):
            return latest  # type: ignore[return-value]
        return None

    first = await eventually(all_good, what="good telemetry from all three")
    assert first[B1]["details"]["soc_pct"] == 50.0 and first[B1]["status"] == "standby"
    assert first[B3]["details"]["soc_pct"] == 80.0 and first[B3]["status"] == "idle"
    assert first[B2]["online"] is True and first[B2]["fault_code"] is None

    async def advanced() -> bool:
        now = await all_good()
        return now is not None and all(now[a]["ts"] > first[a]["ts"] for a in now)

    await eventually(advanced, what="every asset's telemetry to advance")

    for asset_id, mw in ((B2, 1.5), (B1, -0.4)):
        response = await fleet.http.post("/dispatch", json={"asset_id": asset_id, "mw": mw})
        assert response.status_code == 202, response.text
        dispatch_id = response.json()["dispatch_id"]

        async def applied(dispatch_id: str = dispatch_id) -> bool:
            return bool((await fleet.get(f"/dispatch/{dispatch_id}"))["state"] == "applied")

        await eventually(applied, what=f"the dispatch to {asset_id} to be applied")

        async def read_back(asset_id: str = asset_id, mw: float = mw) -> bool:
            latest = await _latest(fleet, asset_id)
            return (
                latest is not None
                and latest["mw_setpoint"] is not None
                and math.isclose(latest["mw_setpoint"], mw, abs_tol=1e-6)
                and math.isclose(latest["mw"], mw, abs_tol=0.05)
            )

        await eventually(read_back, what=f"{asset_id}'s telemetry to show {mw} MW")

    b2 = devices[B2][0]
    assert b2.raw(b2.point("setpoint")) == 15_000  # 1500 kW in 0.1 kW steps
    assert b2.raw(b2.point("control_enable")) == 1
    b1 = devices[B1][0]
    assert b1.setpoint_mw is not None and math.isclose(b1.setpoint_mw, -0.4, abs_tol=1e-6)
    assert b1.raw(b1.point("WSetEna")) == 1
    b3 = devices[B3][0]
    assert b3.raw(b3.point("control_enable")) == 0  # untouched
