"""Comms-loss alarms in a cluster (docs/alarms.md, "Comms loss"): replicas in this
process on real NATS and real PostgreSQL, agents dialling them over gRPC."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from der_sdk_headend import Headend
from tests.cluster.conftest import ConnectAgent, StartReplica, crash_replica
from tests.headend.headend_kit import SITE_A_ASSETS, eventually

GRACE_S = 1.0


async def _comms_loss(replica: Headend) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=replica.http_url, timeout=5.0) as http:
        response = await http.get("/alarms", params={"code": "comms_loss"})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows


async def test_an_agent_that_moves_to_another_replica_within_the_grace_time_raises_nothing(
    start_replica: StartReplica, connect_agent: ConnectAgent
) -> None:
    settings = {"HEADEND_COMMS_LOSS_ALARM_S": str(GRACE_S)}
    a = await start_replica("replica-a", **settings)
    b = await start_replica("replica-b", **settings)
    old = await connect_agent(a)
    await old.register(SITE_A_ASSETS, agent_id="gw-1")
    await old.end()
    new = await connect_agent(b)
    await new.register(SITE_A_ASSETS, agent_id="gw-1")

    async def b_listed_on_a() -> bool:
        assert a.cluster_presence is not None
        return a.cluster_presence.replica_of_asset(SITE_A_ASSETS[0]) == "replica-b"

    await eventually(b_listed_on_a, "replica-a sees gw-1 on replica-b", 2.0)
    await asyncio.sleep(GRACE_S * 2)
    rows = await _comms_loss(a)
    assert rows == [], [(r["state"], r["raised_at"], r["cleared_at"], r["text"]) for r in rows]


async def test_an_agent_that_stays_away_gets_one_comms_loss_per_asset_from_the_cluster(
    start_replica: StartReplica, connect_agent: ConnectAgent
) -> None:
    settings = {"HEADEND_COMMS_LOSS_ALARM_S": str(GRACE_S)}
    a = await start_replica("replica-a", **settings)
    b = await start_replica("replica-b", **settings)
    agent = await connect_agent(a)
    await agent.register(SITE_A_ASSETS, agent_id="gw-1")
    await agent.end()

    async def raised() -> bool:
        return len(await _comms_loss(b)) == len(SITE_A_ASSETS)

    await eventually(raised, "every asset has a comms_loss alarm, seen from replica-b", 5.0)
    # A replica that starts now checks who is away, too: still one alarm per asset.
    c = await start_replica("replica-c", **settings)
    await asyncio.sleep(GRACE_S * 2)
    rows = await _comms_loss(c)
    assert sorted(r["asset_id"] for r in rows) == sorted(SITE_A_ASSETS)
    assert {(r["state"], r["raise_count"]) for r in rows} == {("active", 1)}

    back = await connect_agent(b)
    await back.register(SITE_A_ASSETS, agent_id="gw-1")

    async def cleared() -> bool:
        return {r["state"] for r in await _comms_loss(a)} == {"cleared"}

    await eventually(cleared, "the alarms clear when the agent is back on replica-b", 5.0)


@pytest.mark.parametrize("ending", ["crash", "stop"])
async def test_the_agents_of_a_replica_that_dies_or_stops_get_comms_loss_from_the_others(
    start_replica: StartReplica, connect_agent: ConnectAgent, ending: str
) -> None:
    settings = {"HEADEND_COMMS_LOSS_ALARM_S": str(GRACE_S), "HEADEND_BUS_PRESENCE_MAX_AGE_S": "3"}
    a = await start_replica("replica-a", **settings)
    b = await start_replica("replica-b", **settings)
    agent = await connect_agent(b)
    await agent.register(SITE_A_ASSETS, agent_id="gw-1")

    async def a_sees_it() -> bool:
        assert a.cluster_presence is not None
        return a.cluster_presence.replica_of_asset(SITE_A_ASSETS[0]) == "replica-b"

    await eventually(a_sees_it, "replica-a sees gw-1 on replica-b", 2.0)
    if ending == "crash":
        await crash_replica(b)  # its timers die with it, its entries expire after 3 s
    else:
        await b.stop()  # it ends the agent's stream itself, and stops its timers

    async def raised() -> bool:
        rows = await _comms_loss(a)
        return sorted(r["asset_id"] for r in rows if r["state"] == "active") == sorted(
            SITE_A_ASSETS
        )

    await eventually(raised, "replica-a raises comms_loss for gw-1's assets", 10.0)
    assert len(await _comms_loss(a)) == len(SITE_A_ASSETS), "one alarm per asset"
