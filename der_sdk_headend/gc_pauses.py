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

:class:`GcFreezer` keeps those full collections short (``GC_FREEZE``, on by default).
What a headend keeps alive is mostly its fleet's streams (some 90 tracked objects each,
450,000 at 5,000 streams), and a full collection scans all of it, about 270 ms of CPU at
5,000 streams. After every collection of the older young generation (1 or 2) the freezer
calls :func:`gc.freeze`: what survived moves to the permanent generation, which no
collection scans, so a full collection scans only what survived since. The price: a cycle
of objects that dies after it was frozen (a stream that ends) is not freed until the next
*compaction* (:func:`gc.unfreeze`, a full collection of everything, :func:`gc.freeze`),
which the freezer runs when the frozen objects have grown to :data:`COMPACT_GROWTH` times
what the last compaction kept (``GC_COMPACT_GROWTH``), and not within
:data:`COMPACT_MIN_S` of the last one or of the start: memory held by dead cycles stays
below what is alive, and the long pause comes at most once each time the heap doubles
(CPython's own rule runs a long full collection each time it grows by a quarter).
Objects freed by their reference count, nearly all, are freed at once whether frozen or
not.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from der_sdk.errors import DerSdkError

__all__ = [
    "CHECK_S",
    "COMPACT_GROWTH",
    "COMPACT_MIN_S",
    "KEEP",
    "GcFreezer",
    "GcPauseStats",
    "GcPauses",
    "compact_growth_setting",
    "freeze_setting",
    "full_collection",
    "install",
    "installed",
]

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


COMPACT_GROWTH = 2.0
"""A compaction runs once the frozen objects are this many times what the last one kept."""
COMPACT_MIN_S = 600.0
"""At least this long between compactions, and after the start: a fleet connecting to a
new headend grows the frozen heap several times over with objects that stay alive."""
CHECK_S = 60.0
"""How often the freezer counts the frozen objects (a walk of the list: about 14 ms at a
million objects on a busy 2-core machine)."""


def freeze_setting(env: dict[str, str] | os._Environ[str]) -> bool:
    """``GC_FREEZE`` (``on`` by default; ``off`` leaves CPython's own collections).

    :raises DerSdkError: the value is not one of on/off, 1/0, true/false, yes/no.
    """
    value = env.get("GC_FREEZE", "on").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise DerSdkError(f"GC_FREEZE={value!r} must be on or off")


def compact_growth_setting(env: dict[str, str] | os._Environ[str]) -> float:
    """``GC_COMPACT_GROWTH``: compact when the frozen objects reach this many times what
    the last compaction kept (default :data:`COMPACT_GROWTH`); ``0``: never.

    :raises DerSdkError: not a number, or between 0 and 1.1.
    """
    text = env.get("GC_COMPACT_GROWTH", "").strip()
    if not text:
        return COMPACT_GROWTH
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value == 0 or 1.1 <= value < float("inf"):
        return value
    raise DerSdkError(f"GC_COMPACT_GROWTH={text!r} must be 0 (never) or a number >= 1.1")


class GcFreezer:
    """Freezes what survives each young collection, and compacts now and then (module
    docstring). Runs its work on ``loop``, never inside the collector's callback."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        growth: float = COMPACT_GROWTH,
        check_s: float = CHECK_S,
        min_s: float = COMPACT_MIN_S,
    ) -> None:
        self._loop = loop
        self._growth = growth
        self._check_s = check_s
        self._min_s = min_s
        self._last = loop.time()
        self._pending = False
        self._timer: asyncio.TimerHandle | None = None
        self.kept = gc.get_freeze_count()
        """Objects frozen right after the last compaction (or the start)."""
        self.freezes = 0
        self.compactions = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or int(info.get("generation", 0)) < 1 or self._pending:
            return
        self._pending = True
        # RuntimeError: the loop is closed (the process is ending).
        try:
            self._loop.call_soon_threadsafe(self.freeze)
        except RuntimeError:
            self._pending = False

    def freeze(self) -> None:
        """Move every object the collector tracks to the permanent generation."""
        self._pending = False
        gc.freeze()
        self.freezes += 1

    def check(self) -> bool:
        """Compact when the frozen objects outgrew the last compaction, at least
        :data:`COMPACT_MIN_S` after it; whether it did."""
        if not self._growth or self._loop.time() - self._last < self._min_s:
            return False
        if gc.get_freeze_count() <= self._growth * max(self.kept, 1):
            return False
        self.compact()
        return True

    def compact(self) -> None:
        """Unfreeze, collect everything, freeze again: the long pause, timed as any full
        collection is (``der_gc_pause_*``), and logged."""
        started = time.perf_counter()
        frozen = gc.get_freeze_count()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self.kept = gc.get_freeze_count()
        self.compactions += 1
        self._last = self._loop.time()
        log.info(
            "garbage collection compacted: %d frozen objects, %d unreachable collected, "
            "%d kept, %.1f ms",
            frozen,
            collected,
            self.kept,
            (time.perf_counter() - started) * 1000,
        )

    def _tick(self) -> None:
        self.check()
        self._timer = self._loop.call_later(self._check_s, self._tick)

    def start(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        if self._timer is None:
            self._timer = self._loop.call_later(self._check_s, self._tick)

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
