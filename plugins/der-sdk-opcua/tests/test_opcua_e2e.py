"""End to end, on loopback: a simulated OPC UA battery, a real headend, and a gateway agent
that reads the battery with the ``opcua`` adapter and serves the ``opcua-server`` edge
service, which an independent asyncua client (as Ignition would be) browses and writes.

Proves: telemetry from the OPC UA device reaches the headend; a SCADA write takes the
agent's dispatch path (clamp, split), reaches the device, shows in ``Site/Allocations`` and
in the headend's dispatch history with source ``local``; the authority rule (the last
command to reach the agent wins, so a headend dispatch after a local one supersedes it);
local commands made while the headend is away are recorded when it is back.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.uaerrors import UaStatusCodeError
from der_sdk_opcua.server import OpcuaEdgeServer
from der_sdk_opcua.simulator import SIM_PROFILE_NAME, BessSimulator
from opcua_kit import Pki, eventually, secure_client

from der_sdk.agent_config import parse_agent_config
from der_sdk.wire import codec
from der_sdk_agent.agent import Agent
from tests.e2e.conftest import B1, B2, B3, LONE, SITE, Fleet

USER = ("operator", "correct horse")


class Gateway:
    """The fleet, the simulated device behind B1, the agent and its OPC UA server."""

    def __init__(self, fleet: Fleet, device: BessSimulator, agent: Agent) -> None:
        self.fleet = fleet
        self.device = device
        self.agent = agent
        name, service = agent.services[0]
        assert name == "opcua-server" and isinstance(service, OpcuaEdgeServer)
        self.server: OpcuaEdgeServer = service

    def node(self, client: Client, path: str) -> Any:
        return client.get_node(ua.NodeId.from_string(f"ns={self.server.namespace_index};s={path}"))

    async def history(self, **params: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.fleet.get("/dispatch/history", **params)
        return rows

    def commanded(self, asset_id: str) -> float | None:
        return self.agent.adapters[asset_id].last_commanded_mw


def agent_config(device: BessSimulator, pki: Pki) -> str:
    return textwrap.dedent(
        f"""
        telemetry_interval_s: 0.5
        heartbeat_interval_s: 1
        reconnect_initial_s: 0.05
        reconnect_max_s: 0.3
        assets:
          {B1}:
            adapter: opcua
            options:
              endpoint: {device.endpoint_url}
              profile: {SIM_PROFILE_NAME}
              security_policy: None
              allow_insecure: true
              publishing_interval_ms: 100
        edge_services:
          - name: opcua-server
            options:
              endpoint: opc.tcp://127.0.0.1:0/der-sdk/
              certificate: {pki.server_cert}
              private_key: {pki.server_key}
              trusted_certificates: {pki.trust}
              users: {{{USER[0]}: {USER[1]}}}
        """
    )


@pytest_asyncio.fixture
async def gateway(tmp_path: Path, pki: Pki) -> AsyncIterator[Gateway]:
    fleet = Fleet(tmp_path)
    # B1's device: as the inventory has it, 2 MWh and +-0.5 MW
    device = BessSimulator(
        endpoint="opc.tcp://127.0.0.1:0/der-sim/",
        step_s=0.05,
        max_mw=0.5,
        min_mw=-0.5,
        capacity_mwh=2.0,
    )
    try:
        await device.start()
        headend = await fleet.start_headend()
        fleet.agent_config = parse_agent_config(agent_config(device, pki), "agent.yaml")
        agent = await fleet.start_agent(headend, site_id=SITE)
        await eventually(lambda: fleet.connected_rows(3), what="the gateway to register")
        yield Gateway(fleet, device, agent)
    finally:
        await fleet.close()
        await device.stop()


async def write(node: Any, mw: float) -> None:
    await node.write_value(ua.DataValue(ua.Variant(mw, ua.VariantType.Double)))


async def test_a_scada_reads_and_commands_the_site_through_the_agent(
    gateway: Gateway, pki: Pki
) -> None:
    fleet, device = gateway.fleet, gateway.device

    # The OPC UA device's telemetry reaches the headend.
    async def b1_from_the_device() -> dict[str, Any] | None:
        latest: dict[str, Any] = await fleet.get(f"/telemetry/{B1}")
        good = latest["quality"] == "good" and "soc_pct" in latest["details"]
        return latest if good else None

    latest = await eventually(b1_from_the_device, what="B1's OPC UA telemetry at the headend")
    assert latest["status"] == "idle" and latest["details"]["soh_pct"] == 100.0

    scada = await secure_client(gateway.server.endpoint_url, pki, user=USER)
    await scada.connect()
    try:
        # Browse the surface as a SCADA would.
        idx = await scada.get_namespace_index("urn:der-sdk:edge")
        assets = await scada.nodes.objects.get_child(f"{idx}:Assets")
        names = {(await n.read_browse_name()).Name for n in await assets.get_children()}
        assert names == {B1, B2, B3}
        b1 = await assets.get_child(f"{idx}:{B1}")
        folders = {(await n.read_browse_name()).Name for n in await b1.get_children()}
        assert folders == {"Telemetry", "Controls", "Status"}
        soc = await eventually(
            lambda: _child(b1, [f"{idx}:Telemetry", f"{idx}:soc_pct"]), what="soc_pct"
        )
        assert 0 < await soc.read_value() <= 100
        mw = await b1.get_child([f"{idx}:Telemetry", f"{idx}:mw"])
        await eventually(_good_value(mw), what="B1 mw")
        online = await b1.get_child([f"{idx}:Status", f"{idx}:Online"])
        assert await online.read_value() is True

        # A per-asset write: clamped? no, within B1's limits; it reaches the device.
        setpoint = await b1.get_child([f"{idx}:Controls", f"{idx}:SetpointMW"])
        await write(setpoint, 0.4)
        assert await setpoint.read_value() == pytest.approx(0.4)
        await eventually(_async(lambda: device.setpoint_mw == pytest.approx(0.4)), what="device")

        async def local_b1() -> dict[str, Any] | None:
            rows = await gateway.history(asset_id=B1)
            return rows[0] if rows and rows[0]["source"] == "local" else None

        record = await eventually(local_b1, what="the local write in the headend's history")
        assert record["state"] == "applied" and record["mw"] == pytest.approx(0.4)
        assert record["asset_id"] == B1 and record["targets"][0]["applied_mw"] == 0.4
        detail = await fleet.get(f"/dispatch/{record['dispatch_id']}")
        assert [e["state"] for e in detail["events"]] == ["applied"]
        assert "locally by agent" in detail["events"][0]["detail"]

        # A site write is split by the agent's policy (capacity weighted: 2:4:6 MWh).
        site = gateway.node(scada, "Site/Controls/SiteDispatchMW")
        await write(site, 3.0)
        allocations = {
            a: await gateway.node(scada, f"Site/Allocations/{a}/MW").read_value()
            for a in (B1, B2, B3)
        }
        assert allocations == {
            B1: pytest.approx(0.5),
            B2: pytest.approx(1.0),
            B3: pytest.approx(1.5),
        }
        assert await site.read_value() == pytest.approx(3.0)
        assert gateway.commanded(B2) == pytest.approx(1.0)
        assert gateway.commanded(B3) == pytest.approx(1.5)
        await eventually(_async(lambda: device.setpoint_mw == pytest.approx(0.5)), what="B1")

        async def local_site() -> dict[str, Any] | None:
            rows = await gateway.history(site_id=SITE)
            site_rows = [r for r in rows if r["asset_id"] is None]
            return site_rows[0] if site_rows else None

        record = await eventually(local_site, what="the site write in the history")
        assert record["source"] == "local" and record["state"] == "applied"
        assert record["policy"] == "capacity_weighted" and record["mw"] == 3.0
        assert {t["asset_id"]: t["applied_mw"] for t in record["targets"]} == allocations

        # Read-only nodes refuse writes.
        with pytest.raises(UaStatusCodeError):
            await write(mw, 1.0)
        with pytest.raises(UaStatusCodeError):
            await write(gateway.node(scada, f"Site/Allocations/{B1}/MW"), 1.0)
    finally:
        await scada.disconnect()
    await eventually(
        _async(lambda: gateway.agent.link.unacked_local_dispatches == 0),
        what="the headend to acknowledge every local command",
    )
    local = [r for r in await gateway.history() if r["source"] == "local"]
    assert len(local) == 2  # acknowledged once each, recorded once each


async def test_last_command_wins_so_a_later_headend_dispatch_supersedes_a_local_one(
    gateway: Gateway, pki: Pki
) -> None:
    fleet = gateway.fleet
    scada = await secure_client(gateway.server.endpoint_url, pki, user=USER)
    await scada.connect()
    try:
        setpoint = gateway.node(scada, f"Assets/{B2}/Controls/SetpointMW")
        await write(setpoint, 0.3)
        assert gateway.commanded(B2) == pytest.approx(0.3)

        response = await fleet.http.post("/dispatch", json={"asset_id": B2, "mw": 1.2})
        assert response.status_code == 202, response.text
        dispatch_id = response.json()["dispatch_id"]

        async def applied() -> bool:
            return bool((await fleet.get(f"/dispatch/{dispatch_id}"))["state"] == "applied")

        await eventually(applied, what="the headend dispatch to be applied")
        assert gateway.commanded(B2) == pytest.approx(1.2)

        async def scada_sees(mw: float) -> bool:
            return bool(await setpoint.read_value() == pytest.approx(mw))

        await eventually(lambda: scada_sees(1.2), what="SetpointMW to show the headend's 1.2")

        async def history_is(sources: list[str]) -> list[dict[str, Any]] | None:
            rows = await gateway.history(asset_id=B2)
            return rows if [r["source"] for r in rows] == sources else None

        rows = await eventually(lambda: history_is(["rest", "local"]), what="both in history")
        assert [r["mw"] for r in rows] == [1.2, 0.3]
        assert all(r["state"] == "applied" for r in rows)

        # ...and a local command after it wins in turn.
        await write(setpoint, 0.7)
        assert gateway.commanded(B2) == pytest.approx(0.7)
        assert await setpoint.read_value() == pytest.approx(0.7)
        rows = await eventually(lambda: history_is(["local", "rest", "local"]), what="history")
        assert rows[0]["mw"] == 0.7
    finally:
        await scada.disconnect()


async def test_a_schedule_the_agent_runs_shows_step_by_step_in_the_site_allocations(
    gateway: Gateway, pki: Pki
) -> None:
    fleet = gateway.fleet
    start = datetime.now(UTC) + timedelta(seconds=1)
    response = await fleet.http.post(
        "/dispatch",
        json={
            "asset_id": B2,
            "start_at": start.isoformat(),
            "steps": [{"offset_s": 0, "mw": 0.6}, {"offset_s": 2, "mw": -0.9}],
            "duration_s": 4,
        },
    )
    assert response.status_code == 202, response.text
    dispatch_id = response.json()["dispatch_id"]
    scada = await secure_client(gateway.server.endpoint_url, pki, user=USER)
    await scada.connect()
    try:
        allocation = gateway.node(scada, f"Site/Allocations/{B2}/MW")
        seen: list[float] = []

        async def shows(mw: float) -> bool:
            raw = await allocation.read_value()
            if raw is None:  # no sample of B2 yet
                return False
            value = float(raw)
            if not seen or seen[-1] != value:
                seen.append(value)
            return value == pytest.approx(mw)

        for mw in (0.6, -0.9, 0.0):  # each step, then the default at the end
            await eventually(lambda mw=mw: shows(mw), what=f"Site/Allocations {mw} MW")
    finally:
        await scada.disconnect()

    async def completed() -> bool:
        return bool((await fleet.get(f"/dispatch/{dispatch_id}"))["state"] == "completed")

    await eventually(completed, what="the schedule completed at the headend")
    assert [v for v in seen if v in (0.6, -0.9)] == [0.6, -0.9], seen


async def test_local_commands_made_while_the_headend_is_away_are_recorded_on_reconnect(
    gateway: Gateway, pki: Pki
) -> None:
    fleet, agent = gateway.fleet, gateway.agent
    headend = fleet.headends[0]
    grpc_port = headend.grpc_port
    await headend.stop()
    await eventually(_async(lambda: not agent.stats().connected), what="agent to notice")

    scada = await secure_client(gateway.server.endpoint_url, pki, user=USER)
    await scada.connect()
    try:
        await write(gateway.node(scada, f"Assets/{B3}/Controls/SetpointMW"), -1.0)
    finally:
        await scada.disconnect()
    assert gateway.commanded(B3) == pytest.approx(-1.0)  # the site keeps working offline
    assert agent.link.unacked_local_dispatches == 1

    await fleet.start_headend(grpc_port=grpc_port)
    await eventually(_async(lambda: agent.link.unacked_local_dispatches == 0), what="report")
    rows = await gateway.history(asset_id=B3)
    assert [(r["source"], r["mw"], r["state"]) for r in rows] == [("local", -1.0, "applied")]

    # A report sent again (its acknowledgement lost) is recorded once; a report for an
    # asset the stream does not serve is not recorded at all.
    headend = fleet.headends[-1]
    stream = headend.presence.stream_for(B3)
    assert stream is not None
    report = codec.LocalDispatchReport(
        command_id=rows[0]["dispatch_id"],
        mw=-1.0,
        ts=datetime.now(UTC),
        status="applied",
        asset_id=B3,
        allocations=(codec.Allocation(asset_id=B3, mw=-1.0),),
    )
    assert await headend.dispatcher.record_local(stream, report) is None
    stranger = msgspec.structs.replace(report, command_id="local-stranger", asset_id=LONE)
    assert await headend.dispatcher.record_local(stream, stranger) is None
    assert len(await gateway.history()) == 1


# --------------------------------------------------------------------------- helpers


def _async(check: Any) -> Any:
    async def probe() -> bool:
        return bool(check())

    return probe


def _good_value(node: Any) -> Any:
    async def probe() -> bool:
        value = await node.read_data_value(raise_on_bad_status=False)
        return bool(value.StatusCode.is_good() and isinstance(value.Value.Value, float))

    return probe


async def _child(node: Any, path: list[str]) -> Any:
    try:
        return await node.get_child(path)
    except UaStatusCodeError:
        return None
