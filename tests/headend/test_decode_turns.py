"""Turns for telemetry decoding (der_sdk_headend/ingest/turns.py): one pass of the event
loop spends at most about its budget decoding, so what is not telemetry does not wait
behind a burst of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from der_sdk_headend.ingest.turns import DecodeTurns


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
