"""The outbox bound and acknowledgement, and the reconnect backoff, without a network."""

from __future__ import annotations

import random

import pytest

from der_sdk.models import TelemetrySample, utc_now
from der_sdk_agent.link import Backoff
from der_sdk_agent.outbox import Outbox


def _samples(tag: str, count: int) -> list[TelemetrySample]:
    return [
        TelemetrySample(asset_id=f"{tag}{i}", site_id="s", ts=utc_now(), mw=0.0)
        for i in range(count)
    ]


def _ids(outbox: Outbox) -> list[str]:
    return [s.asset_id for s in outbox.pending()]


def test_full_outbox_drops_the_oldest_samples_first() -> None:
    outbox = Outbox(max_samples=5)
    assert outbox.put(_samples("a", 2)) == 0
    assert outbox.put(_samples("b", 2)) == 0
    assert outbox.put(_samples("c", 2)) == 1  # one sample of the oldest batch goes
    assert _ids(outbox) == ["a1", "b0", "b1", "c0", "c1"]
    assert outbox.put(_samples("d", 3)) == 3
    assert _ids(outbox) == ["c0", "c1", "d0", "d1", "d2"]
    assert outbox.dropped == 4 and len(outbox) == 5


def test_a_batch_bigger_than_the_bound_keeps_its_newest_samples() -> None:
    outbox = Outbox(max_samples=3)
    assert outbox.put(_samples("x", 5)) == 2
    assert _ids(outbox) == ["x2", "x3", "x4"]


def test_ack_drops_batches_through_the_number_and_after_walks_in_order() -> None:
    outbox = Outbox(max_samples=100)
    for tag in "abcd":
        outbox.put(_samples(tag, 1))
    first = outbox.after(0)
    assert first is not None and first.number == 1
    second = outbox.after(first.number)
    assert second is not None and second.samples[0].asset_id == "b0"
    assert outbox.ack_through(2) == 2
    assert _ids(outbox) == ["c0", "d0"]
    resend = outbox.after(0)  # a new stream starts from the oldest unacknowledged batch
    assert resend is not None and resend.number == 3
    assert outbox.after(4) is None


def test_listeners_hear_every_put() -> None:
    outbox = Outbox()
    heard: list[int] = []
    outbox.add_listener(lambda: heard.append(len(outbox)))
    outbox.put(_samples("a", 2))
    outbox.put([])
    assert heard == [2]


def test_outbox_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Outbox(max_samples=0)


def test_backoff_doubles_to_the_cap_with_equal_jitter() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(7))
    assert [backoff.cap(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    for attempt in range(1, 12):
        cap = backoff.cap(attempt)
        for _ in range(50):
            assert cap / 2 <= backoff.delay(attempt) <= cap
    assert backoff.cap(10_000) == 30.0
