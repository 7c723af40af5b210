"""Fault tests of the delivery guarantees in docs/durability.md.

Real processes, real TCP, real storage: the headend or the agent runs as a subprocess
where the test kills it with SIGKILL, and links go through :class:`TcpProxy`. Each test
has a bounded version for every run; longer versions are marked ``slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from der_sdk.models import TelemetrySample
from der_sdk.plugins import Plugins
from der_sdk.testing.devices import SimulatedDevicePlugin
from der_sdk.testing.faults import AgentProcess, HeadendProcess, TcpProxy
from der_sdk.testing.services import require_tcp_service
from der_sdk.wire import codec, pb
from der_sdk_agent.agent import Agent
from der_sdk_headend.service import HALF_OPEN_DETECTION_S
from tests.faults.conftest import (
    B1,
    B2,
    B3,
    LONE,
    OTHER_SITE,
    SITE,
    StoredRow,
    in_process_headend,
    stored_events,
    stored_rows,
    wait_until,
    write_agent_config,
)
from tests.faults.conftest import gateway_agent as _agent

BURST_BASE = datetime(2030, 1, 1, tzinfo=UTC)


def _us(ts: datetime) -> int:
    return codec.datetime_to_us(ts)


def _holes(rows: list[StoredRow], assets: list[str]) -> dict[str, list[int]]:
    """Per asset, the sample seqs missing between 1 and the highest one stored."""
    holes: dict[str, list[int]] = {}
    for asset in assets:
        seqs = {seq for a, _, seq in rows if a == asset}
        missing = sorted(set(range(1, max(seqs, default=0) + 1)) - seqs)
        if missing:
            holes[asset] = missing
    return holes


def _burst(n: int, size: int) -> list[TelemetrySample]:
    assets = (B1, B2, B3)
    return [
        TelemetrySample(
            asset_id=assets[i % 3],
            site_id=SITE,
            ts=BURST_BASE + timedelta(milliseconds=n * size + i),
            mw=0.1,
        )
        for i in range(size)
    ]


# ----------------------------------------------------------------------------- kill -9 headend


@pytest.mark.parametrize(
    "total",
    [pytest.param(10_000, id="10k"), pytest.param(100_000, id="100k", marks=pytest.mark.slow)],
)
async def test_headend_killed_mid_burst_stores_every_sample_exactly_once(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins, total: int
) -> None:
    db = tmp_path / "der.db"
    size = 100
    batches = total // size
    async with HeadendProcess(inventory_path, f"sqlite:///{db}", tmp_path) as headend:
        agent = _agent(
            tmp_path, inventory_path, der_plugins, headend.grpc_addr, telemetry_interval_s=3600
        )
        await agent.start()
        try:
            async with asyncio.timeout(15):
                await agent.wait_connected()
            for n in range(batches // 2):
                await agent.telemetry.append(_burst(n, size))

            async def some_acked() -> bool:
                return agent.stats().last_ack_seq > 0

            await wait_until(some_acked, within=15, what="the headend acknowledges a batch")
            await headend.kill()
            held_at_kill = agent.stats().buffer_samples
            for n in range(batches // 2, batches):
                await agent.telemetry.append(_burst(n, size))
            await headend.restart()

            async def drained() -> bool:
                return agent.stats().buffer_samples == 0

            await wait_until(drained, within=120, what="the agent's buffer drains")
        finally:
            await agent.stop()
    rows = [r for r in await stored_rows(db) if r[1] >= _us(BURST_BASE)]
    assert held_at_kill > 0, "the kill came while samples were still unacknowledged"
    assert len(rows) == total
    assert len({(a, ts) for a, ts, _ in rows}) == total


# ----------------------------------------------------------------------------- gaps


async def _drained(agent: Agent, what: str, within: float = 60) -> None:
    async def empty() -> bool:
        return agent.stats().connected and len(agent.telemetry) == 0

    await wait_until(empty, within=within, what=what)


def _headend_and_quiet_agent(
    tmp_path: Path, inventory_path: Path, plugins: Plugins, buffer: dict[str, float]
) -> tuple[Path, HeadendProcess, Agent]:
    """A headend process (not started) on SQLite, and an agent whose batches the test
    appends itself (its sampler polls once an hour), with ``buffer`` settings."""
    db = tmp_path / "der.db"
    headend = HeadendProcess(inventory_path, f"sqlite:///{db}", tmp_path)
    agent = _agent(
        tmp_path,
        inventory_path,
        plugins,
        headend.grpc_addr,
        telemetry_interval_s=3600,
        buffer=buffer,
    )
    return db, headend, agent


async def test_headend_killed_while_an_agent_replays_its_backlog_reports_no_gap(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins
) -> None:
    """Live batches go first: some newer than the backlog are acknowledged and deleted by
    the agent before the kill. The restarted headend never saw them; they are no gap."""
    size, backlog, live = 100, 100, 10
    db, headend, agent = _headend_and_quiet_agent(
        tmp_path, inventory_path, der_plugins, {"replay_samples_per_s": 2000}
    )
    await agent.start()
    try:
        for n in range(backlog):  # the headend is down: 10,000 samples of backlog
            await agent.telemetry.append(_burst(n, size))
        await headend.start()
        async with asyncio.timeout(15):
            await agent.wait_connected()
        live_seqs = [
            await agent.telemetry.append(_burst(n, size)) for n in range(backlog, backlog + live)
        ]

        async def live_acked_backlog_replaying() -> bool:
            buffer = agent.telemetry
            return buffer.floor_seq > 1 and not any(seq in buffer for seq in live_seqs)

        await wait_until(
            live_acked_backlog_replaying, within=15, what="live batches and some backlog are acked"
        )
        await headend.kill()
        held_at_kill = len(agent.telemetry)
        await headend.restart()
        await _drained(agent, "the agent replays the rest of its backlog")
        await agent.telemetry.append(_burst(backlog + live, size))  # live data goes on
        await _drained(agent, "the agent's next live batch is acknowledged")
    finally:
        await agent.stop()
        if headend.running:
            await headend.terminate()
    assert 0 < held_at_kill < backlog, "the kill came in the middle of the replay"
    rows = [r for r in await stored_rows(db) if r[1] >= _us(BURST_BASE)]
    total = (backlog + live + 1) * size
    assert len(rows) == total and len({(a, ts) for a, ts, _ in rows}) == total
    assert await stored_events(db, "telemetry_gap") == []


async def test_an_agent_buffer_that_drops_its_oldest_batches_is_one_gap_event_with_their_range(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins
) -> None:
    """The buffer overflows while the headend is down (and so forgets what it acknowledged):
    the restarted headend records exactly the seqs the agent dropped, once."""
    size = 100
    batch_bytes = len(codec.telemetry_payload(_burst(0, size)))
    db, headend, agent = _headend_and_quiet_agent(
        tmp_path, inventory_path, der_plugins, {"max_mb": batch_bytes * 5.5 / 2**20}
    )
    await headend.start()
    await agent.start()
    try:
        async with asyncio.timeout(15):
            await agent.wait_connected()
        for n in range(5):
            await agent.telemetry.append(_burst(n, size))
        await _drained(agent, "the first batches are acknowledged")
        await headend.kill()
        first = agent.telemetry.next_seq
        for n in range(5, 25):
            await agent.telemetry.append(_burst(n, size))  # holds 5: the 15 oldest go
        last = first + 14
        assert agent.stats().batches_dropped == 15
        await headend.restart()
        await _drained(agent, "the agent sends what it kept")
        await agent.telemetry.append(_burst(25, size))
        await _drained(agent, "the next live batch is acknowledged")
    finally:
        await agent.stop()
        if headend.running:
            await headend.terminate()
    gaps = await stored_events(db, "telemetry_gap")
    assert [(g["first_seq"], g["last_seq"], g["batches"]) for g in gaps] == [(first, last, 15)]
    assert agent.telemetry.dropped_ranges == [], "the headend's ack confirmed the range"
    rows = [r for r in await stored_rows(db) if r[1] >= _us(BURST_BASE)]
    assert len(rows) == (26 - 15) * size == len({(a, ts) for a, ts, _ in rows})


# ----------------------------------------------------------------------------- kill -9 agent


def _buffered_samples(path: Path) -> set[tuple[str, int]]:
    """(asset_id, ts µs) of every sample committed in an agent's buffer file."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        payloads = [row[0] for row in conn.execute("SELECT payload FROM telemetry")]
    keys: set[tuple[str, int]] = set()
    for payload in payloads:
        for sample in codec.samples_from_batch(pb.TelemetryBatch.FromString(payload)):
            keys.add((sample.asset_id, codec.datetime_to_us(sample.ts)))
    return keys


@pytest.mark.parametrize(
    "buffering_s",
    [pytest.param(2.0, id="2s"), pytest.param(30.0, id="30s", marks=pytest.mark.slow)],
)
async def test_agent_killed_while_buffering_loses_no_committed_sample(
    tmp_path: Path, inventory_path: Path, buffering_s: float
) -> None:
    db = tmp_path / "der.db"
    buffer = tmp_path / "agent.sqlite3"
    config = write_agent_config(tmp_path / "agent.yaml", telemetry_interval_s=0.05)
    headend = HeadendProcess(inventory_path, f"sqlite:///{db}", tmp_path)
    agent = AgentProcess(
        inventory_path,
        headend.grpc_addr,
        tmp_path,
        site_id=SITE,
        agent_config_path=config,
        env={"AGENT_BUFFER_PATH": str(buffer)},
    )
    try:
        await agent.start()  # the headend is not running: the agent buffers
        await asyncio.sleep(buffering_s)

        async def buffered_enough() -> bool:
            # a loaded machine can take most of the sleep to start the agent process
            try:
                return len(await asyncio.to_thread(_buffered_samples, buffer)) >= 3 * 10
            except sqlite3.Error:  # the agent has not created its buffer file yet
                return False

        await wait_until(buffered_enough, within=30, what="the agent to commit 30 samples")
        await agent.kill()
        committed = await asyncio.to_thread(_buffered_samples, buffer)
        assert len(committed) >= 3 * 10, "the agent committed samples while buffering"

        await headend.start()
        await agent.restart()

        async def all_stored() -> bool:
            keys = {(a, ts) for a, ts, _ in await stored_rows(db)}
            return committed <= keys

        await wait_until(all_stored, within=60, what="every committed sample is stored")
    finally:
        for process in (agent, headend):
            if process.running:
                await process.kill()
    rows = await stored_rows(db)
    assert len(rows) == len({(a, ts) for a, ts, _ in rows}), "no sample is stored twice"


# ----------------------------------------------------------------------------- blackhole


async def test_blackholed_link_is_noticed_within_40s_and_heals_without_loss(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins
) -> None:
    assert HALF_OPEN_DETECTION_S <= 40
    db = tmp_path / "der.db"
    headend = await in_process_headend(inventory_path, db, der_plugins)
    try:
        async with TcpProxy("127.0.0.1", headend.grpc_port) as proxy:
            agent = _agent(
                tmp_path, inventory_path, der_plugins, proxy.addr, telemetry_interval_s=0.2
            )
            await agent.start()
            try:
                async with asyncio.timeout(15):
                    await agent.wait_connected()
                await asyncio.sleep(1.0)
                loop = asyncio.get_running_loop()
                proxy.blackhole()
                started = loop.time()
                noticed: dict[str, float] = {}

                async def both_noticed() -> bool:
                    if "agent" not in noticed and not agent.stats().connected:
                        noticed["agent"] = loop.time() - started
                    if "headend" not in noticed and not headend.presence.streams():
                        noticed["headend"] = loop.time() - started
                    return len(noticed) == 2

                await wait_until(both_noticed, within=45, what="both sides notice the silence")
                assert noticed["agent"] <= 40, noticed
                assert noticed["headend"] <= 40, noticed
                buffered = agent.stats().buffer_samples
                assert buffered > 0, "the agent kept sampling into its buffer meanwhile"

                proxy.heal()

                async def drained() -> bool:
                    stats = agent.stats()
                    return stats.connected and stats.reconnects >= 1 and stats.buffer_samples <= 3

                await wait_until(drained, within=60, what="the agent reconnects and drains")
            finally:
                await agent.stop()
    finally:
        await headend.stop()
    rows = await stored_rows(db)
    assert len(rows) == len({(a, ts) for a, ts, _ in rows}), "nothing is stored twice"
    assert _holes(rows, [B1, B2, B3]) == {}, "no sample is missing"
    assert (
        min(max(seq for a, _, seq in rows if a == x) for x in (B1, B2, B3)) > 5 * (noticed["agent"])
    ), "samples from the whole outage were stored"


# ----------------------------------------------------------------------------- storage stalls


async def _healthz(url: str) -> tuple[int, dict[str, object]]:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"{url}/healthz")
        return response.status_code, response.json()


async def _stall_and_recover(
    tmp_path: Path,
    inventory_path: Path,
    plugins: Plugins,
    headend: HeadendProcess,
    *,
    stall: object,
    stall_s: float,
    rows: object,
) -> None:
    """Run two agents against ``headend``, stall its storage for ``stall_s``, recover,
    and check bounded memory, agent buffering, degraded health and a full drain."""
    agents = [
        _agent(tmp_path, inventory_path, plugins, headend.grpc_addr, telemetry_interval_s=0.02),
        _agent(
            tmp_path,
            inventory_path,
            plugins,
            headend.grpc_addr,
            site_id=OTHER_SITE,
            name="lone",
            telemetry_interval_s=0.02,
        ),
    ]
    for agent in agents:
        await agent.start()
    try:
        for agent in agents:
            async with asyncio.timeout(15):
                await agent.wait_connected()
        await asyncio.sleep(1.0)
        rss_before = headend.rss_bytes() or 0
        release = await stall()  # type: ignore[operator]
        peak = rss_before
        degraded = False
        loop = asyncio.get_running_loop()
        ends = loop.time() + stall_s
        while loop.time() < ends:
            peak = max(peak, headend.rss_bytes() or 0)
            code, body = await _healthz(headend.http_url)
            degraded = degraded or (code == 503 and body["status"] == "degraded")
            await asyncio.sleep(0.25)
        buffered = [a.stats().buffer_samples for a in agents]
        await release()
        assert degraded, "/healthz said degraded while storage stalled"
        assert all(b > 0 for b in buffered), f"agents buffered: {buffered}"
        assert peak - rss_before < 64 * 1024 * 1024, (
            f"headend memory grew {(peak - rss_before) / 1e6:.0f} MB during the stall"
        )

        async def drained() -> bool:
            code, _ = await _healthz(headend.http_url)
            return code == 200 and all(a.stats().buffer_samples <= 5 for a in agents)

        await wait_until(drained, within=120, what="the backlog drains and health is ok")
    finally:
        for agent in agents:
            await agent.stop()
    stored: list[StoredRow] = await rows()  # type: ignore[operator]
    assert len(stored) == len({(a, ts) for a, ts, _ in stored})
    assert _holes(stored, [B1, B2, B3, LONE]) == {}, "no sample is missing after the stall"


@pytest.mark.parametrize(
    "stall_s", [pytest.param(7.0, id="7s"), pytest.param(60.0, id="60s", marks=pytest.mark.slow)]
)
async def test_stalled_sqlite_keeps_memory_bounded_agents_buffer_and_everything_drains(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins, stall_s: float
) -> None:
    db = tmp_path / "der.db"
    env = {"INGEST_QUEUE_MAX_SAMPLES": "500"}
    async with HeadendProcess(inventory_path, f"sqlite:///{db}", tmp_path, env=env) as headend:
        lock = sqlite3.connect(db, timeout=30, check_same_thread=False, isolation_level=None)

        async def stall() -> object:
            # Another writer holds SQLite's write lock: the headend's writes time out.
            await asyncio.to_thread(lock.execute, "BEGIN IMMEDIATE")

            async def release() -> None:
                await asyncio.to_thread(lock.execute, "ROLLBACK")

            return release

        async def rows() -> list[StoredRow]:
            return await stored_rows(db)

        try:
            await _stall_and_recover(
                tmp_path,
                inventory_path,
                der_plugins,
                headend,
                stall=stall,
                stall_s=stall_s,
                rows=rows,
            )
        finally:
            lock.close()
        assert "writing telemetry failed" in headend.log_text()
        assert "writes recovered" in headend.log_text()


@pytest.mark.parametrize(
    "stall_s", [pytest.param(7.0, id="7s"), pytest.param(60.0, id="60s", marks=pytest.mark.slow)]
)
async def test_unreachable_postgres_keeps_memory_bounded_agents_buffer_and_everything_drains(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins, stall_s: float
) -> None:
    require_tcp_service("PostgreSQL", "127.0.0.1", 5432)
    postgres = pytest.importorskip("der_sdk_postgres.testing", reason="needs der-sdk-postgres")
    asyncpg = pytest.importorskip("asyncpg")
    async with postgres.temporary_database() as url, TcpProxy("127.0.0.1", 5432) as proxy:
        via_proxy = url.replace("127.0.0.1:5432", proxy.addr).replace("localhost:5432", proxy.addr)
        assert via_proxy != url, url
        env = {"INGEST_QUEUE_MAX_SAMPLES": "500"}
        async with HeadendProcess(inventory_path, via_proxy, tmp_path, env=env) as headend:

            async def stall() -> object:
                proxy.cut()  # the server is gone: connections reset, new ones refused

                async def release() -> None:
                    proxy.heal()

                return release

            async def rows() -> list[StoredRow]:
                conn = await asyncpg.connect(url)
                try:
                    records = await conn.fetch("SELECT asset_id, ts, seq FROM telemetry")
                finally:
                    await conn.close()
                return [(str(r[0]), _us(r[1]), int(r[2])) for r in records]

            await _stall_and_recover(
                tmp_path,
                inventory_path,
                der_plugins,
                headend,
                stall=stall,
                stall_s=stall_s,
                rows=rows,
            )


# ----------------------------------------------------------------------------- dispatch


async def test_lost_ack_after_applied_writes_the_device_once_and_the_state_ends_applied(
    tmp_path: Path,
    inventory_path: Path,
    der_plugins: Plugins,
    der_test_device: SimulatedDevicePlugin,
) -> None:
    db = tmp_path / "der.db"
    headend = await in_process_headend(inventory_path, db, der_plugins)
    try:
        async with TcpProxy("127.0.0.1", headend.grpc_port) as proxy:
            agent = _agent(
                tmp_path,
                inventory_path,
                der_plugins,
                proxy.addr,
                default_adapter="test-device",
            )
            await agent.start()
            try:
                async with asyncio.timeout(15):
                    await agent.wait_connected()
                device = der_test_device.device(B2)
                write = device.write_setpoint

                async def write_then_lose_the_link(mw: float) -> None:
                    await write(mw)
                    proxy.cut()  # the agent's SetpointAck(applied) dies with the link

                device.write_setpoint = write_then_lose_the_link  # type: ignore[method-assign]
                async with httpx.AsyncClient(base_url=headend.http_url, timeout=5) as http:
                    created = await http.post("/dispatch", json={"asset_id": B2, "mw": 0.7})
                    assert created.status_code == 202, created.text
                    dispatch_id = created.json()["dispatch_id"]

                    async def written() -> bool:
                        return bool(device.writes)

                    await wait_until(written, within=10, what="the device is written")
                    device.write_setpoint = write  # type: ignore[method-assign]
                    proxy.heal()

                    async def applied() -> dict[str, object] | None:
                        body = (await http.get(f"/dispatch/{dispatch_id}")).json()
                        return body if body["state"] == "applied" else None

                    record = await wait_until(applied, within=30, what="the dispatch is applied")
                    assert agent.stats().reconnects >= 1, "the outcome came on a new stream"
                    await asyncio.sleep(0.5)  # any second write would have happened by now
            finally:
                await agent.stop()
    finally:
        await headend.stop()
    assert device.writes == [0.7], "the device was written once"
    states = [e["state"] for e in record["events"]]  # type: ignore[union-attr, index]
    assert states[-1] == "applied"
    order = ["submitted", "sent", "acked", "applied"]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)


async def test_an_expired_dispatch_is_never_applied(
    tmp_path: Path,
    inventory_path: Path,
    der_plugins: Plugins,
    der_test_device: SimulatedDevicePlugin,
) -> None:
    db = tmp_path / "der.db"
    headend = await in_process_headend(inventory_path, db, der_plugins)
    try:
        async with httpx.AsyncClient(base_url=headend.http_url, timeout=5) as http:
            created = await http.post("/dispatch", json={"asset_id": LONE, "mw": 0.5, "ttl_s": 0.3})
            dispatch_id = created.json()["dispatch_id"]

            async def expired() -> bool:
                body = (await http.get(f"/dispatch/{dispatch_id}")).json()
                return bool(body["state"] == "expired")

            await wait_until(expired, within=10, what="the offline dispatch expires")
            agent = _agent(
                tmp_path,
                inventory_path,
                der_plugins,
                f"127.0.0.1:{headend.grpc_port}",
                site_id=OTHER_SITE,
                name="lone",
                default_adapter="test-device",
            )
            await agent.start()
            try:
                async with asyncio.timeout(15):
                    await agent.wait_connected()
                await asyncio.sleep(1.0)
            finally:
                await agent.stop()
            body = (await http.get(f"/dispatch/{dispatch_id}")).json()
    finally:
        await headend.stop()
    assert der_test_device.device(LONE).writes == [], "the expired dispatch never reached it"
    assert body["state"] == "expired"


# ----------------------------------------------------------------------------- liveness


def test_keepalive_settings_notice_silence_within_40s_and_never_draw_too_many_pings() -> None:
    from der_sdk_agent.link import _CHANNEL_OPTIONS
    from der_sdk_headend.service import GRPC_SERVER_OPTIONS

    agent = dict(_CHANNEL_OPTIONS)
    headend = dict(GRPC_SERVER_OPTIONS)
    for side in (agent, headend):
        wait = side["grpc.keepalive_time_ms"] + min(
            side["grpc.keepalive_timeout_ms"], side["grpc.http2.ping_timeout_ms"]
        )
        assert wait <= 40_000, side
        assert side["grpc.http2.max_pings_without_data"] == 0, "pings go on while idle"
    assert (
        agent["grpc.keepalive_time_ms"]
        >= headend["grpc.http2.min_recv_ping_interval_without_data_ms"]
    ), "the agent never pings more often than the headend accepts"


@pytest.mark.slow
async def test_an_idle_agent_stays_connected_through_many_keepalive_pings(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins
) -> None:
    db = tmp_path / "der.db"
    headend = await in_process_headend(inventory_path, db, der_plugins)
    try:
        agent = _agent(
            tmp_path,
            inventory_path,
            der_plugins,
            f"127.0.0.1:{headend.grpc_port}",
            telemetry_interval_s=3600,
            heartbeat_interval_s=3600,
        )
        await agent.start()
        try:
            async with asyncio.timeout(15):
                await agent.wait_connected()
            await asyncio.sleep(95)  # four keepalive pings each way, nothing else
            stats = agent.stats()
            assert stats.connected and stats.reconnects == 0, "no GOAWAY too_many_pings"
        finally:
            await agent.stop()
    finally:
        await headend.stop()
