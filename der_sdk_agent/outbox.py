"""The bounded in-memory telemetry outbox between the sampler and the headend link.

The sampler puts one batch per poll; the link sends batches in order and drops them when
the headend acknowledges them. Sent but unacknowledged batches stay, so after a reconnect
they are sent again, oldest first. The bound counts samples (sent or not): when it is
exceeded the **oldest** samples are dropped, counted and logged, because fresh data is
worth more to an operator than old data after a long outage.

This is the simple in-memory version; a durable (SQLite) buffer that survives a restart
is planned behind the same interface.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from der_sdk.models import TelemetrySample

__all__ = ["DEFAULT_OUTBOX_MAX_SAMPLES", "Outbox", "OutboxBatch"]

log = logging.getLogger("der.agent.outbox")

DEFAULT_OUTBOX_MAX_SAMPLES = 10_000
_DROP_LOG_EVERY_S = 60.0


@dataclass
class OutboxBatch:
    """One poll's samples. ``number`` increases by one per batch for the agent's life."""

    number: int
    samples: list[TelemetrySample]


class Outbox:
    """Batches waiting for a headend acknowledgement, oldest first, at most ``max_samples``.

    Batches leave only from the front (acknowledged or dropped), so batch numbers in the
    outbox are always consecutive.
    """

    def __init__(self, max_samples: int = DEFAULT_OUTBOX_MAX_SAMPLES) -> None:
        if max_samples < 1:
            raise ValueError(f"outbox bound must be at least 1 sample, got {max_samples}")
        self.max_samples = max_samples
        self.dropped = 0
        self._batches: deque[OutboxBatch] = deque()
        self._size = 0
        self._next_number = 1
        self._listeners: list[Callable[[], None]] = []
        self._last_drop_log = -_DROP_LOG_EVERY_S
        self._dropped_since_log = 0

    def __len__(self) -> int:
        """Samples held (sent and unsent)."""
        return self._size

    @property
    def batch_count(self) -> int:
        return len(self._batches)

    def pending(self) -> list[TelemetrySample]:
        """Every sample held, oldest first (for tests and diagnostics)."""
        return [sample for batch in self._batches for sample in batch.samples]

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously) after every :meth:`put`."""
        self._listeners.append(callback)

    def put(self, samples: Sequence[TelemetrySample]) -> int:
        """Queue one batch; drop the oldest samples beyond the bound. Returns how many."""
        if not samples:
            return 0
        self._batches.append(OutboxBatch(self._next_number, list(samples)))
        self._next_number += 1
        self._size += len(samples)
        dropped = self._trim()
        for callback in self._listeners:
            callback()
        return dropped

    def after(self, number: int) -> OutboxBatch | None:
        """The oldest batch whose number is greater than ``number``, if any."""
        if not self._batches:
            return None
        first = self._batches[0].number
        index = max(0, number + 1 - first)
        return self._batches[index] if index < len(self._batches) else None

    def ack_through(self, number: int) -> int:
        """Drop every batch up to and including ``number``; returns the samples dropped."""
        removed = 0
        while self._batches and self._batches[0].number <= number:
            removed += len(self._batches.popleft().samples)
        self._size -= removed
        return removed

    def _trim(self) -> int:
        excess = self._size - self.max_samples
        if excess <= 0:
            return 0
        dropped = 0
        while excess > 0:
            front = self._batches[0]
            if len(front.samples) <= excess:
                self._batches.popleft()
                taken = len(front.samples)
            else:
                taken = excess
                front.samples = front.samples[excess:]  # a new list: a send in flight keeps its own
            excess -= taken
            dropped += taken
        self._size -= dropped
        self.dropped += dropped
        self._log_drops(dropped)
        return dropped

    def _log_drops(self, dropped: int) -> None:
        self._dropped_since_log += dropped
        now = time.monotonic()
        if now - self._last_drop_log < _DROP_LOG_EVERY_S:
            return
        log.warning(
            "telemetry outbox full (%d samples): dropped the %d oldest samples "
            "(%d since the agent started); the headend has not acknowledged them",
            self.max_samples,
            self._dropped_since_log,
            self.dropped,
        )
        self._last_drop_log = now
        self._dropped_since_log = 0
