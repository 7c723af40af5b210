"""The agent's stores in their buffer file, on their own (no network): durability across a
killed process, seq and stream id, size and age bounds, acknowledgements, the journal,
events and local reports, a file written by the single-class buffer; and the reconnect
backoff."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import signal
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from der_sdk.errors import DerSdkError
from der_sdk.models import TelemetrySample, utc_now
from der_sdk.wire import codec
from der_sdk.wire.codec import AgentEventRecord, Allocation, LocalDispatchReport
from der_sdk_agent.link import RECONNECT_JITTER, RECONNECT_MULTIPLIER, Backoff
from der_sdk_agent.store import BufferFile, CommandJournal, Outbox, SyncMode, TelemetryQueue
from der_sdk_agent.store import journal as journal_module
from der_sdk_agent.store.journal import RESTARTED_REASON

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


@dataclass
class Stores:
    """The agent's three stores in one buffer file, as :class:`~der_sdk_agent.agent.Agent`
    makes them."""

    file: BufferFile
    outbox: Outbox
    journal: CommandJournal
    telemetry: TelemetryQueue

    async def open(self) -> None:
        await self.file.open()

    async def close(self) -> None:
        await self.file.close()


def stores(
    path: str | Path = ":memory:",
    *,
    sync: SyncMode = "normal",
    clock: Callable[[], float] = time.time,
    **telemetry_options: float,
) -> Stores:
    file = BufferFile(str(path), sync=sync)
    outbox = Outbox(file, clock=clock)
    journal = CommandJournal(file, clock=clock)
    telemetry = TelemetryQueue(file, outbox, clock=clock, **telemetry_options)  # type: ignore[arg-type]
    return Stores(file, outbox, journal, telemetry)


@pytest.fixture
async def opened() -> AsyncIterator[Callable[..., Stores]]:
    """Make stores; every file is closed afterwards."""
    made: list[Stores] = []

    def make(path: str | Path = ":memory:", **kwargs: object) -> Stores:
        made.append(stores(path, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for buffer in made:
        await buffer.close()


# ----------------------------------------------------------------------------- durability

_WRITER = """
import asyncio, sys
from der_sdk.models import TelemetrySample, utc_now
from der_sdk_agent.store import BufferFile, Outbox, TelemetryQueue

async def main(path, count):
    file = BufferFile(path)
    telemetry = TelemetryQueue(file, Outbox(file))
    await file.open()
    for i in range(count):
        sample = TelemetrySample(asset_id="a", site_id="s", ts=utc_now(), mw=float(i), seq=i + 1)
        await telemetry.append([sample])
    print(telemetry.stream_id, flush=True)
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

    buffer = stores(path)
    await buffer.open()
    telemetry = buffer.telemetry
    try:
        assert telemetry.stream_id == stream_id
        assert telemetry.seqs() == list(range(1, 41))
        values = [s.mw for seq in telemetry.seqs() for s in await telemetry.batch(seq)]
        assert values == [float(i) for i in range(40)]
        assert await telemetry.append(_batch("after")) == 41  # seq goes on after the kill
    finally:
        await buffer.close()


async def test_seq_goes_on_across_reopen_and_a_new_file_gets_a_new_stream_id(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    first = stores(tmp_path / "a" / "b.sqlite3").telemetry  # the folder is created
    assert [await first.append(_batch(t)) for t in "xyz"] == [1, 2, 3]
    first.ack(3, stored_through=3)
    stream_id = first.stream_id
    await first.file.close()

    again = opened(tmp_path / "a" / "b.sqlite3").telemetry
    await again.open()
    assert again.stream_id == stream_id and len(again) == 0
    assert await again.append(_batch("w")) == 4  # never reused, even with nothing held

    other = opened(tmp_path / "other.sqlite3").telemetry
    await other.open()
    assert other.stream_id != stream_id and other.next_seq == 1


async def test_memory_buffer_works_and_keeps_nothing(opened: Callable[..., Stores]) -> None:
    buffer = opened().telemetry
    assert await buffer.append(_batch("a", 2)) == 1
    assert not buffer.file.durable and buffer.stats().samples == 2
    assert [s.asset_id for s in await buffer.batch(1)] == ["a0", "a1"]
    assert opened().telemetry.stream_id != buffer.stream_id


async def test_a_buffer_file_in_use_is_refused_naming_it(
    tmp_path: Path, opened: Callable[..., Stores]
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
        await stores(path).open()
    assert str(path) in str(caught.value) and "move the file away" in str(caught.value)


async def test_sync_full_is_applied_to_the_file(tmp_path: Path) -> None:
    buffer = stores(tmp_path / "full.sqlite3", sync="full")
    await buffer.open()
    try:

        def modes(conn: sqlite3.Connection) -> tuple[str, int]:
            return (
                conn.execute("PRAGMA journal_mode").fetchone()[0],
                conn.execute("PRAGMA synchronous").fetchone()[0],
            )

        assert await buffer.file.run(modes) == ("wal", 2)  # 2: FULL
    finally:
        await buffer.close()


# ----------------------------------------------------------------------------- bounds


async def test_size_bound_drops_the_oldest_batches_with_counts_and_one_event(
    opened: Callable[..., Stores], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="der.agent.buffer")
    size = len(codec.telemetry_payload(_batch("a", 2)))
    stored = opened(max_bytes=size * 3)
    buffer = stored.telemetry
    for tag in "abc":
        await buffer.append(_batch(tag, 2))
    assert buffer.stats().dropped_batches == 0
    await buffer.append(_batch("d", 2))
    await buffer.append(_batch("e", 2))
    assert buffer.seqs() == [3, 4, 5]  # the oldest went first
    stats = buffer.stats()
    assert (stats.dropped_batches, stats.dropped_samples, stats.batches) == (2, 4, 3)
    assert stats.bytes <= size * 3
    [event] = await stored.outbox.events.all()  # the second drop, within the minute, is coalesced
    assert event.kind == "telemetry_dropped"
    assert event.data["first_seq"] == 1 and event.data["batches"] == 1
    assert event.data["reasons"] == ["size"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped the 1 oldest batch" in warnings[0].getMessage()


async def test_drops_within_a_minute_are_reported_together(
    opened: Callable[..., Stores],
) -> None:
    size = len(codec.telemetry_payload(_batch("a")))
    stored = opened(max_bytes=size, drop_report_every_s=0.2)
    buffer, events = stored.telemetry, stored.outbox.events
    for tag in "abcd":
        await buffer.append(_batch(tag))  # each drops the one before
    assert events.count == 1  # seq 1, reported at once
    await asyncio.sleep(0.25)
    await buffer.maintain()  # the upkeep reports what is pending
    _, second = await events.all()
    assert (second.data["first_seq"], second.data["last_seq"]) == (2, 3)
    assert second.data["batches"] == 2 and second.data["dropped_batches_total"] == 3


async def test_age_bound_drops_batches_older_than_max_age(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    clock = FakeClock()
    path = tmp_path / "aged.sqlite3"
    stored = stores(path, max_age_s=3600, clock=clock)
    buffer = stored.telemetry
    await buffer.append(_batch("old", 3))
    clock.now += 1800
    await buffer.append(_batch("mid", 2))
    clock.now += 1801  # the first batch is now older than an hour
    await buffer.maintain()
    assert buffer.seqs() == [2]
    assert (buffer.dropped_batches, buffer.dropped_samples) == (1, 3)
    assert (await stored.outbox.events.all())[0].data["reasons"] == ["age"]
    await stored.close()

    clock.now += 7200  # an agent started after a long stop drops what aged meanwhile
    again = opened(path, max_age_s=3600, clock=clock).telemetry
    await again.open()
    assert len(again) == 0 and again.stats().dropped_samples == 5  # the counters persist


# ----------------------------------------------------------------------------- acks


async def test_ack_forgets_the_batch_and_everything_through_stored_through(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    path = tmp_path / "acks.sqlite3"
    buffer = stores(path, ack_flush_s=0.01).telemetry
    for tag in "abcdefg":
        await buffer.append(_batch(tag))
    assert buffer.ack(6, stored_through=3) == 4
    assert buffer.seqs() == [4, 5, 7] and buffer.floor_seq == 4
    assert buffer.ack(6) == 0  # twice is harmless

    def rows() -> list[int]:
        with sqlite3.connect(path) as conn:  # the WAL is readable once the buffer is closed
            return [r[0] for r in conn.execute("SELECT seq FROM telemetry ORDER BY seq")]

    await asyncio.sleep(0.05)  # the delete is batched
    await buffer.file.close()
    assert rows() == [4, 5, 7]


async def test_acknowledged_batches_are_deleted_in_the_transaction_adding_the_next(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    buffer = opened(tmp_path / "acks-next.sqlite3", ack_flush_s=3600.0).telemetry
    for tag in "abc":
        await buffer.append(_batch(tag))
    buffer.ack(2)
    buffer.ack(3, stored_through=1)

    def rows(conn: sqlite3.Connection) -> list[int]:
        return [r[0] for r in conn.execute("SELECT seq FROM telemetry ORDER BY seq")]

    assert await buffer.file.run(rows) == [1, 2, 3]  # the flush is an hour away
    added = await buffer.append(_batch("d"))
    assert await buffer.file.run(rows) == [added] == buffer.seqs()


async def test_the_batch_just_appended_reads_back_as_the_file_holds_it_and_not_once_acked(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    path = tmp_path / "fresh.sqlite3"
    buffer = stores(path).telemetry
    first = await buffer.append(_batch("a", 3))
    last = await buffer.append(_batch("b", 2))
    fresh = await buffer.read(last)  # the link reads it at once to send it
    older = await buffer.read(first)
    assert [s.asset_id for s in await buffer.batch(last)] == ["b0", "b1"]
    await buffer.file.close()
    with sqlite3.connect(path) as conn:
        stored = dict(conn.execute("SELECT seq, payload FROM telemetry").fetchall())
    assert stored == {first: older, last: fresh}

    acked = opened().telemetry
    seq = await acked.append(_batch("c"))
    acked.ack(seq)
    assert await acked.read(seq) is None and await acked.batch(seq) == []


async def test_the_buffer_lists_exactly_the_seqs_it_dropped_until_an_ack_covers_them(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    path = tmp_path / "dropped.sqlite3"
    size = len(codec.telemetry_payload(_batch("a")))
    buffer = opened(path, max_bytes=size * 3, ack_flush_s=0.01).telemetry
    for tag in "abc":
        await buffer.append(_batch(tag))
    buffer.ack(2)  # acknowledged, not dropped: held 1, 3
    for tag in "def":
        await buffer.append(_batch(tag))  # 4, 5, 6 push out 1 and 3
    assert buffer.seqs() == [4, 5, 6] and buffer.dropped_ranges == [(1, 1), (3, 3)]
    assert buffer.drop_report() == (4, [(1, 1), (3, 3)])
    assert buffer.drop_report(limit=1) == (3, [(1, 1)])  # 3 is left out: the floor says so
    await buffer.append(_batch("g"))  # drops 4: continues the range of 3
    assert buffer.dropped_ranges == [(1, 1), (3, 4)]

    await buffer.file.close()
    reopened = opened(path, max_bytes=size * 3, ack_flush_s=0.01).telemetry
    await reopened.open()
    assert reopened.dropped_ranges == [(1, 1), (3, 4)], "kept in the file"
    reopened.ack(5, stored_through=3)
    assert reopened.dropped_ranges == [(4, 4)]
    await asyncio.sleep(0.05)  # the delete is batched
    await reopened.file.close()
    again = opened(path, max_bytes=size * 3).telemetry
    await again.open()
    assert again.dropped_ranges == [(4, 4)] and again.drop_report() == (6, [(4, 4)])


# ----------------------------------------------------------------------------- journal


async def test_command_in_progress_at_open_becomes_failed_and_unreported(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    path = tmp_path / "journal.sqlite3"
    buffer = stores(path).journal
    entry, new = await buffer.receive("c1", asset_id="a", site_id=None, mw=1.5, duration_s=None)
    assert new and entry.status == "acked" and not entry.final
    await buffer.receive("c2", asset_id="a", site_id=None, mw=1, duration_s=None)
    await buffer.finish("c2", "applied", [Allocation(asset_id="a", mw=1.0)])
    await buffer.mark_reported("c2")
    await buffer.file.close()  # the agent "died" while applying c1

    again = opened(path).journal
    await again.open()
    recovered = await again.get("c1")
    assert recovered is not None and recovered.status == "failed"
    assert recovered.reason == RESTARTED_REASON and not recovered.reported
    assert [e.command_id for e in await again.unreported()] == ["c1"]
    known, new = await again.receive("c2", asset_id="a", site_id=None, mw=1, duration_s=0)
    assert not new and known.status == "applied" and known.reported
    assert known.allocations == (Allocation(asset_id="a", mw=1.0),)


async def test_journal_keeps_7_days_or_the_newest_rows_then_prunes(
    opened: Callable[..., Stores], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "JOURNAL_KEEP_ROWS", 3)
    clock = FakeClock()
    buffer = opened(clock=clock).journal
    for n in range(6):
        await buffer.receive(f"c{n}", asset_id="a", site_id=None, mw=0, duration_s=None)
        await buffer.finish(f"c{n}", "applied")
        await buffer.mark_reported(f"c{n}")
        clock.now += 60
    await buffer.receive("busy", asset_id="a", site_id=None, mw=0, duration_s=None)
    buffer._last_prune = -1e9
    await buffer.maintain()
    assert await buffer.get("c0") is not None  # younger than 7 days: kept

    clock.now += 8 * 24 * 3600
    buffer._last_prune = -1e9
    await buffer.maintain()
    kept = [n for n in range(6) if await buffer.get(f"c{n}") is not None]
    assert kept == [4, 5]  # the newest 3 rows are c4, c5 and the one still in progress
    assert await buffer.get("busy") is not None


# ----------------------------------------------------------------------------- never dropped


async def test_events_local_reports_and_setpoints_in_force_are_kept_until_acknowledged(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    path = tmp_path / "kept.sqlite3"
    size = len(codec.telemetry_payload(_batch("a")))
    buffer = stores(path, max_bytes=size)
    report = LocalDispatchReport(
        command_id="local-1",
        mw=0.5,
        ts=datetime(2024, 5, 1, tzinfo=UTC),
        status="applied",
        asset_id="a",
        allocations=(Allocation(asset_id="a", mw=0.5),),
    )
    await buffer.outbox.local_reports.add(report)
    first = await buffer.outbox.add_event("custom", "first", asset_id="a", data={"n": 1})
    second = await buffer.outbox.add_event("custom", "second")
    await buffer.journal.set_in_force("a", "headend", "c1")
    for tag in "abc":
        await buffer.telemetry.append(_batch(tag))  # the bound drops telemetry, nothing else
    await buffer.outbox.events.ack(first.event_id)
    await buffer.close()

    again = opened(path, max_bytes=size)
    await again.open()
    reports, events = again.outbox.local_reports, again.outbox.events
    assert await reports.all() == [report]
    kept = await events.all()
    assert [e.event_id for e in kept][:1] == [second.event_id]
    assert [e.kind for e in kept][1:] == ["telemetry_dropped"] and events.count == 2
    assert again.journal.in_force == {"a": "headend"}
    await reports.ack("local-1")
    assert await reports.all() == [] and reports.count == 0


async def test_the_unacknowledged_count_keeps_an_event_added_while_another_is_acknowledged(
    opened: Callable[..., Stores],
) -> None:
    """An ack and an add interleaved on the loop: the count is what the file holds (it went
    to -1 once: the ack read the count before its write and stored it after the add)."""
    buffer = opened()
    await buffer.open()
    events = buffer.outbox.events
    first = await buffer.outbox.add_event("custom", "first")
    second = AgentEventRecord(
        event_id="second", ts=utc_now(), kind="custom", message="second", data={}
    )
    await asyncio.gather(events.add(second), events.ack(first.event_id))
    assert events.count == 1 and [e.event_id for e in await events.all()] == ["second"]
    await events.ack("second")
    assert events.count == 0


# ----------------------------------------------------------------------------- file format

# The buffer file as the single-class ``Buffer`` (der_sdk_agent/buffer.py, schema version 1)
# wrote it, copied from that code: the stores must open such a file and keep its data.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS telemetry (
    seq INTEGER PRIMARY KEY,
    created_us INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outcomes (
    command_id TEXT PRIMARY KEY,
    received_us INTEGER NOT NULL,
    asset_id TEXT,
    site_id TEXT,
    mw REAL NOT NULL,
    duration_s REAL,
    status TEXT NOT NULL,
    final_us INTEGER,
    reason TEXT,
    allocations BLOB NOT NULL DEFAULT '[]',
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outcomes_received ON outcomes (received_us);
CREATE TABLE IF NOT EXISTS events (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    created_us INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS local_reports (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL UNIQUE,
    created_us INTEGER NOT NULL,
    report BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS in_force (
    asset_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    command_id TEXT,
    ts_us INTEGER NOT NULL
);
"""


def _write_v1_file(path: Path, payloads: dict[int, bytes], records: list[bytes]) -> None:
    """A file as an agent with the single-class buffer left it: three batches held (7..9),
    1..3 and 5 dropped, an outcome unreported, a command in progress, an event, a local
    report and a setpoint in force."""
    event, report = records
    now_us = codec.datetime_to_us(utc_now())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(_SCHEMA_V1)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [
                ("schema_version", 1),
                ("stream_id", "stream-v1"),
                ("next_seq", 10),
                ("dropped_samples", 8),
                ("dropped_batches", 4),
                ("created_us", now_us - 10_000_000),
            ],
        )
        conn.executemany(
            "INSERT INTO telemetry (seq, created_us, samples, bytes, payload) "
            "VALUES (?, ?, 2, ?, ?)",
            [(seq, now_us - 1000 + seq, len(p), p) for seq, p in payloads.items()],
        )
        conn.executemany("INSERT INTO dropped VALUES (?, ?)", [(1, 3), (5, 5)])
        conn.execute(
            "INSERT INTO outcomes (command_id, received_us, asset_id, site_id, mw, duration_s, "
            "status, final_us, reason, allocations, reported) "
            "VALUES ('c1', ?, 'a', NULL, 0.5, NULL, 'applied', ?, NULL, ?, 0)",
            (now_us - 3000, now_us - 2000, b'[{"asset_id":"a","mw":0.5}]'),
        )
        conn.execute(
            "INSERT INTO outcomes (command_id, received_us, asset_id, site_id, mw, status) "
            "VALUES ('c2', ?, 'a', NULL, 0.7, 'acked')",
            (now_us - 1000,),
        )
        conn.execute(
            "INSERT INTO events (event_id, created_us, record) VALUES ('e1', ?, ?)",
            (now_us, event),
        )
        conn.execute(
            "INSERT INTO local_reports (command_id, created_us, report) VALUES ('local-1', ?, ?)",
            (now_us, report),
        )
        conn.execute("INSERT INTO in_force VALUES ('a', 'local', 'local-1', ?)", (now_us,))
        conn.commit()


def _file_schema(path: Path) -> list[tuple[str, str, str | None]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name")
        return [(kind, name, sql) for kind, name, sql in rows]


async def test_a_buffer_file_written_by_the_single_class_buffer_opens_with_all_its_data(
    tmp_path: Path, opened: Callable[..., Stores]
) -> None:
    path = tmp_path / "agent-v1.sqlite3"
    batches = {seq: _batch(f"t{seq}-", 2) for seq in (7, 8, 9)}
    payloads = {seq: codec.telemetry_payload(batch) for seq, batch in batches.items()}
    event = AgentEventRecord(
        event_id="e1", ts=datetime(2024, 5, 1, tzinfo=UTC), kind="custom", message="kept"
    )
    report = LocalDispatchReport(
        command_id="local-1", mw=0.2, ts=datetime(2024, 5, 1, tzinfo=UTC), status="applied"
    )
    records = [msgspec.json.encode(event), msgspec.json.encode(report)]
    await asyncio.to_thread(_write_v1_file, path, payloads, records)
    schema = await asyncio.to_thread(_file_schema, path)

    stored = opened(path)
    await stored.open()
    telemetry, journal, outbox = stored.telemetry, stored.journal, stored.outbox
    assert telemetry.stream_id == "stream-v1" and telemetry.seqs() == [7, 8, 9]
    assert telemetry.next_seq == 10 and telemetry.samples == 6
    assert telemetry.dropped_ranges == [(1, 3), (5, 5)]
    assert telemetry.drop_report() == (7, [(1, 3), (5, 5)])
    assert (telemetry.dropped_samples, telemetry.dropped_batches) == (8, 4)
    assert await telemetry.read(8) == payloads[8]
    assert [s.asset_id for s in await telemetry.batch(9)] == ["t9-0", "t9-1"]

    applied = await journal.get("c1")
    assert applied is not None and applied.status == "applied" and not applied.reported
    assert applied.allocations == (Allocation(asset_id="a", mw=0.5),)
    recovered = await journal.get("c2")  # in progress when that agent stopped
    assert recovered is not None and recovered.status == "failed"
    assert recovered.reason == RESTARTED_REASON
    assert [e.command_id for e in await journal.unreported()] == ["c1", "c2"]
    assert journal.unreported_count == 2 and journal.in_force == {"a": "local"}

    assert await outbox.events.all() == [event] and outbox.events.last_n == 1
    assert await outbox.local_reports.all() == [report] and outbox.local_reports.count == 1

    assert await telemetry.append(_batch("new")) == 10  # the seq goes on
    await stored.close()
    after = {name: sql for _, name, sql in await asyncio.to_thread(_file_schema, path)}
    before = {name: sql for _, name, sql in schema}
    assert set(after) - set(before) == {"schedules", "sqlite_autoindex_schedules_1"}, (
        "only the schedule journal is added"
    )
    assert after["outcomes"] == f"{(before['outcomes'] or '')[:-1]}, superseded_by TEXT)", (
        "outcomes gains one column"
    )
    assert {k: v for k, v in after.items() if k in before and k != "outcomes"} == {
        k: v for k, v in before.items() if k != "outcomes"
    }, "every other table is unchanged"


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
