"""The ingest queue's space, handed out first come, first served.

:class:`QueueSpace` counts samples: a stream's reader *reserves* space for a batch before
it decodes it (the batch's raw sample count, read off the parsed protobuf), and the writers
*release* it once the samples are stored. A reader that does not get its space waits with
its batch undecoded, and stops reading its stream meanwhile, so gRPC flow control pushes
back on the agent. Waiters are served strictly in arrival order, and a release wakes only
the waiters whose reservations now fit, in that order: with thousands of waiting readers a
write wakes the few it made room for, not all of them (as ``Condition.notify_all`` did,
each of which looked, found no room, and went back to sleep).

A reservation larger than the whole bound is granted alone, once nothing else is held, so
an oversized batch still goes through and the bound holds for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

__all__ = ["QueueSpace"]


class QueueSpace:
    """A counting bound on queued samples with a FIFO of sized waiters.

    :param capacity: how many samples may be held at once (``max_queued_samples``).
    """

    __slots__ = ("_capacity", "_closed", "_used", "_waiters")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"max_queued_samples must be at least 1, got {capacity}")
        self._capacity = capacity
        self._used = 0
        self._closed = False
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"max_queued_samples must be at least 1, got {value}")
        self._capacity = value
        self._wake()

    @property
    def used(self) -> int:
        """Samples reserved: being decoded, queued, or being written."""
        return self._used

    @property
    def waiting(self) -> int:
        """Readers waiting for space."""
        return len(self._waiters)

    def _fits(self, samples: int) -> bool:
        return self._closed or not self._used or self._used + samples <= self._capacity

    def would_wait(self, samples: int) -> bool:
        """Whether a reservation of ``samples`` would wait now (others wait ahead, or
        they do not fit)."""
        return bool(self._waiters) or not self._fits(samples)

    def try_reserve(self, samples: int) -> bool:
        """Hold ``samples`` of space if that needs no wait (nobody waits ahead and they
        fit); ``False``, holding nothing, otherwise."""
        if samples < 0:
            raise ValueError(f"cannot reserve {samples} samples")
        if self.would_wait(samples):
            return False
        self._used += samples
        return True

    async def reserve(self, samples: int) -> None:
        """Return once ``samples`` of space are held for the caller; wait behind every
        earlier waiter. Cancelled while waiting, nothing is held."""
        if self.try_reserve(samples):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (samples, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted, then cancelled
                self.release(samples)
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(entry)
                self._wake()  # it may have held back smaller waiters behind it
            raise

    def resize(self, reserved: int, samples: int) -> None:
        """A reservation of ``reserved`` turned out to hold ``samples``: give back the
        difference (or take more, without waiting: the batch is already decoded)."""
        self._used += samples - reserved
        if samples < reserved:
            self._wake()

    def release(self, samples: int) -> None:
        """``samples`` of held space are free again: wake the waiters that now fit."""
        self._used -= samples
        self._wake()

    def close(self) -> None:
        """Stop bounding: every waiter and every later reservation gets its space (the
        ingest is stopping and its readers must not hang)."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            samples, future = waiters[0]
            if future.done():  # cancelled: its task takes itself out of the line
                waiters.popleft()
                continue
            if not self._fits(samples):
                return
            waiters.popleft()
            self._used += samples
            future.set_result(None)
