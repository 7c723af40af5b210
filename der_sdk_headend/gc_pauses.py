"""How long the cycle collector stops the headend's event loop.

A collection runs on whichever thread allocates when a threshold is crossed, in the
headend almost always the event loop's: while it runs, no stream is read, no dispatch
sent, no ack written. :class:`GcPauses` times every collection through
:data:`gc.callbacks` (a ``start`` and a ``stop`` call around each) and keeps, per
generation, the count, the total, and the most recent :data:`KEEP` pauses, from which
``/metrics`` gives the largest and the 99th percentile (``der_gc_pause_*``). ``der
headend`` installs it once started (:func:`install`); the cost is two calls and two
clock reads (wall, and the thread's CPU clock) per collection. Full collections are rare
(CPython runs one only once the objects promoted since the last one reach a quarter of
those it kept), so ``der headend`` also runs one on SIGUSR2 (:func:`full_collection`): the
pause it takes then is what the next natural one would cost.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["KEEP", "GcPauseStats", "GcPauses", "full_collection", "install", "installed"]

log = logging.getLogger("der.headend.gc")

KEEP = 1024
"""Pauses kept per generation for the max and the percentile (the most recent ones)."""


@dataclass(frozen=True)
class GcPauseStats:
    """One generation's collections since the monitor was installed."""

    generation: int
    collections: int
    seconds_total: float
    max_s: float
    """The longest of the kept (most recent) pauses."""
    p99_s: float
    """The 99th percentile of the kept pauses (nearest rank)."""
    cpu_max_s: float
    """The most CPU time one of the kept collections took (its thread's CPU clock): on a
    busy machine a pause's wall time includes waiting for a core, this does not."""


class GcPauses:
    """Times the cycle collector's pauses (module docstring)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._started: tuple[float, float] | None = None
        self._counts = [0, 0, 0]
        self._totals = [0.0, 0.0, 0.0]
        self._recent: list[deque[float]] = [deque(maxlen=keep) for _ in range(3)]
        self._recent_cpu: list[deque[float]] = [deque(maxlen=keep) for _ in range(3)]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter(), time.thread_time()
            return
        started = self._started
        if started is None:  # installed between a start and its stop
            return
        self._started = None
        pause = time.perf_counter() - started[0]
        cpu = time.thread_time() - started[1]
        generation = int(info.get("generation", 2))
        self._counts[generation] += 1
        self._totals[generation] += pause
        self._recent[generation].append(pause)
        self._recent_cpu[generation].append(cpu)

    def start(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def stats(self) -> list[GcPauseStats]:
        out: list[GcPauseStats] = []
        for generation in range(3):
            recent = sorted(self._recent[generation])
            p99 = recent[min(len(recent) - 1, round(0.99 * (len(recent) - 1)))] if recent else 0.0
            out.append(
                GcPauseStats(
                    generation=generation,
                    collections=self._counts[generation],
                    seconds_total=self._totals[generation],
                    max_s=recent[-1] if recent else 0.0,
                    p99_s=p99,
                    cpu_max_s=max(self._recent_cpu[generation], default=0.0),
                )
            )
        return out


_installed: GcPauses | None = None


def install() -> GcPauses:
    """Start timing this process's collections (once; later calls return the same)."""
    global _installed
    if _installed is None:
        _installed = GcPauses()
        _installed.start()
    return _installed


def installed() -> GcPauses | None:
    """The process's monitor, or ``None`` when :func:`install` was not called."""
    return _installed


def full_collection() -> None:
    """Run a full collection now (``der headend`` on SIGUSR2); log how long it took."""
    started = time.perf_counter()
    collected = gc.collect()
    log.info(
        "full garbage collection on request: %.1f ms, %d unreachable objects",
        (time.perf_counter() - started) * 1000,
        collected,
    )
