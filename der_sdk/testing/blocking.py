"""Catch code that blocks the event loop (``time.sleep``, sync sockets, sync file I/O).

:class:`BlockingWatch` runs awaitables on the current loop with asyncio debug mode on and
``loop.slow_callback_duration`` set to the threshold, and records every callback that ran
longer. Two detectors run together, because not every loop implements debug mode:

* asyncio's own slow-callback report ("Executing <Task ...> took 0.2 seconds"), read from
  the ``asyncio`` logger;
* a ticker task that yields to the loop continuously and measures how late it runs again:
  a gap longer than the threshold means something held the loop that long.

Each awaitable runs in a task named after the step, so a report says which call blocked.
The garbage collector is paused while the watch runs: a full collection in a large test
process can itself hold the loop for tens of milliseconds, and that is not the code's doing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

__all__ = ["DEFAULT_THRESHOLD_S", "Block", "BlockingWatch"]

DEFAULT_THRESHOLD_S = 0.05
"""50 ms: far above any honest async step, far below a blocking network or disk call."""

T = TypeVar("T")

_SLOW = re.compile(r"^Executing (?P<handle>.*) took (?P<seconds>[0-9.]+) seconds$", re.S)


@dataclass(frozen=True)
class Block:
    """One stretch during ``step`` when the loop could not run for ``seconds``."""

    step: str
    seconds: float
    detail: str

    def __str__(self) -> str:
        return f"{self.step} blocked the event loop for {self.seconds:.3f} s ({self.detail})"


class _SlowCallbackHandler(logging.Handler):
    def __init__(self, watch: BlockingWatch) -> None:
        super().__init__(logging.WARNING)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        match = _SLOW.match(record.getMessage())
        if match is not None:
            self.watch._record(float(match["seconds"]), f"asyncio: {match['handle'][:300]}")


class BlockingWatch:
    """``async with BlockingWatch(0.05) as watch: await watch.run("read()", adapter.read())``.

    :attr:`blocks` lists what blocked longer than ``threshold_s``, by step.
    """

    def __init__(self, threshold_s: float = DEFAULT_THRESHOLD_S) -> None:
        self.threshold_s = threshold_s
        self.blocks: list[Block] = []
        self._step = "(between steps)"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._saved: tuple[bool, float] | None = None
        self._logger = logging.getLogger("asyncio")
        self._saved_logger: tuple[int, bool] | None = None
        self._handler = _SlowCallbackHandler(self)
        self._ticker: asyncio.Task[None] | None = None
        self._gc_was_enabled = False

    def _record(self, seconds: float, detail: str) -> None:
        if seconds >= self.threshold_s:
            self.blocks.append(Block(self._step, seconds, detail))

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0)
            now = loop.time()
            self._record(now - last, "the loop did not run for that long")
            last = now

    async def __aenter__(self) -> BlockingWatch:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._saved = (loop.get_debug(), loop.slow_callback_duration)
        loop.set_debug(True)
        loop.slow_callback_duration = self.threshold_s
        self._saved_logger = (self._logger.level, self._logger.disabled)
        if not self._logger.isEnabledFor(logging.WARNING):
            self._logger.setLevel(logging.WARNING)
        self._logger.disabled = False
        self._logger.addHandler(self._handler)
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self._ticker = asyncio.create_task(self._tick(), name="der-blocking-watch")
        await asyncio.sleep(0)
        return self

    async def run(self, step: str, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` in a task named ``step`` and watch the loop meanwhile."""

        async def call() -> T:
            return await awaitable

        self._step = step
        try:
            return await asyncio.create_task(call(), name=step)
        finally:
            await asyncio.sleep(0)  # let the ticker see the end of the step
            self._step = "(between steps)"

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._gc_was_enabled:
            gc.enable()
        self._logger.removeHandler(self._handler)
        if self._saved_logger is not None:
            self._logger.setLevel(self._saved_logger[0])
            self._logger.disabled = self._saved_logger[1]
        if self._loop is not None and self._saved is not None:
            self._loop.set_debug(self._saved[0])
            self._loop.slow_callback_duration = self._saved[1]
        await asyncio.sleep(0)

    def report(self) -> str:
        """One line per block, worst first (an empty string when nothing blocked)."""
        worst: dict[str, Block] = {}
        for block in self.blocks:
            if block.step not in worst or block.seconds > worst[block.step].seconds:
                worst[block.step] = block
        blocks = sorted(worst.values(), key=lambda b: -b.seconds)
        return "\n".join(f"  - {block}" for block in blocks)
