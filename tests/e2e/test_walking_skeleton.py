"""The walking skeleton's acceptance, end to end on real TCP ports: headend, gRPC stream,
gateway agent, sim-bess adapter, SQLite storage."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from der_sdk import hookimpl
from der_sdk.models import Asset, Session
from tests.e2e.conftest import B1, B2, B3, LONE, SITE, Fleet, eventually


async def _latest_ts(fleet: Fleet, asset_ids: Sequence[str]) -> dict[str, str] | None:
    stamps: dict[str, str] = {}
    for asset_id in asset_ids:
        response = await fleet.http.get(f"/telemetry/{asset_id}")
        if response.status_code == 404:
            return None
        stamps[asset_id] = response.json()["ts"]
    return stamps


async def _setpoints(fleet: Fleet, asset_ids: Sequence[str]) -> dict[str, Any]:
    return {a: (await fleet.get(f"/telemetry/{a}"))["mw_setpoint"] for a in asset_ids}


async def test_gateway_agent_shows_three_connected_assets_with_one_peer(fleet: Fleet) -> None:
    headend = await fleet.start_headend()
    await fleet.start_agent(headend, site_id=SITE)

    rows = await eventually(lambda: fleet.connected_rows(3), what="3 connected rows")
    assert {r["asset_id"] for r in rows} == {B1, B2, B3}
    assert len({r["peer"] for r in rows}) == 1 and rows[0]["peer"]
    assert {r["site_name"] for r in rows} == {"Test Yard"}
    assert all(r["agent_id"] == f"gateway-{SITE}" for r in rows)
    everything = await fleet.get("/agents")
    assert next(r for r in everything if r["asset_id"] == LONE)["connected"] is False

    first = await eventually(lambda: _latest_ts(fleet, (B1, B2, B3)), what="first telemetry")

    async def advanced() -> bool:
        now = await _latest_ts(fleet, (B1, B2, B3))
        return now is not None and all(now[a] > first[a] for a in now)

    await eventually(advanced, what="every asset's telemetry timestamp to advance")
    latest = await fleet.get(f"/telemetry/{B2}")
    assert latest["asset_id"] == B2 and "soc_pct" in latest["details"]


async def test_per_asset_dispatch_changes_only_its_target(fleet: Fleet) -> None:
    headend = await fleet.start_headend()
    await fleet.start_agent(headend, site_id=SITE)
    await eventually(lambda: fleet.connected_rows(3))

    response = await fleet.http.post("/dispatch", json={"asset_id": B2, "mw": 1.25})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "sent"
    assert [(t["asset_id"], t["mw"]) for t in body["targets"]] == [(B2, 1.25)]

    async def applied() -> bool:
        return (await fleet.get(f"/dispatch/{body['dispatch_id']}"))["state"] == "applied"

    await eventually(applied, what="the dispatch to be applied")
    await eventually(
        lambda: _has_setpoint(fleet, B2, 1.25), what="B2's telemetry to show the setpoint"
    )
    others = await _setpoints(fleet, [B1, B3])
    assert all(v in (None, 0.0) for v in others.values()), others


async def _has_setpoint(fleet: Fleet, asset_id: str, mw: float) -> bool:
    value = (await fleet.get(f"/telemetry/{asset_id}"))["mw_setpoint"]
    return value is not None and math.isclose(value, mw, abs_tol=1e-9)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (3.0, {B1: 0.5, B2: 1.0, B3: 1.5}),  # capacity-weighted 2:4:6, nothing clamps
        (4.5, {B1: 0.5, B2: 1.6, B3: 2.4}),  # B1 clamps at 0.5; its 0.25 MW goes to B2:B3 4:6
        (-4.5, {B1: -0.5, B2: -1.6, B3: -2.4}),  # charging, same split mirrored
    ],
)
async def test_site_dispatch_splits_by_capacity_clamps_and_sums_to_target(
    fleet: Fleet, target: float, expected: dict[str, float]
) -> None:
    headend = await fleet.start_headend()
    await fleet.start_agent(headend, site_id=SITE)
    await eventually(lambda: fleet.connected_rows(3))

    response = await fleet.http.post("/dispatch", json={"site_id": SITE, "mw": target})
    assert response.status_code == 202, response.text
    body = response.json()
    shares = {t["asset_id"]: t["mw"] for t in body["targets"]}
    assert shares == pytest.approx(expected)
    assert sum(shares.values()) == pytest.approx(target)
    assert body["unallocated_mw"] == pytest.approx(0.0)

    async def applied_in_agent() -> bool:
        values = await _setpoints(fleet, [B1, B2, B3])
        return all(
            v is not None and math.isclose(v, expected[a], abs_tol=1e-6) for a, v in values.items()
        )

    await eventually(applied_in_agent, what="the agent's split to reach each battery")
    record = await eventually(
        lambda: _state(fleet, body["dispatch_id"], "applied"), what="site dispatch applied"
    )
    assert {t["asset_id"]: t["applied_mw"] for t in record["targets"]} == pytest.approx(expected)


async def _state(fleet: Fleet, dispatch_id: str, state: str) -> dict[str, Any] | None:
    record: dict[str, Any] = await fleet.get(f"/dispatch/{dispatch_id}")
    return record if record["state"] == state else None


async def test_infeasible_site_dispatch_reports_what_cannot_be_placed(fleet: Fleet) -> None:
    await fleet.start_headend()
    body = (await fleet.http.post("/dispatch", json={"site_id": SITE, "mw": 7.5})).json()
    assert {t["asset_id"]: t["mw"] for t in body["targets"]} == pytest.approx(
        {B1: 0.5, B2: 2.0, B3: 3.0}
    )
    assert body["unallocated_mw"] == pytest.approx(2.0)


async def test_dispatch_to_offline_asset_is_pending_until_its_agent_starts(fleet: Fleet) -> None:
    headend = await fleet.start_headend()
    response = await fleet.http.post("/dispatch", json={"asset_id": LONE, "mw": -0.75})
    assert response.status_code == 202
    body = response.json()
    assert body["state"] == "submitted"

    await fleet.start_agent(headend, asset_id=LONE)
    await eventually(lambda: _has_setpoint(fleet, LONE, -0.75), what="pending delivered")
    record = await eventually(lambda: _state(fleet, body["dispatch_id"], "applied"))
    assert [e["state"] for e in record["events"]][:1] == ["submitted"]
    assert record["events"][-1]["state"] == "applied"


async def test_asset_id_wins_over_site_id(fleet: Fleet) -> None:
    headend = await fleet.start_headend()
    await fleet.start_agent(headend, site_id=SITE)
    await eventually(lambda: fleet.connected_rows(3))
    body = (
        await fleet.http.post("/dispatch", json={"asset_id": B3, "site_id": SITE, "mw": 2.0})
    ).json()
    assert [t["asset_id"] for t in body["targets"]] == [B3]
    await eventually(lambda: _has_setpoint(fleet, B3, 2.0))
    others = await _setpoints(fleet, [B1, B2])
    assert all(v in (None, 0.0) for v in others.values()), others


async def test_agent_reconnects_after_headend_restart_and_sqlite_history_survives(
    fleet: Fleet,
) -> None:
    headend = await fleet.start_headend()
    grpc_port, http_port = headend.grpc_port, headend.http_port
    agent = await fleet.start_agent(headend, site_id=SITE)
    await eventually(lambda: fleet.connected_rows(3))

    async def some_history() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = await fleet.get(f"/telemetry/{B1}/history", limit=1000)
        return rows if len(rows) >= 3 else None

    before = await eventually(some_history, what="history before the restart")
    oldest_before = before[-1]["ts"]
    await headend.stop()
    await eventually(_async(lambda: not agent.stats().connected), what="agent to notice")

    await fleet.start_headend(grpc_port=grpc_port, http_port=http_port)
    rows = await eventually(lambda: fleet.connected_rows(3), what="agent to reconnect by itself")
    # the headend lists the stream before the agent has read its RegisterAck
    await eventually(_async(lambda: agent.stats().connected), what="agent to read its ack")
    assert len({r["peer"] for r in rows}) == 1
    assert agent.stats().reconnects >= 1

    async def history_spans_restart() -> bool:
        rows = await fleet.get(f"/telemetry/{B1}/history", limit=10000)
        return rows[-1]["ts"] == oldest_before and len(rows) > len(before)

    await eventually(history_spans_restart, what="history from both runs")
    sessions = next(r for r in await fleet.get("/agents") if r["asset_id"] == B1)["sessions"]
    assert len(sessions) >= 2
    assert sessions[0]["disconnected_at"] is None and sessions[1]["disconnected_at"] is not None


def _async(fn: Any) -> Any:
    async def probe() -> Any:
        return fn()

    return probe


async def test_presence_observer_hooks_fire_on_connect_and_disconnect(fleet: Fleet) -> None:
    events: list[tuple[str, list[str]]] = []

    class Watcher:
        @hookimpl
        def der_agent_connected(self, sessions: Sequence[Session], assets: Sequence[Asset]) -> None:
            assert [s.asset_id for s in sessions] == [a.asset_id for a in assets]
            events.append(("connected", sorted(a.asset_id for a in assets)))

        @hookimpl
        def der_agent_disconnected(self, sessions: Sequence[Session]) -> None:
            assert all(s.disconnected_at is not None for s in sessions)
            events.append(("disconnected", sorted(s.asset_id for s in sessions)))

    fleet.plugins.register(Watcher(), "watcher")
    headend = await fleet.start_headend()
    agent = await fleet.start_agent(headend, site_id=SITE)
    await eventually(lambda: fleet.connected_rows(3))
    await agent.stop()
    await eventually(_async(lambda: len(events) == 2), what="disconnect hook")
    assert events == [("connected", [B1, B2, B3]), ("disconnected", [B1, B2, B3])]


async def test_agents_in_one_process_each_have_their_own_connection(fleet: Fleet) -> None:
    headend = await fleet.start_headend()
    for asset_id in (B1, B2, B3):
        await fleet.start_agent(headend, asset_id=asset_id)
    rows = await eventually(lambda: fleet.connected_rows(3), what="3 single-asset agents")
    assert len({r["peer"] for r in rows}) == 3
    assert {r["agent_id"] for r in rows} == {f"asset-{a}" for a in (B1, B2, B3)}
