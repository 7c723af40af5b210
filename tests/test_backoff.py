"""The one retry schedule (der_sdk.backoff): the agent link, storage start, ingest writers."""

from __future__ import annotations

import random

import pytest

from der_sdk.backoff import JITTER, MULTIPLIER, Backoff


def test_the_default_schedule_is_grpcs_connection_backoff() -> None:
    backoff = Backoff(rng=random.Random(3))
    assert (backoff.initial_s, backoff.max_s, MULTIPLIER, JITTER) == (1.0, 120.0, 1.6, 0.2)
    assert [backoff.base(n) for n in (1, 2, 3, 4)] == pytest.approx([1.0, 1.6, 2.56, 4.096])
    assert backoff.base(11) == pytest.approx(1.6**10)  # 109.95: the last one below the cap
    assert backoff.base(12) == backoff.base(10_000) == 120.0
    assert backoff.base(0) == backoff.base(-5) == 1.0, "no attempt yet: the first delay"


def test_jitter_is_repeatable_with_a_seeded_random_and_stays_within_its_share() -> None:
    first = [Backoff(rng=random.Random(11)).delay(n) for n in range(1, 40)]
    again = [Backoff(rng=random.Random(11)).delay(n) for n in range(1, 40)]
    assert first == again
    shared = Backoff(rng=random.Random(11))
    delays = [shared.delay(n) for n in range(1, 40)]
    assert delays != [shared.base(n) for n in range(1, 40)]
    for n, delay in enumerate(delays, start=1):
        assert shared.base(n) * 0.8 <= delay <= shared.base(n) * 1.2
    at_cap = [shared.delay(100) for _ in range(200)]
    assert min(at_cap) < 100 and max(at_cap) > 140, "the jitter stays on at the cap"


def test_without_jitter_the_delay_is_the_base_and_no_random_is_drawn() -> None:
    rng = random.Random(5)
    state = rng.getstate()
    backoff = Backoff(0.25, 5.0, rng, multiplier=2.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.25, 0.5, 1, 2, 4, 5, 5, 5]
    assert rng.getstate() == state
