"""The durable buffer on its own (no network): durability across a killed process, seq
and stream id, size and age bounds, acknowledgements, the journal, events and local
reports; and the reconnect backoff."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import signal
import sqlite3
import statistics
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from der_sdk.errors import DerSdkError
from der_sdk.models import TelemetrySample, utc_now
from der_sdk.wire.codec import Allocation, LocalDispatchReport
from der_sdk_agent import buffer as buffer_module
from der_sdk_agent.buffer import RESTARTED_REASON, Buffer
from der_sdk_agent.link import RECONNECT_JITTER, RECONNECT_MULTIPLIER, Backoff

ROOT = Path(__file__).resolve().parents[2]


def _batch(tag: str, count: int = 1) -> list[TelemetrySample]:
    return [
        TelemetrySample(asset_id=f"{tag}{i}", site_id="s", ts=utc_now(), mw=float(i))
        for i in range(count)
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def opened() -> AsyncIterator[Callable[..., Buffer]]:
    """Make buffers; every one is closed afterwards."""
    made: list[Buffer] = []

    def make(path: str | Path = ":memory:", **kwargs: object) -> Buffer:
        buffer = Buffer(str(path), **kwargs)  # type: ignore[arg-type]
        made.append(buffer)
        return buffer

    yield make
    for buffer in made:
        await buffer.close()


# ----------------------------------------------------------------------------- durability

_WRITER = """
import asyncio, sys
from der_sdk.models import TelemetrySample, utc_now
from der_sdk_agent.buffer import Buffer

async def main(path, count):
    buffer = Buffer(path)
    await buffer.open()
    for i in range(count):
        sample = TelemetrySample(asset_id="a", site_id="s", ts=utc_now(), mw=float(i), seq=i + 1)
        await buffer.append([sample])
    print(buffer.stream_id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_committed_batches_survive_sigkill_of_the_writing_process(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite3"
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(path), "40", stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        assert writer.stdout is not None
        line = await asyncio.wait_for(writer.stdout.readline(), 30)
    finally:
        writer.send_signal(signal.SIGKILL)
        await writer.wait()
    assert writer.returncode == -signal.SIGKILL
    stream_id = line.decode().strip()

    buffer = Buffer(str(path))
    await buffer.open()
    try:
        assert buffer.stream_id == stream_id
        assert buffer.seqs() == list(range(1, 41))
        values = [s.mw for seq in buffer.seqs() for s in await buffer.batch(seq)]
        assert values == [float(i) for i in range(40)]
        assert await buffer.append(_batch("after")) == 41  # seq goes on after the kill
    finally:
        await buffer.close()


async def test_seq_goes_on_across_reopen_and_a_new_file_gets_a_new_stream_id(
    tmp_path: Path, opened: Callable[..., Buffer]
) -> None:
    first = Buffer(str(tmp_path / "a" / "b.sqlite3"))  # the folder is created
    assert [await first.append(_batch(t)) for t in "xyz"] == [1, 2, 3]
    first.ack_telemetry(3, stored_through=3)
    stream_id = first.stream_id
    await first.close()

    again = opened(tmp_path / "a" / "b.sqlite3")
    await again.open()
    assert again.stream_id == stream_id and len(again) == 0
    assert await again.append(_batch("w")) == 4  # never reused, even with nothing held

    other = opened(tmp_path / "other.sqlite3")
    await other.open()
    assert other.stream_id != stream_id and other.next_seq == 1


async def test_memory_buffer_works_and_keeps_nothing(opened: Callable[..., Buffer]) -> None:
    buffer = opened()
    assert await buffer.append(_batch("a", 2)) == 1
    assert not buffer.durable and buffer.stats().samples == 2
    assert [s.asset_id for s in await buffer.batch(1)] == ["a0", "a1"]
    assert opened().stream_id != buffer.stream_id


async def test_a_buffer_file_in_use_is_refused_naming_it(
    tmp_path: Path, opened: Callable[..., Buffer]
) -> None:
    path = tmp_path / "shared.sqlite3"
    await opened(path).open()
    with pytest.raises(DerSdkError, match="in use by another process") as caught:
        await opened(path).open()
    assert str(path) in str(caught.value)


async def test_a_file_that_is_not_a_buffer_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("shopping list\n" * 200)
    with pytest.raises(DerSdkError, match="not an agent buffer") as caught:
        await Buffer(str(path)).open()
    assert str(path) in str(caught.value) and "move the file away" in str(caught.value)


async def test_sync_full_is_applied_to_the_file(tmp_path: Path) -> None:
    buffer = Buffer(str(tmp_path / "full.sqlite3"), sync="full")
    await buffer.open()
    try:

        def modes() -> tuple[str, int]:
            conn = buffer._db()
            return (
                conn.execute("PRAGMA journal_mode").fetchone()[0],
                conn.execute("PRAGMA synchronous").fetchone()[0],
            )

        assert await buffer._run(modes) == ("wal", 2)  # 2: FULL
    finally:
        await buffer.close()


# ----------------------------------------------------------------------------- bounds


async def test_size_bound_drops_the_oldest_batches_with_counts_and_one_event(
    opened: Callable[..., Buffer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="der.agent.buffer")
    size = len(buffer_module.codec.telemetry_payload(_batch("a", 2)))
    buffer = opened(max_bytes=size * 3)
    for tag in "abc":
        await buffer.append(_batch(tag, 2))
    assert buffer.stats().dropped_batches == 0
    await buffer.append(_batch("d", 2))
    await buffer.append(_batch("e", 2))
    assert buffer.seqs() == [3, 4, 5]  # the oldest went first
    stats = buffer.stats()
    assert (stats.dropped_batches, stats.dropped_samples, stats.batches) == (2, 4, 3)
    assert stats.bytes <= size * 3
    [event] = await buffer.events()  # the second drop, within the minute, is coalesced
    assert event.kind == "telemetry_dropped"
    assert event.data["first_seq"] == 1 and event.data["batches"] == 1
    assert event.data["reasons"] == ["size"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped the 1 oldest batch" in warnings[0].getMessage()


async def test_drops_within_a_minute_are_reported_together(
    opened: Callable[..., Buffer],
) -> None:
    size = len(buffer_module.codec.telemetry_payload(_batch("a")))
    buffer = opened(max_bytes=size, drop_report_every_s=0.2)
    for tag in "abcd":
        await buffer.append(_batch(tag))  # each drops the one before
    assert buffer.event_count == 1  # seq 1, reported at once
    await asyncio.sleep(0.25)
    await buffer.maintain()  # the upkeep reports what is pending
    _, second = await buffer.events()
    assert (second.data["first_seq"], second.data["last_seq"]) == (2, 3)
    assert second.data["batches"] == 2 and second.data["dropped_batches_total"] == 3


async def test_age_bound_drops_batches_older_than_max_age(
    tmp_path: Path, opened: Callable[..., Buffer]
) -> None:
    clock = FakeClock()
    path = tmp_path / "aged.sqlite3"
    buffer = Buffer(str(path), max_age_s=3600, clock=clock)
    await buffer.append(_batch("old", 3))
    clock.now += 1800
    await buffer.append(_batch("mid", 2))
    clock.now += 1801  # the first batch is now older than an hour
    await buffer.maintain()
    assert buffer.seqs() == [2]
    assert (buffer.dropped_batches, buffer.dropped_samples) == (1, 3)
    assert (await buffer.events())[0].data["reasons"] == ["age"]
    await buffer.close()

    clock.now += 7200  # an agent started after a long stop drops what aged meanwhile
    again = opened(path, max_age_s=3600, clock=clock)
    await again.open()
    assert len(again) == 0 and again.stats().dropped_samples == 5  # the counters persist


# ----------------------------------------------------------------------------- acks


async def test_ack_forgets_the_batch_and_everything_through_stored_through(
    tmp_path: Path, opened: Callable[..., Buffer]
) -> None:
    path = tmp_path / "acks.sqlite3"
    buffer = Buffer(str(path), ack_flush_s=0.01)
    for tag in "abcdefg":
        await buffer.append(_batch(tag))
    assert buffer.ack_telemetry(6, stored_through=3) == 4
    assert buffer.seqs() == [4, 5, 7] and buffer.floor_seq == 4
    assert buffer.ack_telemetry(6) == 0  # twice is harmless

    def rows() -> list[int]:
        with sqlite3.connect(path) as conn:  # the WAL is readable once the buffer is closed
            return [r[0] for r in conn.execute("SELECT seq FROM telemetry ORDER BY seq")]

    await asyncio.sleep(0.05)  # the delete is batched
    await buffer.close()
    assert rows() == [4, 5, 7]


async def test_the_buffer_lists_exactly_the_seqs_it_dropped_until_an_ack_covers_them(
    tmp_path: Path, opened: Callable[..., Buffer]
) -> None:
    path = tmp_path / "dropped.sqlite3"
    size = len(buffer_module.codec.telemetry_payload(_batch("a")))
    buffer = opened(path, max_bytes=size * 3, ack_flush_s=0.01)
    for tag in "abc":
        await buffer.append(_batch(tag))
    buffer.ack_telemetry(2)  # acknowledged, not dropped: held 1, 3
    for tag in "def":
        await buffer.append(_batch(tag))  # 4, 5, 6 push out 1 and 3
    assert buffer.seqs() == [4, 5, 6] and buffer.dropped_ranges == [(1, 1), (3, 3)]
    assert buffer.drop_report() == (4, [(1, 1), (3, 3)])
    assert buffer.drop_report(limit=1) == (3, [(1, 1)])  # 3 is left out: the floor says so
    await buffer.append(_batch("g"))  # drops 4: continues the range of 3
    assert buffer.dropped_ranges == [(1, 1), (3, 4)]

    await buffer.close()
    reopened = opened(path, max_bytes=size * 3, ack_flush_s=0.01)
    await reopened.open()
    assert reopened.dropped_ranges == [(1, 1), (3, 4)], "kept in the file"
    reopened.ack_telemetry(5, stored_through=3)
    assert reopened.dropped_ranges == [(4, 4)]
    await asyncio.sleep(0.05)  # the delete is batched
    await reopened.close()
    again = opened(path, max_bytes=size * 3)
    await again.open()
    assert again.dropped_ranges == [(4, 4)] and again.drop_report() == (6, [(4, 4)])


# ----------------------------------------------------------------------------- journal


async def test_command_in_progress_at_open_becomes_failed_and_unreported(
    tmp_path: Path, opened: Callable[..., Buffer]
) -> None:
    path = tmp_path / "journal.sqlite3"
    buffer = Buffer(str(path))
    entry, new = await buffer.journal_receive(
        "c1", asset_id="a", site_id=None, mw=1.5, duration_s=None
    )
    assert new and entry.status == "acked" and not entry.final
    await buffer.journal_receive("c2", asset_id="a", site_id=None, mw=1, duration_s=None)
    await buffer.journal_finish("c2", "applied", [Allocation(asset_id="a", mw=1.0)])
    await buffer.journal_reported("c2")
    await buffer.close()  # the agent "died" while applying c1

    again = opened(path)
    await again.open()
    recovered = await again.journal_get("c1")
    assert recovered is not None and recovered.status == "failed"
    assert recovered.reason == RESTARTED_REASON and not recovered.reported
    assert [e.command_id for e in await again.journal_unreported()] == ["c1"]
    known, new = await again.journal_receive("c2", asset_id="a", site_id=None, mw=1, duration_s=0)
    assert not new and known.status == "applied" and known.reported
    assert known.allocations == (Allocation(asset_id="a", mw=1.0),)


async def test_journal_keeps_7_days_or_the_newest_rows_then_prunes(
    opened: Callable[..., Buffer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(buffer_module, "JOURNAL_KEEP_ROWS", 3)
    clock = FakeClock()
    buffer = opened(clock=clock)
    for n in range(6):
        await buffer.journal_receive(f"c{n}", asset_id="a", site_id=None, mw=0, duration_s=None)
        await buffer.journal_finish(f"c{n}", "applied")
        await buffer.journal_reported(f"c{n}")
        clock.now += 60
    await buffer.journal_receive("busy", asset_id="a", site_id=None, mw=0, duration_s=None)
    buffer._last_prune = -1e9
    await buffer.maintain()
    assert await buffer.journal_get("c0") is not None  # younger than 7 days: kept

    clock.now += 8 * 24 * 3600
    buffer._last_prune = -1e9
    await buffer.maintain()
    kept = [n for n in range(6) if await buffer.journal_get(f"c{n}") is not None]
    assert kept == [4, 5]  # the newest 3 rows are c4, c5 and the one still in progress
    assert await buffer.journal_get("busy") is not None


# ----------------------------------------------------------------------------- never dropped


async def test_events_local_reports_and_setpoints_in_force_are_kept_until_acknowledged(
    tmp_path: Path, opened: Callable[..., Buffer]
) -> None:
    path = tmp_path / "kept.sqlite3"
    size = len(buffer_module.codec.telemetry_payload(_batch("a")))
    buffer = Buffer(str(path), max_bytes=size)
    report = LocalDispatchReport(
        command_id="local-1",
        mw=0.5,
        ts=datetime(2024, 5, 1, tzinfo=UTC),
        status="applied",
        asset_id="a",
        allocations=(Allocation(asset_id="a", mw=0.5),),
    )
    await buffer.add_local_report(report)
    first = await buffer.add_event("custom", "first", asset_id="a", data={"n": 1})
    second = await buffer.add_event("custom", "second")
    await buffer.set_in_force("a", "headend", "c1")
    for tag in "abc":
        await buffer.append(_batch(tag))  # the bound drops telemetry, nothing else
    await buffer.ack_event(first.event_id)
    await buffer.close()

    again = opened(path, max_bytes=size)
    await again.open()
    assert await again.local_reports() == [report]
    kept = await again.events()
    assert [e.event_id for e in kept][:1] == [second.event_id]
    assert [e.kind for e in kept][1:] == ["telemetry_dropped"] and again.event_count == 2
    assert again.in_force == {"a": "headend"}
    await again.ack_local_report("local-1")
    assert await again.local_reports() == [] and again.local_report_count == 0


# ----------------------------------------------------------------------------- backoff


def test_first_reconnect_delays_of_100_agents_are_spread() -> None:
    rng = random.Random(42)
    delays = [Backoff(1.0, 120.0, rng).delay(1) for _ in range(100)]
    assert all(0.8 <= d <= 1.2 for d in delays)
    assert len({round(d, 3) for d in delays}) > 90  # not one instant
    assert max(delays) - min(delays) > 0.3
    assert statistics.pstdev(delays) > 0.08  # uniform over ±20 %: about 0.115


def test_reconnect_delays_grow_by_1_6_up_to_the_cap_with_20_percent_jitter() -> None:
    backoff = Backoff(1.0, 120.0, random.Random(7))
    bases = [backoff.base(n) for n in range(1, 14)]
    assert bases[:4] == pytest.approx([1.0, 1.6, 2.56, 4.096])
    for before, after in itertools.pairwise(bases):
        assert after == pytest.approx(min(before * RECONNECT_MULTIPLIER, 120.0))
    assert bases[-1] == 120.0 and backoff.base(10_000) == 120.0
    for attempt in (1, 5, 12, 50):
        base = backoff.base(attempt)
        for _ in range(50):
            delay = backoff.delay(attempt)
            assert base * (1 - RECONNECT_JITTER) <= delay <= base * (1 + RECONNECT_JITTER)
    assert Backoff().initial_s == 1.0 and Backoff().max_s == 120.0
