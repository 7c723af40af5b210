"""Headend durability: acknowledgements after commit, gaps, backpressure, the dispatch
lifecycle (acked, outcome acks, re-sends, expiry, idempotency), agent events, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    SITE_A_ASSETS,
    WAIT_S,
    ConnectAgent,
    eventually,
    sample,
)

from der_sdk.models import TelemetrySample, utc_now
from der_sdk.storage.sqlite import SQLiteStorage
from der_sdk.wire import codec, pb
from der_sdk_headend.service import Headend


async def _register(agent: object, assets: Sequence[str] = SITE_A_ASSETS) -> None:
    await agent.register(assets)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- telemetry


async def test_acks_carry_the_contiguous_watermark_and_the_agents_dropped_ranges_are_gap_events(
    headend: Headend, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.send(
        codec.agent_register(
            agent_id="gw-1",
            site_id=headend.inventory.asset(BESS_1).site_id,
            assets={BESS_1: "sim-bess"},
            sdk_version="test",
            plugins={},
            stream_id="buffer-1",
        )
    )
    await agent.recv_kind("register_ack")

    async def batch(
        seq: int, floor: int, second: int, dropped: Sequence[tuple[int, int]] = ()
    ) -> pb.TelemetryAck:
        message = codec.agent_telemetry(seq, [sample(BESS_1, seconds=second)], floor, dropped)
        await agent.send(message)
        ack: pb.TelemetryAck = await agent.recv_kind("telemetry_ack")
        return ack

    first = await batch(1, 1, 1)
    assert (first.seq, first.stored_through) == (1, 1)
    ahead = await batch(3, 1, 3)  # replay interleaving: 3 before 2
    assert (ahead.seq, ahead.stored_through) == (3, 1)
    filled = await batch(2, 1, 2)
    assert (filled.seq, filled.stored_through) == (2, 3)
    # The agent dropped 4..6 by its buffer bounds: its floor is now 7, and it says so.
    jumped = await batch(7, 7, 7, dropped=[(4, 6)])
    assert (jumped.seq, jumped.stored_through) == (7, 7)
    # It lists the range until an ack covers it: a batch sent before that ack arrived.
    again = await batch(8, 8, 8, dropped=[(4, 6)])
    assert (again.seq, again.stored_through) == (8, 8)

    async def gap_recorded() -> bool:
        return bool(await headend.storage.events(kind="telemetry_gap"))

    await eventually(gap_recorded, "the gap is recorded")
    (gap,) = await headend.storage.events(kind="telemetry_gap")
    assert (gap.data["first_seq"], gap.data["last_seq"]) == (4, 6)
    assert gap.data["stream_id"] == "buffer-1"
    assert headend.ingest.stats().gaps == 1


async def test_an_agent_that_does_not_list_its_drops_gets_its_watermark_but_no_inferred_gap(
    headend: Headend, connect_agent: ConnectAgent
) -> None:
    """Older agents send only floor_seq: below it the headend cannot tell acknowledged seqs
    (perhaps by a previous headend run) from dropped ones, so it reports no gap."""
    agent = await connect_agent()
    await _register(agent)
    await agent.send(codec.agent_telemetry(1, [sample(BESS_1, seconds=1)], 1))
    assert (await agent.recv_kind("telemetry_ack")).stored_through == 1
    await agent.send(codec.agent_telemetry(7, [sample(BESS_1, seconds=7)], 7))
    assert (await agent.recv_kind("telemetry_ack")).stored_through == 7
    await agent.send(codec.agent_telemetry(8, [sample(BESS_1, seconds=8)], 8))
    assert (await agent.recv_kind("telemetry_ack")).stored_through == 8
    assert await headend.storage.events(kind="telemetry_gap") == []
    assert headend.ingest.stats().gaps == 0


async def test_a_resent_batch_is_acknowledged_again_and_stored_once(
    headend: Headend, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await _register(agent)
    samples = [sample(BESS_1, seconds=s) for s in range(5)]
    assert (await agent.telemetry(1, samples)).seq == 1
    assert (await agent.telemetry(1, samples)).seq == 1, "a duplicate is acknowledged"
    assert len(await headend.storage.telemetry_history(BESS_1, limit=100)) == 5


async def test_a_stalled_storage_keeps_memory_bounded_serves_latest_says_degraded_then_drains(
    headend: Headend,
    http: httpx.AsyncClient,
    connect_agent: ConnectAgent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest = headend.ingest
    ingest.max_queued_samples = 20
    ingest.stall_after_s = 0.2
    storage = headend.storage
    original = storage.append_telemetry
    release = asyncio.Event()

    async def stalled(samples: Sequence[TelemetrySample]) -> int:
        await release.wait()
        return await original(samples)

    monkeypatch.setattr(storage, "append_telemetry", stalled)
    agent = await connect_agent()
    await _register(agent)

    batches, size = 1000, 20  # about 6 MB: more than gRPC's flow-control windows hold
    pad = {"note": "x" * 200}

    async def send_all() -> None:
        for seq in range(1, batches + 1):
            rows = [
                sample(BESS_1, seconds=seq * size + i, mw=seq, details=pad) for i in range(size)
            ]
            await agent.send(codec.agent_telemetry(seq, rows))

    sender = asyncio.create_task(send_all())
    try:

        async def queue_full() -> bool:
            return ingest.stats().queued_samples >= ingest.max_queued_samples

        await eventually(queue_full, "the ingest queue fills")
        await asyncio.sleep(0.3)
        stats = ingest.stats()
        assert stats.queued_samples <= ingest.max_queued_samples, (
            "the queue never grows past its bound"
        )
        assert stats.stalled
        health = await http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        assert "waited" in health.json()["reason"] or "running" in health.json()["reason"]
        latest = await http.get(f"/telemetry/{BESS_1}")
        assert latest.status_code == 200, "latest values are served while storage is stalled"
        assert latest.json()["mw"] >= 1
        assert await original([]) == 0
        assert not sender.done(), "the reader stopped reading: gRPC flow control pushes back"

        release.set()
        await asyncio.wait_for(sender, WAIT_S)
        acked: set[int] = set()
        while batches not in acked:
            acked.add((await agent.recv_kind("telemetry_ack")).seq)
        assert acked == set(range(1, batches + 1))
    finally:
        release.set()
        sender.cancel()
    stored = await storage.telemetry_history(BESS_1, limit=batches * size + 1)
    assert len(stored) == batches * size
    assert (await http.get("/healthz")).status_code == 200


# ----------------------------------------------------------------------------- dispatch


async def _dispatch(http: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await http.post("/dispatch", json=body)


async def test_lifecycle_moves_sent_acked_applied_and_each_final_outcome_is_acknowledged(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await _register(agent)
    record = (await _dispatch(http, asset_id=BESS_2, mw=0.5)).json()
    setpoint = await agent.recv_kind("setpoint")
    await agent.send(codec.agent_setpoint_ack(setpoint.command_id, "acked", [], ts=utc_now()))

    async def acked() -> bool:
        body = (await http.get(f"/dispatch/{record['dispatch_id']}")).json()
        return bool(body["state"] == "acked")

    await eventually(acked, "the dispatch is acked")
    applied = [codec.Allocation(asset_id=BESS_2, mw=0.5)]
    await agent.send(codec.agent_setpoint_ack(setpoint.command_id, "applied", applied))
    assert (await agent.recv_kind("outcome_ack")).command_id == setpoint.command_id
    # The ack of the outcome was lost: the agent reports it again; nothing changes.
    await agent.send(codec.agent_setpoint_ack(setpoint.command_id, "applied", applied))
    assert (await agent.recv_kind("outcome_ack")).command_id == setpoint.command_id
    # A late "acked" never moves it back.
    await agent.send(codec.agent_setpoint_ack(setpoint.command_id, "acked", []))
    await agent.send(codec.agent_setpoint_ack(setpoint.command_id, "failed", applied))
    assert (await agent.recv_kind("outcome_ack")).command_id == setpoint.command_id

    body = (await http.get(f"/dispatch/{record['dispatch_id']}")).json()
    assert body["state"] == "applied"
    assert [e["state"] for e in body["events"]] == ["sent", "acked", "applied"]
    stamps = [datetime.fromisoformat(e["ts"]) for e in body["events"]]
    assert stamps == sorted(stamps)


async def test_a_dispatch_sent_on_a_stream_that_ended_is_sent_again_with_the_same_command_id(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    first = await connect_agent()
    await _register(first)
    record = (await _dispatch(http, asset_id=BESS_1, mw=0.25)).json()
    sent = await first.recv_kind("setpoint")
    await first.end()

    second = await connect_agent()
    await _register(second)
    again = await second.recv_kind("setpoint")
    assert again.command_id == sent.command_id == record["dispatch_id"]
    await second.send(
        codec.agent_setpoint_ack(
            again.command_id, "applied", [codec.Allocation(asset_id=BESS_1, mw=0.25)]
        )
    )
    await second.recv_kind("outcome_ack")
    body = (await http.get(f"/dispatch/{record['dispatch_id']}")).json()
    assert body["state"] == "applied"


async def test_a_submitted_dispatch_past_its_ttl_expires_and_is_never_sent(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    record = (await _dispatch(http, asset_id=BESS_1, mw=0.25, ttl_s=0.2)).json()
    assert record["state"] == "submitted"
    assert record["expires_at"] is not None

    async def expired() -> bool:
        body = (await http.get(f"/dispatch/{record['dispatch_id']}")).json()
        return bool(body["state"] == "expired")

    await eventually(expired, "the dispatch expires on its own")
    agent = await connect_agent()
    await _register(agent)
    assert (await _dispatch(http, asset_id=BESS_2, mw=0.1)).status_code == 202
    setpoint = await agent.recv_kind("setpoint")
    assert setpoint.asset_id == BESS_2, "the expired dispatch was never sent"


async def test_a_live_dispatch_carries_the_time_left_before_it_expires(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await _register(agent)
    expires_at = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    assert (
        await _dispatch(http, asset_id=BESS_1, mw=0.1, expires_at=expires_at)
    ).status_code == 202
    setpoint = await agent.recv_kind("setpoint")
    assert setpoint.HasField("expires_in_ms")
    assert 25_000 < setpoint.expires_in_ms <= 30_000
    assert setpoint.expires_at_us == codec.datetime_to_us(datetime.fromisoformat(expires_at))
    assert (await _dispatch(http, asset_id=BESS_1, mw=0.1)).status_code == 202
    assert not (await agent.recv_kind("setpoint")).HasField("expires_in_ms")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"ttl_s": 1, "expires_at": "2099-01-01T00:00:00Z"}, "not both"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "in the past"),
        ({"expires_at": "2099-01-01T00:00:00"}, "time zone"),
    ],
)
async def test_a_bad_expiry_is_refused_with_400_naming_it(
    http: httpx.AsyncClient, body: dict[str, object], words: str
) -> None:
    response = await _dispatch(http, asset_id=BESS_1, mw=0.1, **body)
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]


async def test_an_agent_reporting_expired_settles_the_dispatch_as_expired(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await _register(agent)
    record = (await _dispatch(http, asset_id=BESS_1, mw=0.1, ttl_s=5)).json()
    setpoint = await agent.recv_kind("setpoint")
    await agent.send(
        codec.agent_setpoint_ack(setpoint.command_id, "expired", [], reason="arrived too late")
    )
    await agent.recv_kind("outcome_ack")
    body = (await http.get(f"/dispatch/{record['dispatch_id']}")).json()
    assert body["state"] == "expired"


async def test_idempotency_key_returns_the_first_record_and_refuses_a_different_body(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await _register(agent)
    headers = {"Idempotency-Key": "order-42"}
    first = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.3}, headers=headers)
    assert first.status_code == 202
    again = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.3}, headers=headers)
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["dispatch_id"] == first.json()["dispatch_id"]
    other = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.4}, headers=headers)
    assert other.status_code == 409
    assert "order-42" in other.json()["detail"]

    await agent.recv_kind("setpoint")
    other_key = await http.post(
        "/dispatch", json={"asset_id": BESS_2, "mw": 0.1}, headers={"Idempotency-Key": "x"}
    )
    assert (await agent.recv_kind("setpoint")).command_id == other_key.json()["dispatch_id"]
    history = (await http.get("/dispatch/history")).json()
    assert len(history) == 2, "the repeated request created nothing and sent nothing"


# ----------------------------------------------------------------------------- events, metrics


async def test_an_agent_event_is_stored_once_and_acknowledged(
    headend: Headend, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await _register(agent)
    event = codec.AgentEventRecord(
        event_id="ev-1",
        ts=utc_now(),
        kind="telemetry_dropped",
        message="dropped 10 samples",
        data={"samples": 10},
    )
    await agent.send(codec.agent_event(event))
    assert (await agent.recv_kind("event_ack")).event_id == "ev-1"
    await agent.send(codec.agent_event(event))
    assert (await agent.recv_kind("event_ack")).event_id == "ev-1"
    stored = await headend.storage.events(kind="telemetry_dropped")
    assert len(stored) == 1
    assert stored[0].data["samples"] == 10
    assert stored[0].data["agent_id"] == "gw-1"


async def test_metrics_show_the_ingest_queue_and_each_agents_buffer(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await _register(agent)
    buffer = codec.BufferStats(samples=1234, batches=12, oldest_age_s=42.0, dropped_samples=7)
    await agent.send(codec.agent_heartbeat("gw-1", utc_now(), 1.0, buffer))

    async def reported() -> bool:
        text = (await http.get("/metrics")).text
        return 'der_agent_buffer_samples{agent_id="gw-1"} 1234' in text

    await eventually(reported, "the agent's buffer shows in /metrics")
    response = await http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "der_ingest_queue_samples 0" in text
    assert 'der_agent_buffer_dropped_samples_total{agent_id="gw-1"} 7' in text


# ----------------------------------------------------------------------------- migration


async def test_a_sqlite_file_from_schema_1_has_its_pending_dispatches_renamed_submitted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    storage = SQLiteStorage(str(path))
    await storage.open()
    await storage.close()
    record = (
        '{"dispatch_id":"d1","mw":1.0,"state":"pending","created_at":"2025-01-01T00:00:00Z",'
        '"updated_at":"2025-01-01T00:00:00Z","targets":[{"asset_id":"a","mw":1.0,'
        '"state":"pending"}]}'
    )

    def downgrade() -> None:  # what a schema-1 file holds
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (1)")
            db.execute(
                "INSERT INTO dispatches VALUES ('d1', 0, 0, 'a', NULL, 'pending', ?)", (record,)
            )
            db.execute(
                "INSERT INTO dispatch_events (dispatch_id, state, ts) VALUES ('d1', 'pending', 0)"
            )

    await asyncio.to_thread(downgrade)

    storage = SQLiteStorage(str(path))
    await storage.open()
    try:
        dispatch = await storage.get_dispatch("d1")
        assert dispatch is not None
        assert dispatch.state == "submitted"
        assert dispatch.targets[0].state == "submitted"
        assert [d.dispatch_id for d in await storage.dispatch_history(state="submitted")] == ["d1"]
        assert [e.state for e in await storage.dispatch_events("d1")] == ["submitted"]
    finally:
        await storage.close()


async def test_streams_beyond_max_agent_streams_are_refused_and_retry_later(
    inventory_path: Path, plugins: object
) -> None:
    import grpc
    from headend_kit import RawAgent, make_config

    headend = Headend(make_config(inventory_path, MAX_AGENT_STREAMS="1"), plugins=plugins)  # type: ignore[arg-type]
    await headend.start()
    try:
        async with (
            grpc.aio.insecure_channel(headend.grpc_addr) as one,
            grpc.aio.insecure_channel(headend.grpc_addr) as two,
        ):
            first = RawAgent(one)
            await first.register([BESS_1])
            second = RawAgent(two)
            code, _ = await second.outcome()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            await first.end()
            third = RawAgent(two)
            assert (await third.register([BESS_1])).accepted, "a slot is free again"
    finally:
        await headend.stop()


# ----------------------------------------------------------------------------- writers


async def test_two_writers_store_concurrently_and_a_failed_write_is_retried_then_acked(
    headend: Headend, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``writers=2`` two appends run at once; a failing one puts its batches back,
    unacknowledged, and they are stored and acknowledged on the retry."""
    from der_sdk_headend.ingest import TelemetryIngest

    await headend.ingest.close()
    ingest = TelemetryIngest(
        headend.inventory, headend.plugins, headend.storage, headend.presence, writers=2
    )
    monkeypatch.setattr(headend, "_ingest", ingest)
    monkeypatch.setattr(headend._link, "_ingest", ingest)
    storage = headend.storage
    original = storage.append_telemetry
    in_flight = 0
    most = 0
    gate = asyncio.Event()
    failures = [1]  # the first write fails once

    async def slow(samples: Sequence[TelemetrySample]) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await gate.wait()
            if failures:
                failures.pop()
                raise ConnectionError("storage went away")
            return await original(samples)
        finally:
            in_flight -= 1

    monkeypatch.setattr(storage, "append_telemetry", slow)
    ingest.start()
    try:
        agent = await connect_agent()
        await _register(agent)
        for seq in range(1, 5):  # each batch alone exceeds half a write: one per write
            rows = [sample(BESS_1, seconds=seq * 3000 + i) for i in range(3000)]
            await agent.send(codec.agent_telemetry(seq, rows))

        async def two_in_flight() -> bool:
            return in_flight == 2

        await eventually(two_in_flight, "two writes in flight at once")
        gate.set()
        acked: set[int] = set()
        while acked != {1, 2, 3, 4}:
            acked.add((await agent.recv_kind("telemetry_ack")).seq)
    finally:
        gate.set()
        await ingest.close()
    assert most == 2
    assert ingest.stats().write_failures == 1
    stored = await original([])
    assert stored == 0
    assert len(await storage.telemetry_history(BESS_1, limit=20_000)) == 12_000


async def test_healthz_says_degraded_when_storage_does_not_answer_its_health_check(
    headend: Headend, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from der_sdk_headend.rest import system

    assert "der_healthy 1.0" in (await http.get("/metrics")).text
    monkeypatch.setattr(system, "HEALTH_CHECK_TIMEOUT_S", 0.2)

    async def hangs() -> bool:
        await asyncio.sleep(30)
        return True

    monkeypatch.setattr(headend.storage, "healthy", hangs)
    response = await asyncio.wait_for(http.get("/healthz"), 5)
    assert response.status_code == 503
    assert "did not answer its health check within 0.2 s" in response.json()["reason"]
    # /metrics says the same, for an alert (deploy/prometheus/rules.yml: DerHeadendDegraded)
    metrics = await asyncio.wait_for(http.get("/metrics"), 5)
    assert "der_healthy 0.0" in metrics.text
