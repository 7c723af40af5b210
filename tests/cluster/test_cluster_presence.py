"""One view of presence across replicas (issue 17, "one view of presence"): replicas
in this process on real NATS and real PostgreSQL, agents dialling them over gRPC."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from der_sdk.bus.contract import check_key
from der_sdk.testing import TcpProxy
from der_sdk_headend import Headend
from der_sdk_headend.cluster.presence import agent_key
from tests.cluster.conftest import ConnectAgent, StartReplica, crash_replica
from tests.headend.headend_kit import PV_1, SITE_A_ASSETS, SITE_B, eventually, sample

VIEW_S = 10.0
"""How long a test waits for every replica to agree after a connect or disconnect. The
design gives about 1 s (a change goes out on the bus at once, entries are refreshed
every third of the max age); this bound only keeps a loaded CI machine from failing a
correct cluster (CI once took over 2 s to answer one REST request). How fast the views
converge is measured by ``bench cluster-failover``, not here."""


async def _get(replica: Headend, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=replica.http_url, timeout=5.0) as http:
        return await http.get(path)


async def _connected_rows(replica: Headend) -> dict[str, dict[str, Any]]:
    response = await _get(replica, "/agents")
    assert response.status_code == 200, response.text
    return {row["asset_id"]: row for row in response.json() if row["connected"]}


async def _counts(replica: Headend) -> tuple[int, int, float]:
    """``/healthz`` agents and assets connected, and ``/metrics`` der_agents_connected."""
    health = (await _get(replica, "/healthz")).json()
    metrics = (await _get(replica, "/metrics")).text
    gauge = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("der_agents_connected ")
    )
    return health["agents_connected"], health["assets_connected"], gauge


async def _sees(replica: Headend, agents: int, assets: int, holder: str | None = None) -> bool:
    counts = await _counts(replica)
    if counts != (agents, assets, float(agents)):
        return False
    rows = await _connected_rows(replica)
    if len(rows) != assets:
        return False
    return holder is None or all(row["headend_id"] == holder for row in rows.values())


async def _true(value: bool) -> bool:
    return value


async def _open_sessions(replica: Headend, asset_id: str) -> list[str | None]:
    """The headend ids of the asset's sessions still open in PostgreSQL."""
    sessions = await replica.storage.recent_sessions(asset_id, 20)
    return [s.headend_id for s in sessions if s.disconnected_at is None]


def test_agent_keys_are_valid_and_distinct_for_any_agent_id() -> None:
    ids = ["gw-1", "gw_2", "site a/gw.1", "=gw", "ünï", "x" * 64]
    keys = [agent_key(agent_id) for agent_id in ids]
    assert keys[0] == "agents.gw-1"
    assert all(check_key(key) for key in keys)
    assert len(set(keys)) == len(ids)


async def test_a_connect_and_disconnect_show_on_every_replica(
    start_replica: StartReplica, connect_agent: ConnectAgent
) -> None:
    a = await start_replica("replica-a")
    b = await start_replica("replica-b")
    c = await start_replica("replica-c")
    for replica in (a, b, c):
        assert await _sees(replica, 0, 0)

    agent = await connect_agent(a)
    await agent.register(SITE_A_ASSETS, agent_id="gw-1")
    for replica in (a, b, c):
        await eventually(
            lambda r=replica: _sees(r, 1, 3, holder="replica-a"),  # type: ignore[misc]
            f"{replica.config.headend_id} lists gw-1 on replica-a",
            VIEW_S,
        )
    rows = await _connected_rows(b)
    assert {row["agent_id"] for row in rows.values()} == {"gw-1"}
    assert all(row["peer"] for row in rows.values())
    metrics = (await _get(b, "/metrics")).text
    assert "der_cluster_replicas 3.0" in metrics
    assert "der_bus_connected 1.0" in metrics
    assert b.cluster_presence is not None
    assert b.cluster_presence.replica_of_asset(SITE_A_ASSETS[0]) == "replica-a"
    assert b.cluster_presence.replica_of_asset(PV_1) is None

    await agent.end()
    for replica in (a, b, c):
        await eventually(
            lambda r=replica: _sees(r, 0, 0),  # type: ignore[misc]
            f"{replica.config.headend_id} lists no agent after gw-1 disconnected",
            VIEW_S,
        )

    await c.stop()  # a clean stop deletes its replica entry: the others know at once
    assert b.cluster_presence is not None
    await eventually(
        lambda: _true(b.cluster_presence.replicas() == ["replica-a", "replica-b"]),  # type: ignore[union-attr]
        "b to see replica-c gone",
        VIEW_S,
    )


async def test_an_agent_moving_to_another_replica_is_listed_once_held_by_the_new_one(
    start_replica: StartReplica, connect_agent: ConnectAgent
) -> None:
    a = await start_replica("replica-a")
    b = await start_replica("replica-b")
    old = await connect_agent(a)
    await old.register(SITE_A_ASSETS, agent_id="gw-1")
    await eventually(lambda: _sees(b, 1, 3, holder="replica-a"), "b sees gw-1 on a", VIEW_S)

    # The agent reconnects to B while A has not noticed its old stream end (half-open).
    new = await connect_agent(b)
    await new.register(SITE_A_ASSETS, agent_id="gw-1")
    for replica in (a, b):
        await eventually(
            lambda r=replica: _sees(r, 1, 3, holder="replica-b"),  # type: ignore[misc]
            f"{replica.config.headend_id} lists gw-1 once, on replica-b",
            VIEW_S,
        )
    # A's old stream ends at last: it must not take B's claim with it.
    await old.end()
    await asyncio.sleep(0.5)
    for replica in (a, b):
        assert await _sees(replica, 1, 3, holder="replica-b")
    assert a.cluster_presence is not None
    assert a.cluster_presence.replica_of_asset(SITE_A_ASSETS[0]) == "replica-b"


async def test_an_agent_reconnecting_to_the_same_replica_stays_listed_after_its_old_stream_ends(
    start_replica: StartReplica, connect_agent: ConnectAgent
) -> None:
    fast = {"HEADEND_BUS_PRESENCE_MAX_AGE_S": "3"}
    a = await start_replica("replica-a", **fast)
    b = await start_replica("replica-b", **fast)
    old = await connect_agent(a)
    await old.register(SITE_A_ASSETS, agent_id="gw-1")
    new = await connect_agent(a)
    await new.register(SITE_A_ASSETS, agent_id="gw-1")
    await old.end()
    await asyncio.sleep(2.5)  # two refreshes: the new stream's entry is kept alive
    for replica in (a, b):
        assert await _sees(replica, 1, 3, holder="replica-a")
    await new.end()
    await eventually(lambda: _sees(b, 0, 0), "b to see gw-1 gone", VIEW_S)


async def test_a_replica_that_dies_has_its_entries_expire_and_its_sessions_closed(
    start_replica: StartReplica, connect_agent: ConnectAgent
) -> None:
    fast = {"HEADEND_BUS_PRESENCE_MAX_AGE_S": "3"}
    a = await start_replica("replica-a", **fast)
    b = await start_replica("replica-b", **fast)
    agent = await connect_agent(b)
    await agent.register(SITE_A_ASSETS, agent_id="gw-1")
    await eventually(lambda: _sees(a, 1, 3, holder="replica-b"), "a sees gw-1 on b", VIEW_S)
    assert a.cluster_presence is not None
    assert a.cluster_presence.replicas() == ["replica-a", "replica-b"]

    await crash_replica(b)
    for asset_id in SITE_A_ASSETS:
        assert await _open_sessions(a, asset_id) == ["replica-b"], "left open by the crash"

    async def b_is_gone() -> bool:
        if not await _sees(a, 0, 0):
            return False
        return not [s for asset_id in SITE_A_ASSETS for s in await _open_sessions(a, asset_id)]

    # Entries live 3 s after their last write (refreshed every 1 s), and the watch
    # reports an expiry within about a second after that.
    await eventually(b_is_gone, "the survivor dropped b's agent and closed its sessions", 8.0)
    assert a.cluster_presence.replicas() == ["replica-a"]
    assert "der_cluster_replicas 1.0" in (await _get(a, "/metrics")).text


async def test_a_restarting_replica_closes_only_its_own_sessions_and_stale_entries(
    start_replica: StartReplica, connect_agent: ConnectAgent
) -> None:
    a = await start_replica("replica-a")
    b = await start_replica("replica-b")
    on_a = await connect_agent(a)
    await on_a.register(SITE_A_ASSETS, agent_id="gw-1")
    on_b = await connect_agent(b)
    await on_b.register([PV_1], site_id=SITE_B, agent_id="gw-2")
    await eventually(lambda: _sees(b, 2, 4), "b sees both agents", VIEW_S)

    await crash_replica(a)
    # The entries of the crashed run live on (15 s), so B still lists gw-1 on replica-a.
    assert await _sees(b, 2, 4)

    await start_replica("replica-a")
    for asset_id in SITE_A_ASSETS:
        assert await _open_sessions(b, asset_id) == [], "the restart closed its own sessions"
    assert await _open_sessions(b, PV_1) == ["replica-b"], "and left replica-b's open"
    # The restarted replica deleted its previous run's entries: gone from B's view too.
    await eventually(lambda: _sees(b, 1, 1, holder="replica-b"), "b lists gw-2 only", VIEW_S)


async def test_a_bus_outage_longer_than_the_max_age_keeps_agents_and_reclaims_after(
    start_replica: StartReplica,
    connect_agent: ConnectAgent,
    nats_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fast = {"HEADEND_BUS_PRESENCE_MAX_AGE_S": "3"}
    host, _, port = nats_url.removeprefix("nats://").rpartition(":")
    async with TcpProxy(host, int(port)) as proxy:
        a = await start_replica(
            "replica-a", HEADEND_BUS_URL=f"nats://{proxy.addr}?reconnect_wait=0.2", **fast
        )
        b = await start_replica("replica-b", **fast)
        agent = await connect_agent(a)
        await agent.register(SITE_A_ASSETS, agent_id="gw-1")
        await eventually(lambda: _sees(b, 1, 3, holder="replica-a"), "b sees gw-1", VIEW_S)

        proxy.cut()
        # A's entries expire on the server; B takes replica-a for dead meanwhile.
        await eventually(lambda: _sees(b, 0, 0), "b to see replica-a's entries expire", 8.0)

        async def sessions_closed() -> bool:
            return not [s for x in SITE_A_ASSETS for s in await _open_sessions(b, x)]

        await eventually(sessions_closed, "b to close replica-a's sessions", 3.0)
        ack = await agent.telemetry(1, [sample(SITE_A_ASSETS[0])])
        assert ack.seq == 1, "the agent's link carries on without the bus"
        assert await _sees(a, 1, 3, holder="replica-a"), "a still counts its own agent"
        assert (await _get(a, "/healthz")).json()["status"] == "degraded"

        proxy.heal()
        for replica in (a, b):
            await eventually(
                lambda r=replica: _sees(r, 1, 3, holder="replica-a"),  # type: ignore[misc]
                f"{replica.config.headend_id} to list gw-1 on replica-a again",
                6.0,
            )

        async def sessions_open_again() -> bool:
            opened = [await _open_sessions(b, asset_id) for asset_id in SITE_A_ASSETS]
            return opened == [["replica-a"]] * 3

        await eventually(sessions_open_again, "replica-a's live sessions written open again", 3.0)
    outage = [r for r in caplog.records if "unavailable for presence" in r.getMessage()]
    assert len(outage) == 1, "the outage is logged once, not on every tick"
