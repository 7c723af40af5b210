"""The ingest queue's space: reserved before a batch is decoded, handed out first come,
first served, and a release wakes only the readers whose batches now fit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from headend_kit import (
    BESS_1,
    SITE_A_ASSETS,
    WAIT_S,
    ConnectAgent,
    RawAgent,
    eventually,
    sample,
)

from der_sdk.models import TelemetrySample
from der_sdk.wire import codec
from der_sdk_headend.ingest.space import QueueSpace
from der_sdk_headend.service import Headend


async def _settle() -> None:
    """Let every task that can run, run (no timing: a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


def _waiter(space: QueueSpace, samples: int, granted: list[int]) -> asyncio.Task[None]:
    async def wait() -> None:
        await space.reserve(samples)
        granted.append(samples)

    return asyncio.create_task(wait())


async def test_a_release_wakes_only_the_waiter_it_made_room_for() -> None:
    space = QueueSpace(100)
    await space.reserve(100)
    granted: list[int] = []
    tasks = [_waiter(space, 40, granted) for _ in range(3)]
    await _settle()
    assert granted == [] and space.waiting == 3

    space.release(40)
    await _settle()
    assert granted == [40], "40 samples freed: one waiter of 40 woken, the others still wait"
    assert space.waiting == 2 and space.used == 100

    space.release(100)
    await _settle()
    assert granted == [40, 40, 40]
    assert space.used == 80, "the two later reservations of 40 are held"
    await asyncio.gather(*tasks)


async def test_waiters_are_served_in_arrival_order_a_large_one_is_not_overtaken() -> None:
    space = QueueSpace(100)
    await space.reserve(90)
    granted: list[int] = []
    big = _waiter(space, 80, granted)
    await _settle()
    small = _waiter(space, 5, granted)  # would fit now, but arrived after the big one
    await _settle()
    assert granted == []

    space.release(90)
    await _settle()
    assert granted == [80, 5], "the first to wait is the first served"
    await asyncio.gather(big, small)
    assert space.used == 85


async def test_a_cancelled_waiter_holds_nothing_and_lets_the_next_one_in() -> None:
    space = QueueSpace(10)
    await space.reserve(10)
    granted: list[int] = []
    first = _waiter(space, 8, granted)
    await _settle()
    second = _waiter(space, 2, granted)
    await _settle()
    space.release(2)  # room for the second, but the first waits ahead of it
    await _settle()
    assert granted == []

    first.cancel()
    await _settle()
    assert granted == [2], "with the head of the line gone, the one behind it fits"
    assert first.cancelled()
    await second
    assert space.used == 10 and space.waiting == 0


async def test_a_batch_larger_than_the_bound_goes_through_alone() -> None:
    space = QueueSpace(10)
    await space.reserve(50)  # nothing held: granted at once
    granted: list[int] = []
    task = _waiter(space, 1, granted)
    await _settle()
    assert granted == []
    space.release(50)
    await task
    assert granted == [1]


async def test_resize_gives_back_what_a_batch_did_not_queue() -> None:
    space = QueueSpace(10)
    await space.reserve(10)
    granted: list[int] = []
    task = _waiter(space, 4, granted)
    await _settle()
    space.resize(10, 6)  # four samples of the batch were dropped by its checks
    await task
    assert granted == [4] and space.used == 10


async def test_closing_lets_every_waiter_through() -> None:
    space = QueueSpace(5)
    await space.reserve(5)
    granted: list[int] = []
    tasks = [_waiter(space, 5, granted) for _ in range(3)]
    await _settle()
    space.close()
    await asyncio.gather(*tasks)
    assert granted == [5, 5, 5]


def test_a_bound_below_one_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="max_queued_samples must be at least 1, got 0"):
        QueueSpace(0)


def _bound_and_stall(headend: Headend, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Bound the ingest queue at 5 samples and hold every storage write until the event
    returned is set."""
    headend.ingest.max_queued_samples = 5
    storage = headend.storage
    original_append = storage.append_telemetry
    release = asyncio.Event()

    async def stalled(samples: Sequence[TelemetrySample]) -> int:
        await release.wait()
        return await original_append(samples)

    monkeypatch.setattr(storage, "append_telemetry", stalled)
    return release


async def _agent_sending_three_batches(connect_agent: ConnectAgent) -> RawAgent:
    """A registered agent that sent batches 1, 2 and 3 of 5 samples each."""
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    for seq in (1, 2, 3):
        rows = [sample(BESS_1, seconds=seq * 10 + i) for i in range(5)]
        await agent.send(codec.agent_telemetry(seq, rows))
    return agent


async def _acks(agent: RawAgent, count: int) -> list[int]:
    """The sequence numbers of the agent's next ``count`` telemetry acks."""
    acked: list[int] = []
    async with asyncio.timeout(WAIT_S):
        while len(acked) < count:
            acked.append((await agent.recv_kind("telemetry_ack")).seq)
    return acked


async def test_a_full_queue_holds_the_streams_next_batch_undecoded(
    headend: Headend, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage stalls with one batch in flight and the queue bound at one batch: the next
    batch's reader waits for space before decoding it, and decodes it once space frees."""
    ingest = headend.ingest
    release = _bound_and_stall(headend, monkeypatch)
    decoded: list[int] = []
    decode = codec.telemetry_batch_from_pb

    def counting(message: object) -> object:
        decoded.append(message.seq)  # type: ignore[attr-defined]
        return decode(message)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "telemetry_batch_from_pb", counting)
    agent = await _agent_sending_three_batches(connect_agent)

    async def second_waits() -> bool:
        return ingest._space.waiting == 1

    await eventually(second_waits, "the second batch's reader waits for queue space")
    assert decoded == [1], "only the batch that had space was decoded"
    assert ingest.stats().queued_samples == 5

    release.set()
    assert await _acks(agent, 3) == [1, 2, 3]
    assert decoded == [1, 2, 3]

    async def nothing_held() -> bool:
        return ingest._space.used == 0

    await eventually(nothing_held, "the space taken for a fourth batch that never came is back")


async def test_while_the_queue_is_full_a_stream_is_not_read_until_space_is_held(
    headend: Headend, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the queue full, a reader takes space for its stream's next batch (the size
    of its last one) before it reads it: the batches the agent sent meanwhile stay
    unread (in gRPC, under flow control), not held as bytes by the headend."""
    ingest = headend.ingest
    release = _bound_and_stall(headend, monkeypatch)
    parsed: list[int] = []
    parse = codec.parse_agent_message

    def counting(raw: bytes) -> object:
        message = parse(raw)
        if message.WhichOneof("msg") == "telemetry":
            parsed.append(message.telemetry.seq)
        return message

    monkeypatch.setattr(codec, "parse_agent_message", counting)
    agent = await _agent_sending_three_batches(connect_agent)

    async def reader_waits() -> bool:
        return ingest._space.waiting == 1

    await eventually(reader_waits, "the stream's reader waits for space before reading")
    for _ in range(20):  # the batches sent meanwhile are in reach: none is read
        await asyncio.sleep(0)
    assert parsed == [1], "batches 2 and 3 were not read while the queue was full"

    release.set()
    assert await _acks(agent, 3) == [1, 2, 3]
    assert parsed == [1, 2, 3], "each batch was parsed once: none waited as bytes"


async def test_space_taken_for_a_batch_that_does_not_come_is_given_back(
    headend: Headend, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that took space for its stream's next batch, with the agent sending
    nothing more, gives it back, so another stream's batch gets it."""
    ingest = headend.ingest
    release = _bound_and_stall(headend, monkeypatch)
    first = await connect_agent()
    await first.register(SITE_A_ASSETS)
    await first.send(codec.agent_telemetry(1, [sample(BESS_1, seconds=i) for i in range(5)]))

    async def queued() -> bool:
        return ingest.stats().queued_samples == 5 and ingest._space.waiting == 1

    await eventually(queued, "the first batch is queued and its reader waits for more space")
    release.set()  # the write frees the space; the reader takes it, and nothing comes

    async def given_back() -> bool:
        return ingest._space.used == 0 and ingest._space.waiting == 0

    await eventually(given_back, "the reader gave back the space it took for nothing")
    acked = await first.recv_kind("telemetry_ack")
    assert acked.seq == 1


async def test_try_reserve_takes_space_only_when_nobody_waits_and_it_fits() -> None:
    space = QueueSpace(10)
    assert space.try_reserve(6)
    assert not space.try_reserve(6), "would exceed the bound"
    assert space.used == 6
    granted: list[int] = []
    task = _waiter(space, 6, granted)
    await _settle()
    assert not space.try_reserve(1), "fits, but a waiter is ahead in line"
    space.release(6)
    await task
    assert granted == [6] and space.used == 6
