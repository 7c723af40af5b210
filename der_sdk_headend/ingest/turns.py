"""Turns for telemetry decoding: a bound on how long one pass of the event loop spends
decoding telemetry, so that dispatch, acks and REST requests are not queued behind it.

asyncio runs every callback that is ready in one pass of the loop before it looks at its
sockets again. When a write to storage frees queue space, or a burst of batches arrives
(a fleet reconnecting and sending its backlog), hundreds of stream readers become ready
at once, and each decodes its batch (about 0.5 ms of CPU for 100 samples) in that same
pass: the loop was measured spending up to 200 ms in one pass, while a ``SetpointAck``
or a ``POST /dispatch`` that arrived meanwhile waited for all of it.

:class:`DecodeTurns` hands out turns: a reader decodes at once while the pass it runs in
has spent less than :data:`PASS_BUDGET_S` on decoding, and otherwise waits in line. At
the start of each pass (a callback scheduled with ``call_soon``) the budget is renewed
and as many waiters as the budget is expected to fit are let go, first come, first
served; they decode in the next pass. What is not telemetry is never in line, so a
control message waits for at most about one budget of decoding.

The throughput cost is small: a pass costs microseconds, a decode hundreds of them, and
ingest is bounded by the storage writer, not by the loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

__all__ = ["PASS_BUDGET_S", "DecodeTurns"]

PASS_BUDGET_S: Final = 0.002
"""Decoding one pass of the event loop may spend before the next decode waits for the
next pass (wall seconds)."""

_FIRST_GUESS_S: Final = 0.0005
"""What one decode is assumed to cost until one has been timed (a 100-sample batch)."""


class DecodeTurns:
    """Turns for decoding, :data:`PASS_BUDGET_S` of them per pass of the event loop.

    Use it as ``await turns.take()``, decode, then ``turns.spent(seconds)``; all on one
    event loop.

    :param budget_s: decode time per pass of the loop.
    """

    __slots__ = ("_budget", "_cost", "_loop", "_renewal", "_spent", "_waiters")

    def __init__(self, budget_s: float = PASS_BUDGET_S) -> None:
        if budget_s <= 0:
            raise ValueError(f"budget_s must be positive, got {budget_s}")
        self._budget = budget_s
        self._spent = 0.0
        self._cost = _FIRST_GUESS_S  # moving average of one decode
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._renewal: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """Decodes waiting for a later pass."""
        return len(self._waiters)

    @property
    def free(self) -> bool:
        """:meth:`take` would return at once."""
        return self._spent < self._budget and not self._waiters

    async def take(self) -> None:
        """Return once this pass of the loop may decode; call :meth:`spent` after."""
        if self.free:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._renew_next_pass()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # let go, then cancelled
                self._renew_next_pass()
            raise

    def spent(self, seconds: float) -> None:
        """A decode that took its turn took ``seconds``."""
        self._spent += seconds
        self._cost += (seconds - self._cost) / 8
        self._renew_next_pass()

    def _renew_next_pass(self) -> None:
        if self._renewal is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._renewal = self._loop.call_soon(self._renew)

    def _renew(self) -> None:
        """At the start of a pass: a fresh budget, and the waiters it fits let go."""
        self._renewal = None
        self._spent = 0.0
        fits = max(1, int(self._budget / max(self._cost, 1e-6)))
        waiters = self._waiters
        while waiters and fits:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled one is skipped
                waiter.set_result(None)
                fits -= 1
        if waiters:
            self._renew_next_pass()
