"""Turns for telemetry decoding (der_sdk_headend/ingest/turns.py): one pass of the event
loop spends at most about its budget decoding, so what is not telemetry does not wait
behind a burst of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from headend_kit import (
    BESS_1,
    SITE_A_ASSETS,
    WAIT_S,
    ConnectAgent,
    eventually,
    sample,
    telemetry_parses,
)

from der_sdk.wire import codec
from der_sdk_headend.ingest.turns import DecodeTurns
from der_sdk_headend.service import Headend


class Passes:
    """Counts passes of the event loop: a callback that schedules itself again runs once
    in each."""

    def __init__(self) -> None:
        self.count = 0
        self._handle: asyncio.Handle | None = None

    def _tick(self) -> None:
        self.count += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def __enter__(self) -> Passes:
        self._handle = asyncio.get_running_loop().call_soon(self._tick)
        return self

    def __exit__(self, *_: object) -> None:
        if self._handle is not None:
            self._handle.cancel()


def decoder(
    turns: DecodeTurns, cost_s: float, log: list[tuple[int, int]], passes: Passes
) -> Callable[[int], asyncio.Task[None]]:
    """Start reader ``n``: take a turn, note (n, pass), report ``cost_s`` spent."""

    async def decode(n: int) -> None:
        await turns.take()
        log.append((n, passes.count))
        turns.spent(cost_s)

    return lambda n: asyncio.create_task(decode(n))


async def test_a_burst_of_batches_is_decoded_a_budget_per_pass_in_arrival_order() -> None:
    turns = DecodeTurns(budget_s=0.002)
    log: list[tuple[int, int]] = []
    with Passes() as passes:
        start = decoder(turns, 0.0005, log, passes)
        await asyncio.gather(*(start(n) for n in range(100)))
    assert [n for n, _ in log] == list(range(100)), "first come, first served"
    per_pass: dict[int, int] = {}
    for _, when in log:
        per_pass[when] = per_pass.get(when, 0) + 1
    # 2 ms of 0.5 ms decodes: 4 fit a pass, plus the one that crossed the budget.
    assert max(per_pass.values()) <= 5, per_pass
    assert len(per_pass) >= 20, "the burst was spread over passes of the loop"


async def test_a_message_that_is_not_telemetry_waits_for_one_budget_not_the_burst() -> None:
    turns = DecodeTurns(budget_s=0.002)
    log: list[tuple[int, int]] = []
    decoded_before_ack = -1

    async def setpoint_ack() -> None:
        nonlocal decoded_before_ack
        decoded_before_ack = len(log)

    with Passes() as passes:
        start = decoder(turns, 0.0005, log, passes)
        burst = [start(n) for n in range(200)]  # 200 readers ready in the same pass,
        ack = asyncio.create_task(setpoint_ack())  # and an ack arriving behind them
        await asyncio.gather(*burst, ack)
    assert 0 <= decoded_before_ack <= 5, (
        f"the ack waited for {decoded_before_ack} decodes of the burst of 200"
    )


async def test_the_budget_follows_what_decodes_really_cost() -> None:
    turns = DecodeTurns(budget_s=0.002)
    log: list[tuple[int, int]] = []
    with Passes() as passes:
        start = decoder(turns, 0.00005, log, passes)  # cheap batches: 50 µs each
        await asyncio.gather(*(start(n) for n in range(400)))
    per_pass: dict[int, int] = {}
    for _, when in log:
        per_pass[when] = per_pass.get(when, 0) + 1
    assert max(per_pass.values()) >= 20, "cheap decodes are let go many to a pass"


async def test_a_reader_cancelled_while_it_waits_does_not_hold_up_the_others() -> None:
    turns = DecodeTurns(budget_s=0.001)
    log: list[tuple[int, int]] = []
    with Passes() as passes:
        start = decoder(turns, 0.001, log, passes)
        tasks = [start(n) for n in range(10)]
        await asyncio.sleep(0)
        assert turns.waiting > 0
        tasks[3].cancel()
        tasks[4].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(isinstance(result, asyncio.CancelledError) for result in done) == 2
    assert [n for n, _ in log] == [0, 1, 2, 5, 6, 7, 8, 9]
    assert turns.waiting == 0


def test_a_budget_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="budget_s must be positive"):
        DecodeTurns(budget_s=0)


def reader(
    turns: DecodeTurns, log: list[tuple[int, int]], passes: Passes
) -> Callable[[int], asyncio.Task[None]]:
    """Start reader ``n`` that has not read its batch yet: wait until it may read, note
    (n, pass)."""

    async def read(n: int) -> None:
        await turns.before_read()
        log.append((n, passes.count))

    return lambda n: asyncio.create_task(read(n))


async def test_batches_already_read_are_let_go_before_readers_that_have_not_read() -> None:
    turns = DecodeTurns(budget_s=0.002)  # four 0.5 ms decodes a pass
    log: list[tuple[int, int]] = []
    with Passes() as passes:
        decode, read = decoder(turns, 0.0005, log, passes), reader(turns, log, passes)
        first = [decode(n) for n in range(8)]  # four decode at once, four wait
        readers = [read(n) for n in (100, 101, 102)]  # in line before the next two,
        later = [decode(n) for n in (8, 9)]  # which were read and go first
        await asyncio.gather(*first, *readers, *later)
    assert [n for n, _ in log] == [*range(10), 100, 101, 102]
    per_pass: dict[int, int] = {}
    for _, when in log:
        per_pass[when] = per_pass.get(when, 0) + 1
    # A pass lets go what its budget fits, decodes and reads together (plus the decode
    # that crossed the budget).
    assert max(per_pass.values()) <= 5, per_pass
    assert turns.waiting == turns.waiting_to_read == 0


async def test_readers_are_let_go_only_with_the_budget_the_batches_already_read_leave() -> None:
    turns = DecodeTurns(budget_s=0.002)
    log: list[tuple[int, int]] = []
    with Passes() as passes:
        decode, read = decoder(turns, 0.0005, log, passes), reader(turns, log, passes)
        tasks = [decode(n) for n in range(4)]  # the budget of this pass
        tasks += [read(n) for n in (100, 101)]
        tasks += [decode(n) for n in range(4, 8)]  # four read: the next pass's budget
        await asyncio.gather(*tasks)
    when = dict(log)
    assert len({when[n] for n in range(4, 8)}) == 1, "the four batches read fit one pass"
    assert min(when[100], when[101]) > when[4], "the pass they filled let no reader go"


async def test_a_reader_cancelled_before_it_reads_does_not_hold_up_the_others() -> None:
    turns = DecodeTurns(budget_s=0.002)
    log: list[tuple[int, int]] = []
    with Passes() as passes:
        decode, read = decoder(turns, 0.0005, log, passes), reader(turns, log, passes)
        decodes = [decode(n) for n in range(6)]
        readers = [read(n) for n in range(100, 106)]
        await asyncio.sleep(0)
        assert turns.waiting_to_read == 6
        readers[1].cancel()
        done = await asyncio.gather(*decodes, *readers, return_exceptions=True)
    assert sum(isinstance(result, asyncio.CancelledError) for result in done) == 1
    assert [n for n, _ in log if n >= 100] == [100, 102, 103, 104, 105]
    assert turns.waiting_to_read == 0


async def test_a_stream_waiting_for_a_decode_turn_has_not_read_its_next_batch(
    headend: Headend, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every decode spends the whole budget of its pass, and no new pass renews it until
    the test says so: after its first batch, the stream's reader waits for a turn before
    reading, and the batches the agent sent meanwhile stay in gRPC, unread."""
    turns = DecodeTurns(budget_s=1e-9)
    headend._link._turns = turns  # type: ignore[union-attr]
    renew = DecodeTurns._renew
    passes_renew = False

    def renew_when_let(self: DecodeTurns) -> None:
        if passes_renew:
            renew(self)
        else:
            self._renewal = None  # this pass renews nothing

    monkeypatch.setattr(DecodeTurns, "_renew", renew_when_let)
    parsed = telemetry_parses(monkeypatch)
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    for seq in (1, 2, 3):
        await agent.send(codec.agent_telemetry(seq, [sample(BESS_1, seconds=seq * 10)]))

    async def reader_waits() -> bool:
        return turns.waiting_to_read == 1

    await eventually(reader_waits, "the stream's reader waits for a turn before reading")
    for _ in range(20):  # the batches sent meanwhile are in reach: none is read
        await asyncio.sleep(0)
    assert parsed == [1], "batches 2 and 3 were not read while the reader waited"
    assert turns.waiting == 0, "no batch waits as bytes for a turn"

    passes_renew = True
    turns._renew()
    acked: list[int] = []
    async with asyncio.timeout(WAIT_S):
        while len(acked) < 3:
            acked.append((await agent.recv_kind("telemetry_ack")).seq)
    assert acked == [1, 2, 3]
    assert parsed == [1, 2, 3], "each batch was parsed once: none waited as bytes"
