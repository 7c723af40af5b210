"""Ingest in bus mode (issue 17, items 3 and 4): agents are acknowledged once JetStream holds
their batches, the stream writers store them into PostgreSQL exactly once whatever
happens to the database or to a writer, a full stream holds the agents back, and the
latest telemetry received on one replica shows on every replica.

Real NATS (JetStream) and real PostgreSQL; replicas and agents run in this process.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import asyncpg
import httpx
import msgspec
import pytest
from der_sdk_postgres.storage import PostgresStorage

from der_sdk.models import SeqRange, TelemetrySample
from der_sdk.wire import codec, pb
from der_sdk_headend.cluster.ingest import (
    LATEST_TOPIC,
    StreamWriters,
    decode_message,
    encode_batches,
)
from der_sdk_headend.ingest.telemetry import SinkBatch
from der_sdk_headend.presence import AgentStream
from der_sdk_headend.service import Headend
from tests.cluster.ingest_kit import ClusterKit, cluster, pg_refusing, stored_count, within
from tests.headend.headend_kit import BESS_1, BESS_2, RawAgent, sample

__all__ = ["cluster"]


ASSETS = [BESS_1, BESS_2]


def batch(seq: int, per_asset: int = 5) -> list[TelemetrySample]:
    """``per_asset`` samples of each asset, a second apart, distinct for each ``seq``."""
    base = seq * 1000
    return [sample(a, seconds=base + i) for a in ASSETS for i in range(per_asset)]


async def send(agent: RawAgent, seq: int, per_asset: int = 5) -> int:
    """Send batch ``seq``; return its acknowledged seq."""
    ack = await agent.telemetry(seq, batch(seq, per_asset))
    return int(ack.seq)


async def backlog_messages(headend: Headend) -> int:
    assert headend.cluster is not None
    return (await headend.cluster.bus.telemetry.backlog()).messages


async def test_a_batch_is_acknowledged_once_jetstream_holds_it_and_stored_exactly_once(
    cluster: ClusterKit,
) -> None:
    replica = await cluster.replica()
    writers = replica.stream_writers
    assert writers is not None
    await writers.close()  # nothing consumes the stream: the ack cannot wait for PostgreSQL
    agent = await cluster.agent(replica, ASSETS, "gw-1")

    assert await send(agent, 1) == 1
    assert await send(agent, 2) == 2
    assert await backlog_messages(replica) >= 1
    assert await stored_count(cluster.database_url) == (0, 0)

    assert await send(agent, 2) == 2  # sent again (a lost ack): stored once all the same
    writers.start()

    async def stored() -> bool:
        return (await stored_count(cluster.database_url))[0] >= 20

    await within(stored, 10, "both batches stored")
    await within(lambda: _empty(replica), 5, "the stream emptied")
    assert await stored_count(cluster.database_url) == (20, 20)
    assert writers.stats().messages_acked >= 2


async def _empty(headend: Headend) -> bool:
    return await backlog_messages(headend) == 0


async def test_agents_are_acknowledged_while_postgres_refuses_and_every_sample_is_stored_once_after(
    cluster: ClusterKit,
) -> None:
    await _postgres_outage(cluster, seconds=5.0)


@pytest.mark.slow
async def test_a_60_s_postgres_outage_under_load_loses_and_duplicates_nothing(
    cluster: ClusterKit,
) -> None:
    await _postgres_outage(cluster, seconds=60.0)


async def _postgres_outage(cluster: ClusterKit, seconds: float) -> None:
    replica = await cluster.replica()
    writers = replica.stream_writers
    assert writers is not None
    agent = await cluster.agent(replica, ASSETS, "gw-1")
    assert await send(agent, 1) == 1
    loop = asyncio.get_running_loop()
    seq = 1
    async with httpx.AsyncClient(base_url=replica.http_url) as http:
        async with pg_refusing(cluster.database_url):
            end = loop.time() + seconds
            saw_degraded = False
            while loop.time() < end:
                seq += 1
                # each batch is acknowledged although PostgreSQL refuses every connection
                assert await send(agent, seq) == seq
                health = await http.get("/healthz")
                reason = writers.health_reason() or ""
                if health.status_code == 503 and "cannot store telemetry" in reason:
                    saw_degraded = True
                await asyncio.sleep(0.1)
            assert saw_degraded, "/healthz was not degraded with the writers failing"

        expected = seq * 2 * 5

        async def all_stored() -> bool:
            return (await stored_count(cluster.database_url))[0] >= expected

        await within(all_stored, 30, f"all {expected} samples stored after the outage")
        assert await stored_count(cluster.database_url) == (expected, expected)

        async def healthy() -> bool:
            return (await http.get("/healthz")).status_code == 200

        await within(healthy, 10, "/healthz ok again")


async def test_a_writer_that_dies_mid_batch_leaves_it_to_be_delivered_again_and_stored_once(
    cluster: ClusterKit,
) -> None:
    replica = await cluster.replica(HEADEND_BUS_ACK_WAIT_S="1")
    writers = replica.stream_writers
    assert writers is not None
    await writers.close()
    agent = await cluster.agent(replica, ASSETS, "gw-1")
    assert await send(agent, 1) == 1
    assert await send(agent, 2) == 2

    # A writer of another replica fetches the batches, stores part of them, and dies
    # before it acknowledges anything (its connection ends, as with kill -9).
    dying = await cluster.bus(telemetry_ack_wait_s=1.0)
    consumer = await dying.telemetry.consumer()
    messages = await consumer.fetch(1, timeout_s=5.0)
    assert messages
    samples, _ = decode_message(messages[0].data)
    storage = PostgresStorage.from_url(cluster.database_url)
    await storage.open()
    try:
        await storage.append_telemetry(samples[: len(samples) // 2])
    finally:
        await storage.close()
    await dying.close()

    writers.start()

    async def stored() -> bool:
        return (await stored_count(cluster.database_url))[0] >= 20

    await within(stored, 10, "both batches stored after the redelivery")
    await within(lambda: _empty(replica), 5, "the stream emptied")
    assert await stored_count(cluster.database_url) == (20, 20)
    assert writers.stats().messages_redelivered >= 1


async def test_a_stream_writer_whose_fetch_fails_unexpectedly_carries_on_and_says_so(
    cluster: ClusterKit, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer that ended on an error it did not expect stored nothing from then on, in
    silence, while the stream filled (a nats-py timeout of an unexpected class once did
    it). It logs the first one and keeps fetching."""
    from der_sdk_nats.bus import _NatsConsumer

    fetch = _NatsConsumer.fetch
    failures = 0

    async def failing_first(self: _NatsConsumer, *args: object, **kwargs: object) -> object:
        nonlocal failures
        if failures < 4:  # each writer's first fetches
            failures += 1
            raise RuntimeError("an error no one expected")
        return await fetch(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_NatsConsumer, "fetch", failing_first)
    replica = await cluster.replica()
    agent = await cluster.agent(replica, ASSETS, "gw-1")
    assert await send(agent, 1) == 1

    async def stored() -> bool:
        return (await stored_count(cluster.database_url))[0] >= 10

    await within(stored, 15, "the batch stored once the writers fetch again")
    assert failures == 4
    assert "fetching from the telemetry stream failed unexpectedly" in caplog.text


async def test_a_full_stream_holds_the_agent_back_and_loses_nothing_once_space_frees(
    cluster: ClusterKit,
) -> None:
    replica = await cluster.replica(HEADEND_BUS_TELEMETRY_MAX_MESSAGES="2")
    writers = replica.stream_writers
    assert writers is not None
    await writers.close()
    agent = await cluster.agent(replica, ASSETS, "gw-1")
    assert await send(agent, 1) == 1
    assert await send(agent, 2) == 2
    assert await backlog_messages(replica) == 2

    await agent.send(_telemetry(3))
    reader = asyncio.create_task(agent.call.read())
    done, _ = await asyncio.wait({reader}, timeout=1.5)
    assert not done, "batch 3 was acknowledged although the stream is full"
    async with httpx.AsyncClient(base_url=replica.http_url) as http:
        health = await http.get("/healthz")
        assert health.status_code == 503
        assert "the bus telemetry stream is full (2 messages" in health.json()["reason"]
    assert replica.ingest.stats().write_failures >= 1
    assert await stored_count(cluster.database_url) == (0, 0)

    writers.start()  # the writers free space; the publish retried with backoff goes through
    message = await asyncio.wait_for(reader, 10)
    assert message.WhichOneof("msg") == "telemetry_ack", message
    assert message.telemetry_ack.seq == 3

    async def stored() -> bool:
        return (await stored_count(cluster.database_url))[0] >= 30

    await within(stored, 10, "all three batches stored")
    assert await stored_count(cluster.database_url) == (30, 30)

    async with httpx.AsyncClient(base_url=replica.http_url) as http:

        async def metrics_show_the_stream() -> bool:
            text = (await http.get("/metrics")).text
            return "der_bus_stream_max_messages 2.0" in text and (
                "der_bus_writer_samples_stored_total 30.0" in text
            )

        await within(metrics_show_the_stream, 5, "/metrics shows the stream and the writers")


def _telemetry(seq: int) -> pb.AgentMessage:
    return codec.agent_telemetry(seq, batch(seq))


async def test_latest_telemetry_received_on_one_replica_shows_on_another_within_a_second(
    cluster: ClusterKit,
) -> None:
    a = await cluster.replica()
    b = await cluster.replica()
    agent = await cluster.agent(a, ASSETS, "gw-1")
    assert await send(agent, 1) == 1
    newest = batch(1)[4].ts  # BESS_1's last sample of batch 1
    async with httpx.AsyncClient(base_url=b.http_url) as http:

        async def on_b() -> bool:
            response = await http.get(f"/telemetry/{BESS_1}")
            if response.status_code != 200:
                return False
            return bool(response.json()["ts"].startswith(newest.strftime("%Y-%m-%dT%H:%M:%S")))

        took = await within(on_b, 1.0, "replica B shows the sample replica A received")
    assert took <= 1.0
    assert b.ingest.latest(BESS_1) is not None
    assert b.ingest.latest(BESS_1).ts == newest  # type: ignore[union-attr]


@dataclass
class _Batch(SinkBatch):
    stream: AgentStream
    seq: int
    samples: list[TelemetrySample]
    gaps: list[SeqRange]


def _group(batches: int, per_asset: int, details_bytes: int = 0) -> list[_Batch]:
    stream = AgentStream(agent_id="gw-1", site_id="site", peer="test")
    details = {"note": "x" * details_bytes} if details_bytes else {}
    return [
        _Batch(
            stream,
            seq,
            [
                msgspec.structs.replace(s, details=details) if details else s
                for s in batch(seq, per_asset)
            ],
            [(seq * 100, seq * 100 + 1)] if seq == 1 else [],
        )
        for seq in range(1, batches + 1)
    ]


def test_a_group_is_split_into_messages_under_the_bus_limit_with_ids_stable_for_a_retry() -> None:
    group = _group(6, 50)
    messages = encode_batches(group, 4_000)
    assert len(messages) > 6  # each batch is split too: 100 samples do not fit 4 kB
    assert all(len(payload) <= 4_000 for _, payload in messages)
    assert len({msg_id for msg_id, _ in messages}) == len(messages)
    ids = [msg_id for msg_id, _ in messages]
    assert [i for i, _ in encode_batches(group, 4_000)] == ids  # published again: same ids

    samples: list[TelemetrySample] = []
    gaps = []
    for _, payload in messages:
        got_samples, got_gaps = decode_message(payload)
        samples.extend(got_samples)
        gaps.extend(got_gaps)
    assert samples == [s for b in group for s in b.samples]
    assert [(g.data["first_seq"], g.data["last_seq"]) for g in gaps] == [(100, 101)]

    # more batches queued behind the retried ones: the first messages keep their ids
    longer = [msg_id for msg_id, _ in encode_batches(_group(7, 50), 4_000)]
    assert longer[: len(ids) - 1] == ids[:-1]


def test_a_sample_too_large_for_one_message_is_kept_as_bad_without_its_details() -> None:
    group = _group(1, 1, details_bytes=5_000)
    messages = encode_batches(group, 4_000)
    samples = [s for _, payload in messages for s in decode_message(payload)[0]]
    assert len(samples) == 2
    assert all(s.quality == "bad" and s.details == {} for s in samples)
    assert all("too large for the message bus" in (s.quality_reason or "") for s in samples)


async def test_a_gap_the_agent_reports_travels_the_stream_and_is_recorded_once(
    cluster: ClusterKit,
) -> None:
    replica = await cluster.replica()
    agent = await cluster.agent(replica, ASSETS, "gw-1")
    await agent.send(codec.agent_telemetry(5, batch(5), floor_seq=1, dropped=[(1, 4)]))
    ack = await agent.recv_kind("telemetry_ack")
    assert (ack.seq, ack.stored_through) == (5, 5)  # the gap is on the stream: settled

    async def gap_events() -> list[tuple[int, int]]:
        conn = await asyncpg.connect(cluster.database_url)
        try:
            rows = await conn.fetch("SELECT data FROM events WHERE kind = 'telemetry_gap'")
        finally:
            await conn.close()
        found = [json.loads(r["data"]) if isinstance(r["data"], str) else r["data"] for r in rows]
        return [(d["first_seq"], d["last_seq"]) for d in found]

    async def recorded() -> bool:
        return bool(await gap_events())

    await within(recorded, 10, "the gap event stored")
    await asyncio.sleep(0.5)
    assert await gap_events() == [(1, 4)]
    assert await stored_count(cluster.database_url) == (10, 10)


async def test_the_latest_of_more_assets_than_one_message_holds_is_broadcast_in_parts(
    cluster: ClusterKit,
) -> None:
    replica = await cluster.replica()
    bus = await cluster.bus()
    listener = await bus.subscribe(LATEST_TOPIC)
    writers = StreamWriters(bus, replica.storage, cluster.plugins, replica.ingest)
    samples = [sample(f"asset-{i:05d}", details={"pad": "x" * 200}) for i in range(5_000)]
    assert len(msgspec.msgpack.encode(samples)) > bus.max_message_bytes

    await writers._broadcast_latest(samples)

    received: list[str] = []
    while len(received) < len(samples):
        payload = await asyncio.wait_for(anext(listener), 5)
        assert len(payload) <= bus.max_message_bytes
        part = msgspec.msgpack.decode(payload, type=list[TelemetrySample])
        received.extend(s.asset_id for s in part)
    assert sorted(received) == [s.asset_id for s in samples]


async def test_a_real_agent_buffers_while_the_stream_is_full_and_every_sample_arrives_after(
    cluster: ClusterKit,
) -> None:
    from der_sdk_agent.testing import AgentRunner

    replica = await cluster.replica(HEADEND_BUS_TELEMETRY_MAX_MESSAGES="3")
    writers = replica.stream_writers
    assert writers is not None
    await writers.close()
    async with httpx.AsyncClient(base_url=replica.http_url) as http:
        runner = AgentRunner(replica, cluster.plugins, http)
        try:
            link = await runner(adapter_type="sim-bess", assets=ASSETS)
            agent = link.agent

            async def buffering() -> bool:
                return agent.stats().buffer_batches >= 10

            await within(buffering, 10, "the agent buffers behind the full stream")
            assert await backlog_messages(replica) == 3
            held = agent.stats()

            writers.start()

            async def drained() -> bool:
                return agent.stats().buffer_batches <= 2

            await within(drained, 20, "the agent's buffer drained into the stream")
            await agent.stop()
            await within(lambda: _empty(replica), 10, "the stream emptied")
        finally:
            await runner.close()
    assert held.samples_dropped == 0
    conn = await asyncpg.connect(cluster.database_url)
    try:
        rows = await conn.fetch(
            "SELECT asset_id, count(*) AS n, min(seq) AS lo, max(seq) AS hi "
            "FROM telemetry GROUP BY asset_id"
        )
    finally:
        await conn.close()
    assert {r["asset_id"] for r in rows} == set(ASSETS)
    for r in rows:  # every sample the agent took, no hole, no duplicate
        assert r["n"] == r["hi"] - r["lo"] + 1, dict(r)
        assert r["n"] >= 10


async def test_through_a_bus_outage_a_replica_stores_its_agents_telemetry_directly(
    cluster: ClusterKit,
) -> None:
    from der_sdk.testing.faults import TcpProxy

    host, _, port = cluster.nats_url.removeprefix("nats://").rpartition(":")
    async with TcpProxy(host, int(port)) as proxy:
        replica = await cluster.replica(
            # a publish the cut leaves unanswered gives up after 1 s (not 5), then the
            # batch is stored directly: well within the test agent's 5 s wait for its ack
            HEADEND_BUS_URL=f"nats://{proxy.addr}?reconnect_wait=0.2&request_timeout=1"
        )
        agent = await cluster.agent(replica, ASSETS, "gw-1")
        assert await send(agent, 1) == 1

        proxy.cut()
        assert await send(agent, 2) == 2  # acknowledged after PostgreSQL committed it
        assert await stored_count(cluster.database_url) >= (10, 10)

        proxy.heal()
        assert replica.cluster is not None
        bus = replica.cluster.bus

        async def connected() -> bool:
            return bus.state == "connected"

        await within(connected, 10, "the replica's bus reconnected")
        assert await send(agent, 3) == 3

        async def stored() -> bool:
            return (await stored_count(cluster.database_url))[0] >= 30

        await within(stored, 30, "every batch stored")  # 10 s was short on a loaded CI run
        assert await stored_count(cluster.database_url) == (30, 30)
        assert (await bus.telemetry.backlog()).messages == 0
