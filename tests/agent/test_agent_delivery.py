"""Telemetry delivery over real gRPC: stream id and seq, acknowledgements with
``stored_through``, the in-flight window, replay pacing and live-first interleaving, the
buffer bounds at the agent, buffer figures in heartbeats and stats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from der_sdk.agent_config import BufferConfig
from der_sdk.wire import codec
from tests.agent.conftest import A1, A2, MakeAgent, fast_config
from tests.agent.fake_headend import FakeHeadend


async def _unreachable() -> FakeHeadend:
    """A headend on a known free port, not listening yet."""
    headend = FakeHeadend()
    await headend.start()
    await headend.stop()
    return headend


async def test_register_carries_the_stream_id_and_batches_carry_seq_and_floor(
    headend: FakeHeadend, make_agent: MakeAgent
) -> None:
    agent = make_agent(headend.address)
    await agent.start()
    stream = await headend.wait_stream()
    await headend.wait_for(lambda: len(stream.batches) >= 3)
    assert stream.stream_id == agent.telemetry.stream_id == agent.stats().stream_id
    assert len(stream.stream_id) == 36  # a UUID
    first, second = stream.batches[:2]
    assert (first.seq, second.seq) == (1, 2)
    assert first.floor_seq == 1  # nothing below was acknowledged or dropped yet
    await headend.wait_for(lambda: agent.stats().buffer_batches <= 1)  # acknowledged: gone


@pytest.mark.parametrize("reads_columns", [True, False])
async def test_telemetry_goes_by_column_only_to_a_headend_that_says_it_reads_columns(
    make_agent: MakeAgent, reads_columns: bool
) -> None:
    async with FakeHeadend(telemetry_columns=reads_columns) as headend:
        agent = make_agent(headend.address)
        await agent.start()
        stream = await headend.wait_stream()
        await headend.wait_for(lambda: len(stream.batches) >= 2)
        for batch in stream.batches:
            assert batch.HasField("columns") is reads_columns
            assert bool(batch.samples) is not reads_columns
        assert {s.asset_id for s in stream.samples()} == {A1, A2}


async def test_acknowledged_batches_are_forgotten_through_stored_through_and_not_resent(
    make_agent: MakeAgent,
) -> None:
    async with FakeHeadend(auto_ack=False) as headend:
        agent = make_agent(headend.address)
        await agent.start()
        first = await headend.wait_stream()
        await headend.wait_for(lambda: len(first.batches) >= 6)
        first.ack(5, stored_through=3)  # 1..3 and 5 are stored; 4 is not
        await headend.wait_for(lambda: 5 not in agent.telemetry and 4 in agent.telemetry)
        assert agent.telemetry.floor_seq == 4
        first.close()

        second = await headend.wait_stream(index=1)
        await headend.wait_for(lambda: {4, 6} <= set(second.seqs))
        assert not {1, 2, 3, 5} & set(second.seqs)
        # Live batches go first, so a batch sampled since the reconnect may precede it;
        # of the held ones, 4 is the first sent again, and it carries the floor.
        assert min(second.seqs) == 4
        replayed = next(b for b in second.batches if b.seq == 4)
        assert replayed.floor_seq == 4


async def test_window_of_unacknowledged_batches_blocks_sending_not_sampling(
    make_agent: MakeAgent,
) -> None:
    async with FakeHeadend(auto_ack=False) as headend:
        agent = make_agent(headend.address)
        agent.link.window = 4
        await agent.start()
        stream = await headend.wait_stream()
        await headend.wait_for(lambda: len(stream.batches) >= 4)
        held = agent.stats().buffer_batches
        await headend.wait_for(lambda: agent.stats().buffer_batches >= held + 4)  # sampling on
        assert len(stream.batches) == 4  # the window is full: nothing more is sent

        stream.ack(2, stored_through=2)  # two slots free up
        await headend.wait_for(lambda: len(stream.batches) >= 6)
        await asyncio.sleep(0.15)
        assert len(stream.batches) == 6
        stream.ack(6, stored_through=6)
        await headend.wait_for(lambda: len(stream.batches) >= 10)
        assert stream.seqs[:10] == list(range(1, 11))


async def test_backlog_is_paced_and_live_batches_overtake_it(make_agent: MakeAgent) -> None:
    headend = await _unreachable()
    # 2 samples per batch; 40 samples/s: a one-second burst of 20 batches, then 20 a second
    config = fast_config(buffer=BufferConfig(replay_samples_per_s=40))
    agent = make_agent(headend.address, config=config)
    for _ in range(40):
        await agent.sample_once()
    await headend.start()
    try:
        await agent.start()
        stream = await headend.wait_stream()
        loop = asyncio.get_running_loop()
        began = loop.time()
        live_from = agent.link.stats.replay_from_seq
        assert live_from is not None and live_from > 40
        backlog = list(range(1, live_from))
        await headend.wait_for(lambda: set(backlog) <= set(stream.seqs), within=5)
        took = loop.time() - began
        seqs = stream.seqs
        assert [s for s in seqs if s < live_from] == backlog  # oldest first
        # what was left after the one-second burst went at 40 samples/s
        assert took >= (2 * len(backlog) - 40) / 40 * 0.9
        last_backlog = seqs.index(backlog[-1])
        live_before = [s for s in seqs[:last_backlog] if s >= live_from]
        assert len(live_before) >= 5  # live batches made during the replay went first
        assert live_before == sorted(live_before)
        # The headend has every backlog batch; the agent counts one as replay until that
        # batch's acknowledgement is back.
        await headend.wait_for(lambda: agent.stats().replay_batches == 0, within=5)
    finally:
        await agent.stop()
        await headend.stop()


async def test_heartbeats_carry_the_buffer_figures(make_agent: MakeAgent) -> None:
    async with FakeHeadend(auto_ack=False) as headend:
        agent = make_agent(headend.address, config=fast_config(heartbeat_interval_s=0.05))
        await agent.start()
        stream = await headend.wait_stream()
        await headend.wait_for(lambda: len(stream.heartbeats) >= 3)
        beat = stream.heartbeats[-1]
        assert beat.HasField("buffer")
        figures = codec.buffer_stats_from_pb(beat.buffer)
        assert figures.batches >= 1 and figures.samples == 2 * figures.batches
        assert figures.bytes > 0 and figures.oldest_age_s > 0
        assert figures.dropped_samples == 0
        live_from = agent.link.stats.replay_from_seq
        assert live_from is not None  # the batches from before the register are backlog
        assert figures.replay_batches == len([s for s in agent.telemetry.seqs() if s < live_from])


async def test_size_bound_at_the_agent_drops_oldest_and_tells_the_headend(
    make_agent: MakeAgent, tmp_path: Path
) -> None:
    headend = await _unreachable()
    config = fast_config(buffer=BufferConfig(max_mb=2000 / (1024 * 1024)))  # 2000 bytes
    agent = make_agent(headend.address, config=config, buffer_path=str(tmp_path / "b.sqlite3"))
    while agent.stats().batches_dropped < 3:
        await agent.sample_once()
    stats = agent.stats()
    assert stats.buffer_bytes <= 2000 and stats.samples_dropped == 2 * stats.batches_dropped
    floor = agent.telemetry.floor_seq
    assert floor == stats.batches_dropped + 1  # the oldest went
    [event] = await agent.outbox.events.all()
    assert event.kind == "telemetry_dropped" and event.data["first_seq"] == 1

    await headend.start()
    try:
        await agent.start()
        stream = await headend.wait_stream()
        await headend.wait_for(lambda: stream.events and stream.batches)
        assert stream.events[0].event_id == event.event_id
        data = msgspec.json.decode(stream.events[0].data_json)
        assert data["batches"] >= 1 and data["samples"] == 2 * data["batches"]
        # The sampler runs at start and may drop one more; a batch it adds after the
        # stream opened is live and goes ahead of the backlog, so the first batch the
        # headend sees is either the oldest held one or that live one.
        first = stream.batches[0]
        held_from = first.floor_seq
        assert held_from >= floor and first.seq >= held_from
        assert [(r.first, r.last) for r in first.dropped] == [(1, held_from - 1)]
        await headend.wait_for(
            lambda: {b.seq for b in stream.batches} >= set(range(held_from, first.seq + 1))
        )
        await headend.wait_for(lambda: agent.outbox.events.count == 0)  # EventAck: forgotten
        samples = [(s.asset_id, s.seq) for s in stream.samples()]
        assert (A1, 1) not in samples and (A2, 1) not in samples
    finally:
        await agent.stop()
        await headend.stop()
