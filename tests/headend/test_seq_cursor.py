"""The headend's per-stream sequence cursor: which seqs are settled, which are gaps.

A gap is a seq the agent dropped by its buffer bounds (it lists them on every batch until
an acknowledgement covers them) that this headend run never received. Seqs below the
agent's floor that it does not list were acknowledged, perhaps by an earlier run.
"""

from __future__ import annotations

import itertools
import random

from der_sdk_headend.ingest.telemetry import SeqCursor, _add, _remove, _uncovered


def _batch(
    cursor: SeqCursor, seq: int, floor: int, dropped: list[tuple[int, int]] | None = None
) -> tuple[list[tuple[int, int]], int]:
    """Receive and store one batch; (its gaps, the new stored_through)."""
    dropped = [] if dropped is None else dropped
    gaps = cursor.received(seq, dropped)
    return gaps, cursor.stored(seq, floor, dropped, gaps)


def test_a_restarted_headend_finds_no_gap_in_seqs_acknowledged_before_it_started() -> None:
    # Before the restart: backlog 1..100 replaying, live 101..110 and backlog 1..20
    # acknowledged and deleted by the agent. It holds 21..100, and 111.. is new live data.
    cursor = SeqCursor()
    assert _batch(cursor, 111, 21) == ([], 20)
    for seq in range(112, 116):  # live first
        assert _batch(cursor, seq, 21)[0] == []
    through = 0
    for seq in range(21, 101):  # then the backlog, its floor rising behind it
        gaps, through = _batch(cursor, seq, seq)
        assert gaps == []
    assert through == 100, "101..110 are not known yet: nothing says they were acknowledged"
    assert _batch(cursor, 116, 116) == ([], 116)
    assert cursor.gaps == 0 and cursor.settled == [] and cursor.pending == []


def test_each_dropped_range_never_received_is_one_gap_even_when_listed_again() -> None:
    cursor = SeqCursor()
    assert cursor.received(10, [(3, 5)]) == [(3, 5)]
    assert cursor.received(11, [(3, 5)]) == [], "queued behind the first report"
    assert cursor.stored(10, 10, [(3, 5)], [(3, 5)]) == 10
    assert cursor.stored(11, 10, [(3, 5)]) == 11
    assert cursor.received(12, [(3, 5)]) == [], "the ack covering it has not arrived yet"
    assert cursor.stored(12, 12, [(3, 5)]) == 12
    assert cursor.gaps == 1


def test_a_dropped_seq_received_before_it_was_dropped_is_no_gap_and_holds_the_watermark() -> None:
    cursor = SeqCursor()
    assert cursor.received(5, []) == []  # queued, not stored yet; then the agent drops it
    gaps = cursor.received(12, [(3, 7)])
    assert gaps == [(3, 4), (6, 7)]
    assert cursor.stored(12, 12, [(3, 7)], gaps) == 4, "5 is not stored yet"
    assert cursor.stored(5, 1, []) == 12
    assert cursor.gaps == 2


def test_a_dropped_seq_already_stored_in_this_run_is_no_gap() -> None:
    cursor = SeqCursor()
    assert _batch(cursor, 4, 1) == ([], 0)  # stored, its ack lost; the agent then drops it
    assert _batch(cursor, 9, 9, [(1, 4)]) == ([(1, 3)], 9)


def test_an_agent_that_does_not_list_drops_moves_the_watermark_without_gaps() -> None:
    cursor = SeqCursor()
    assert cursor.received(7, None) == []
    assert cursor.stored(7, 7, None) == 7
    assert cursor.gaps == 0


def test_a_million_dropped_seqs_are_one_range() -> None:
    cursor = SeqCursor()
    gaps = cursor.received(1_000_001, [(1, 1_000_000)])
    assert gaps == [(1, 1_000_000)] and len(cursor.pending) == 1
    assert cursor.stored(1_000_001, 1_000_001, [(1, 1_000_000)], gaps) == 1_000_001


def test_range_lists_behave_like_sets_of_seqs() -> None:
    rng = random.Random(15)
    ranges: list[tuple[int, int]] = []
    model: set[int] = set()
    for _ in range(2000):
        first = rng.randint(1, 60)
        last = first + rng.randint(0, 6)
        if rng.random() < 0.6:
            _add(ranges, first, last)
            model.update(range(first, last + 1))
        else:
            _remove(ranges, first, last)
            model.difference_update(range(first, last + 1))
        assert {s for a, b in ranges for s in range(a, b + 1)} == model
        assert all(b + 1 < c for (_, b), (c, _) in itertools.pairwise(ranges))
        left = _uncovered(1, 70, ranges)
        assert {s for a, b in left for s in range(a, b + 1)} == set(range(1, 71)) - model
