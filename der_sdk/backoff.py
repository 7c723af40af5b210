"""Retry delays: exponential backoff with a cap and optional jitter, for every retry loop.

One schedule serves the agent's link (reconnecting to the headend), the headend opening
its storage, and the ingest writers retrying a failed write. The defaults follow gRPC's
connection-backoff guidance: the first delay 1 s, times :data:`MULTIPLIER` (1.6) per
failed attempt, capped at 120 s, and each delay the base ± :data:`JITTER` (20 %) of it,
uniformly. The jitter spreads many clients that failed at the same instant (even their
first retries) and stays on at the cap so they stay spread.

The loops themselves stay where they are, because what they do between attempts differs:
the link resets its count after a good register, storage brings REST up after the first
failure, the writers log one line when writes start failing and one when they recover.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["JITTER", "MULTIPLIER", "Backoff"]

MULTIPLIER = 1.6
"""gRPC's backoff multiplier."""
JITTER = 0.2
"""gRPC's backoff jitter: each delay is the base ± this share of it."""


@dataclass(frozen=True)
class Backoff:
    """The delay before retry ``attempt`` (1 after the first failure, 2, ...).

    :param initial_s: the first delay, before jitter.
    :param max_s: the cap of the delay, before jitter.
    :param rng: the random source of the jitter (seed one for repeatable delays).
    :param multiplier: the growth of the delay per failed attempt.
    :param jitter: each delay is the base ± this share of it, uniformly; 0 for none.
    """

    initial_s: float = 1.0
    max_s: float = 120.0
    rng: random.Random = field(default_factory=random.Random)
    multiplier: float = MULTIPLIER
    jitter: float = JITTER

    def base(self, attempt: int) -> float:
        """The delay before jitter: ``min(max_s, initial_s * multiplier**(attempt-1))``."""
        delay = self.initial_s
        for _ in range(max(attempt - 1, 0)):
            delay *= self.multiplier
            if delay >= self.max_s:
                return self.max_s
        return min(delay, self.max_s)

    def delay(self, attempt: int) -> float:
        """The base delay, ± ``jitter`` of it, uniformly."""
        if not self.jitter:
            return self.base(attempt)
        return self.base(attempt) * (1.0 + self.rng.uniform(-self.jitter, self.jitter))
