"""The storage conformance suite (der_sdk.testing.StorageConformance) against the built-in
backends, ``memory://`` and SQLite, plus what is specific to SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.models import Event
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.storage import open_storage
from der_sdk.storage.contract import TELEMETRY_COLUMNS, close_sessions_left_open, filtered_events
from der_sdk.storage.memory import MemoryStorage
from der_sdk.storage.sqlite import SCHEMA_VERSION, SQLiteStorage, sqlite_path_from_url
from der_sdk.testing import StorageConformance

ASSET_A = StorageConformance.ASSET_A
ASSET_B = StorageConformance.ASSET_B
SITE = StorageConformance.SITE
at = StorageConformance.at
sample = StorageConformance.sample
dispatch = StorageConformance.dispatch
session = StorageConformance.session

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(when: datetime) -> int:
    """``when`` as SQLite stores it: microseconds since the Unix epoch."""
    return (when - _EPOCH) // timedelta(microseconds=1)


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return load_plugins(entry_points=False)


class TestMemoryStorage(StorageConformance):
    url = "memory://"
    expected_name = "memory"
    persistent = False

    def load_plugins(self) -> Plugins:
        return load_plugins(entry_points=False)


class TestSQLiteStorage(StorageConformance):
    url = "sqlite:///{tmp}/data/der.db"  # tmp is absolute: sqlite:////tmp/...
    expected_name = "sqlite"

    def load_plugins(self) -> Plugins:
        return load_plugins(entry_points=False)


# --------------------------------------------------------------------------- SQLite only


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path, plugins: Plugins) -> None:
    url = f"sqlite:///{tmp_path}/der.db"
    first = open_storage(url, plugins)
    await first.open()
    await first.append_telemetry([sample(ASSET_A, 0, details={"soc_pct": 50.0})])
    await first.save_dispatch(dispatch("d1", 0, site_id=SITE, targets=(ASSET_A,)))
    await first.open_session(session("s1", ASSET_A, 0))
    await first.close()

    second = open_storage(url, plugins)
    await second.open()
    try:
        assert await second.telemetry_history(ASSET_A) == [
            sample(ASSET_A, 0, details={"soc_pct": 50.0})
        ]
        assert [d.dispatch_id for d in await second.dispatch_history(asset_id=ASSET_A)] == ["d1"]
        assert await second.close_open_sessions(at(1)) == 1
        assert await second.append_telemetry([sample(ASSET_A, 0)]) == 0
    finally:
        await second.close()


async def test_a_sqlite_file_from_schema_2_keeps_its_data_and_gains_headend_ids(
    tmp_path: Path,
) -> None:
    path = tmp_path / "schema2.db"
    storage = SQLiteStorage(path)
    await storage.open()
    await storage.append_telemetry([sample(ASSET_A, 0)])
    await storage.save_dispatch(dispatch("d1", 0, asset_id=ASSET_A))
    await storage.close()

    def downgrade() -> None:  # what der-sdk before headend ids (schema 2) wrote
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("DROP INDEX sessions_open_by_headend")
            db.execute("ALTER TABLE sessions DROP COLUMN headend_id")
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (2)")
            db.executemany(
                "INSERT INTO sessions (session_id, asset_id, site_id, agent_id, peer,"
                " connected_at, disconnected_at) VALUES (?, ?, ?, 'agent-1', 'peer', ?, ?)",
                [
                    ("left-open", ASSET_A, SITE, _us(at(2)), None),
                    ("closed", ASSET_A, SITE, _us(at(0)), _us(at(1))),
                ],
            )

    await asyncio.to_thread(downgrade)

    # Two headends starting on the old file at once: both migrate-or-wait and open.
    first, second = SQLiteStorage(path), SQLiteStorage(path)
    await asyncio.gather(first.open(), second.open())
    try:
        assert await first.telemetry_history(ASSET_A) == [sample(ASSET_A, 0)]
        assert [d.dispatch_id for d in await first.dispatch_history()] == ["d1"]
        recent = await first.recent_sessions(ASSET_A)
        assert [(s.session_id, s.headend_id, s.disconnected_at) for s in recent] == [
            ("left-open", None, None),
            ("closed", None, at(1)),
        ]
        await second.open_session(session("new", ASSET_A, 3, headend_id="headend-b"))
        # The session from before headend ids is closed by the first headend to start.
        assert await second.close_open_sessions(at(9), headend_id="headend-a") == 1
        newest, left_open, _ = await first.recent_sessions(ASSET_A)
        assert (newest.headend_id, newest.disconnected_at) == ("headend-b", None)
        assert left_open.disconnected_at == at(9)
    finally:
        await asyncio.gather(first.close(), second.close())

    def versions() -> list[int]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return [v for (v,) in db.execute("SELECT version FROM schema_version")]

    assert max(await asyncio.to_thread(versions)) == SCHEMA_VERSION == 7


async def test_a_sqlite_file_from_schema_4_numbers_its_telemetry_in_time_order_for_exporters(
    tmp_path: Path,
) -> None:
    path = tmp_path / "schema4.db"
    storage = SQLiteStorage(path)
    await storage.open()
    stored = [sample(ASSET_B, 2), sample(ASSET_A, 0), sample(ASSET_A, 1)]
    await storage.append_telemetry(stored)
    await storage.close()

    def downgrade() -> None:  # what der-sdk before exporters (schema 4) wrote
        columns = ", ".join(TELEMETRY_COLUMNS)
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(
                "CREATE TABLE telemetry_v4 (asset_id TEXT NOT NULL, site_id TEXT NOT NULL,"
                " ts INTEGER NOT NULL, mw REAL, mw_setpoint REAL, online INTEGER NOT NULL,"
                " status TEXT, fault_code TEXT, seq INTEGER NOT NULL, quality TEXT NOT NULL,"
                " quality_reason TEXT, details TEXT NOT NULL, PRIMARY KEY (asset_id, ts))"
                " WITHOUT ROWID"
            )
            db.execute(f"INSERT INTO telemetry_v4 SELECT {columns} FROM telemetry")
            db.execute("DROP TABLE telemetry")
            db.execute("ALTER TABLE telemetry_v4 RENAME TO telemetry")
            db.execute("DROP TABLE exporter_cursors")
            db.execute("UPDATE schema_version SET version = 4")

    await asyncio.to_thread(downgrade)

    upgraded = SQLiteStorage(path)
    await upgraded.open()
    try:
        assert await upgraded.telemetry_history(ASSET_A) == [sample(ASSET_A, 1), sample(ASSET_A, 0)]
        assert await upgraded.append_telemetry([sample(ASSET_A, 1)]) == 0, "still unique"
        old = await upgraded.telemetry_changes(None, 10)
        assert old.samples == sorted(stored, key=lambda s: (s.ts, s.asset_id))
        await upgraded.append_telemetry([sample(ASSET_A, -5)])
        new = await upgraded.telemetry_changes(old.cursor, 10)
        assert new.samples == [sample(ASSET_A, -5)]
        await upgraded.save_exporter_cursor("files", new.cursor or "")
        assert await upgraded.exporter_cursor("files") == new.cursor
    finally:
        await upgraded.close()


class _StorageBeforeHeadendIds(MemoryStorage):
    """A backend written for der-sdk 0.1: ``close_open_sessions`` takes no headend id."""

    async def close_open_sessions(self, disconnected_at: datetime) -> int:  # type: ignore[override]
        return await super().close_open_sessions(disconnected_at)


async def test_a_backend_without_headend_id_in_close_open_sessions_still_works_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = _StorageBeforeHeadendIds()
    await storage.open()
    await storage.open_session(session("a", ASSET_A, 0, headend_id="headend-a"))
    await storage.open_session(session("b", ASSET_A, 1, headend_id="headend-b"))

    assert await close_sessions_left_open(storage, at(5), "headend-a") == 2
    assert "close_open_sessions without headend_id" in caplog.text
    assert "closing every headend's open sessions" in caplog.text

    newer = MemoryStorage()
    await newer.open()
    await newer.open_session(session("a", ASSET_A, 0, headend_id="headend-a"))
    await newer.open_session(session("b", ASSET_A, 1, headend_id="headend-b"))
    assert await close_sessions_left_open(newer, at(5), "headend-a") == 1


class _StorageBeforeEventFilters(MemoryStorage):
    """A backend written for der-sdk 0.1: ``events`` filters by asset and kind only."""

    async def events(  # type: ignore[override]
        self, *, asset_id: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[Event]:
        return await super().events(asset_id=asset_id, kind=kind, limit=limit)


async def test_a_backend_without_the_new_event_filters_still_answers_them_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    older, newer = _StorageBeforeEventFilters(), MemoryStorage()
    events = [
        Event(ts=at(0), kind="audit", message="a", site_id="s1"),
        Event(ts=at(1), kind="condition_raised", message="b", asset_id=ASSET_A, site_id="s1"),
        Event(ts=at(2), kind="condition_raised", message="c", site_id="s2"),
        Event(ts=at(3), kind="condition_cleared", message="d", asset_id=ASSET_A, site_id="s1"),
    ]
    for storage in (older, newer):
        await storage.open()
        for event in events:
            await storage.append_event(event)
    queries: list[dict[str, Any]] = [
        {"site_id": "s1", "exclude_kinds": ("audit",)},
        {"start": at(1), "end": at(3)},
        {"asset_id": ASSET_A, "kind": "condition_cleared"},
        {"exclude_kinds": ("audit",), "limit": 2},
    ]
    for query in queries:
        expected = await filtered_events(newer, **query)
        assert await filtered_events(older, **query) == expected, query
    assert [e.message for e in await filtered_events(older, **queries[0])] == ["d", "b"]
    assert "events() without site_id, exclude_kinds, start and end" in caplog.text
    caplog.clear()
    await filtered_events(newer, site_id="s1")
    assert "events() without" not in caplog.text


async def test_sqlite_relative_path_is_created_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugins: Plugins
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = open_storage("sqlite:///nested/dir/der.db", plugins)
    await backend.open()
    try:
        assert await backend.append_telemetry([sample(ASSET_A, 0)]) == 1
    finally:
        await backend.close()
    assert (tmp_path / "nested" / "dir" / "der.db").is_file()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative/path.db", "relative/path.db"),
        ("sqlite:////absolute/path.db", "/absolute/path.db"),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_url_forms(url: str, path: str) -> None:
    assert sqlite_path_from_url(url) == path
    assert SQLiteStorage.from_url(url).path == path


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/db", "sqlite:/x.db"])
def test_sqlite_rejects_malformed_urls(url: str) -> None:
    with pytest.raises(DerSdkError, match=r"use sqlite:///relative/path\.db"):
        sqlite_path_from_url(url)


async def test_sqlite_in_memory_database_works(plugins: Plugins) -> None:
    backend = open_storage("sqlite://:memory:", plugins)
    await backend.open()
    try:
        assert await backend.append_telemetry([sample(ASSET_A, 0)]) == 1
        assert len(await backend.telemetry_history(ASSET_A)) == 1
    finally:
        await backend.close()


def test_unknown_url_scheme_lists_installed_schemes(plugins: Plugins) -> None:
    with pytest.raises(UnknownNameError) as raised:
        open_storage("mongodb://localhost/der", plugins)

    assert raised.value.name == "mongodb"
    assert {"memory", "sqlite"} <= set(raised.value.installed)
    assert "memory" in str(raised.value) and "sqlite" in str(raised.value)


async def test_sqlite_writes_cancelled_mid_transaction_leave_the_connection_usable(
    tmp_path: Path,
) -> None:
    import asyncio
    import contextlib
    from datetime import UTC, datetime, timedelta

    from der_sdk.models import TelemetrySample

    storage = SQLiteStorage(str(tmp_path / "cancel.db"))
    await storage.open()
    base = datetime(2025, 1, 1, tzinfo=UTC)

    def sample(n: int) -> TelemetrySample:
        return TelemetrySample(asset_id="a", site_id="s", ts=base + timedelta(seconds=n), mw=1.0)

    try:
        for n in range(30):  # cancel at every point a writer can be cancelled at
            task = asyncio.create_task(storage.append_telemetry([sample(n)]))
            for _ in range(n % 6):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert await storage.append_telemetry([sample(1000)]) == 1
    finally:
        await storage.close()


def test_the_sql_telemetry_columns_are_the_sample_fields_in_order() -> None:
    from der_sdk.models import TelemetrySample
    from der_sdk.storage.contract import TELEMETRY_COLUMNS

    assert TelemetrySample.__struct_fields__ == TELEMETRY_COLUMNS


# --------------------------------------------------------------------------- SQLite's thread


@pytest.mark.parametrize("count", [1, 15, 17, 511, 513, 2049, 5000])
async def test_sqlite_telemetry_batches_of_any_size_store_every_sample_once(
    tmp_path: Path, count: int
) -> None:
    storage = SQLiteStorage(tmp_path / "sizes.db")
    await storage.open()
    try:
        batch = [sample(f"asset-{n % 7}", n) for n in range(count)]
        assert await storage.append_telemetry(batch) == count
        # Again, with one new sample at the end: only that one is new.
        assert await storage.append_telemetry([*batch, sample("asset-new", 0)]) == 1
        stored = [await storage.telemetry_history(f"asset-{k}", limit=10_000) for k in range(7)]
        assert sum(len(rows) for rows in stored) == count
        assert sorted(s.seq for rows in stored for s in rows) == sorted(s.seq for s in batch)
    finally:
        await storage.close()


async def test_sqlite_urgent_jobs_go_ahead_of_queued_telemetry_writes_but_cannot_starve_them(
    tmp_path: Path,
) -> None:
    import asyncio
    import threading

    from der_sdk.sqlite_worker import URGENT_BURST, SQLiteWorker

    thread = SQLiteWorker(str(tmp_path / "order.db"))
    await thread.open()
    order: list[str] = []
    gate = threading.Event()

    def job(name: str, wait: bool = False) -> object:
        def run(_: object) -> None:
            if wait:
                gate.wait(10)
            order.append(name)

        return run

    try:
        blocker = asyncio.create_task(thread.run(job("bulk-0", wait=True), bulk=True))
        await asyncio.sleep(0.05)  # the thread is inside bulk-0
        jobs = [asyncio.create_task(thread.run(job(f"bulk-{n}"), bulk=True)) for n in (1, 2)]
        urgent = URGENT_BURST + 2
        jobs += [asyncio.create_task(thread.run(job(f"urgent-{n}"))) for n in range(urgent)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(blocker, *jobs)
    finally:
        await thread.close()

    burst = [f"urgent-{n}" for n in range(URGENT_BURST)]
    rest = [f"urgent-{n}" for n in range(URGENT_BURST, urgent)]
    assert order == ["bulk-0", *burst, "bulk-1", *rest, "bulk-2"]


async def test_sqlite_dispatch_session_and_event_writes_run_before_queued_telemetry_writes(
    tmp_path: Path,
) -> None:
    """What the headend queues behind N telemetry writes (a dispatch's record, an agent's
    session, an event) is stored before all of them; the telemetry writes keep their order
    and are all stored."""
    import threading

    from der_sdk.models import DispatchEvent

    storage = SQLiteStorage(tmp_path / "priority.db")
    await storage.open()
    worker = storage._worker
    assert worker is not None
    gate = threading.Event()
    done: list[str] = []

    def track(name: str, awaitable: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(awaitable)
        task.add_done_callback(lambda _: done.append(name))
        return task

    writes = 6
    try:
        # The thread is inside a telemetry write (a bulk job) while the rest queue up.
        running = track("running", worker.run(lambda _: gate.wait(10), bulk=True))
        await asyncio.sleep(0.05)
        tasks = [
            track(f"telemetry-{n}", storage.append_telemetry([sample(ASSET_A, n)]))
            for n in range(writes)
        ]
        event = DispatchEvent(dispatch_id="d1", state="submitted", ts=at(0))
        tasks.append(track("dispatch", storage.record_dispatch(dispatch("d1", 0), event)))
        tasks.append(track("session", storage.open_session(session("s1", ASSET_A, 0))))
        tasks.append(track("event", storage.append_event(Event(ts=at(0), kind="k", message="m"))))
        await asyncio.sleep(0.05)
        assert done == [], "all of them wait for the write in progress"
        gate.set()
        await asyncio.gather(running, *tasks)
        assert len(await storage.telemetry_history(ASSET_A, limit=100)) == writes
        assert await storage.get_dispatch("d1") is not None
    finally:
        gate.set()
        await storage.close()
    assert done == [
        "running",
        "dispatch",
        "session",
        "event",
        *(f"telemetry-{n}" for n in range(writes)),
    ]


async def test_sqlite_a_dispatch_record_waits_for_one_statement_of_a_telemetry_write_not_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatch record that arrives while a long telemetry write runs is stored between
    two of the write's statements (the part written so far committed first); the write
    then goes on and stores every sample once, and counts only its own rows. (The writes
    on the storage thread itself; the next test, in the writer process.)"""
    import threading

    import der_sdk.storage.sqlite as sqlite_backend

    monkeypatch.setattr(sqlite_backend, "ROWS_PER_STATEMENT", 16)
    storage = SQLiteStorage(tmp_path / "yield.db", writer="thread")
    await storage.open()
    worker = storage._worker
    assert worker is not None
    inside, gate = threading.Event(), threading.Event()
    real = worker.yield_to_urgent
    ran: list[int] = []

    def pause_once(conn: Any) -> int:
        if not inside.is_set():
            inside.set()
            gate.wait(10)
        ran.append(real(conn))
        return ran[-1]

    monkeypatch.setattr(worker, "yield_to_urgent", pause_once)
    try:
        await _a_record_during_a_write(storage, inside, gate)
        assert ran[0] == 1 and sum(ran) == 1, "the record ran once, at the first pause"
    finally:
        gate.set()
        await storage.close()


async def _a_record_during_a_write(
    storage: SQLiteStorage, held: threading.Event, gate: threading.Event
) -> None:
    """Write 100 samples (7 statements of 16); once the write is ``held``, queue a
    dispatch record, open the ``gate``; the record must be stored before the write ends,
    and both completely."""
    from der_sdk.models import DispatchEvent

    done: list[str] = []
    batch = [sample(f"asset-{n % 5}", n) for n in range(100)]
    write = asyncio.ensure_future(storage.append_telemetry(batch))
    write.add_done_callback(lambda _: done.append("telemetry"))
    assert await asyncio.to_thread(held.wait, 10), "the write began"
    event = DispatchEvent(dispatch_id="d1", state="submitted", ts=at(0))
    record = asyncio.ensure_future(storage.record_dispatch(dispatch("d1", 0), event))
    record.add_done_callback(lambda _: done.append("dispatch"))
    await asyncio.sleep(0.05)  # the record is queued as urgent
    gate.set()
    assert await write == 100
    await record
    assert done == ["dispatch", "telemetry"]
    stored = [await storage.telemetry_history(f"asset-{k}", limit=1000) for k in range(5)]
    assert sum(len(rows) for rows in stored) == 100
    assert await storage.get_dispatch("d1") is not None


async def test_sqlite_writer_process_pauses_between_statements_for_a_dispatch_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the writer process too, a dispatch record queued while a telemetry write runs is
    stored between two of the write's statements, after the part written so far is
    committed, and the write then stores every sample once."""
    import threading

    import der_sdk.storage.sqlite as sqlite_backend

    monkeypatch.setattr(sqlite_backend, "ROWS_PER_STATEMENT", 16)  # the child's too
    storage = SQLiteStorage(tmp_path / "yield.db", writer="process")
    await storage.open()
    worker, process = storage._worker, storage._writer_process
    assert worker is not None and process is not None and process.pid is not None
    entered, gate = threading.Event(), threading.Event()
    real_insert, real_yield = process.insert, worker.yield_to_urgent
    committed_at_pause: list[int] = []

    def insert_after_gate(params: bytes, run_urgent: Any) -> int:
        entered.set()
        gate.wait(10)  # the record is queued now, while this write has begun
        return real_insert(params, run_urgent)

    def note_and_yield(conn: sqlite3.Connection) -> int:
        committed_at_pause.append(conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])
        return real_yield(conn)

    monkeypatch.setattr(process, "insert", insert_after_gate)
    monkeypatch.setattr(worker, "yield_to_urgent", note_and_yield)
    try:
        await _a_record_during_a_write(storage, entered, gate)
        assert committed_at_pause == [16], "paused once, after the first statement"
    finally:
        gate.set()
        await storage.close()


async def test_sqlite_a_write_whose_writer_process_died_fails_clearly_and_the_next_one_stores(
    tmp_path: Path,
) -> None:
    """If the writer process is killed, the write in progress fails with an error naming
    the writer and the database; the next write starts a new process, and storing the
    failed batch again stores each sample once."""
    import os
    import signal
    import sqlite3

    storage = SQLiteStorage(tmp_path / "killed.db", writer="process")
    await storage.open()
    try:
        process = storage._writer_process
        assert process is not None and process.pid is not None
        first = [sample("asset-1", n) for n in range(50)]
        assert await storage.append_telemetry(first) == 50
        old_pid = process.pid
        os.kill(old_pid, signal.SIGKILL)
        second = [sample("asset-1", n) for n in range(50, 100)]
        with pytest.raises(
            sqlite3.OperationalError, match=r"telemetry writer for .*killed\.db ended"
        ):
            await storage.append_telemetry(second)
        assert await storage.append_telemetry(first + second) == 50  # the first 50 are stored
        assert process.pid is not None and process.pid != old_pid
        assert len(await storage.telemetry_history("asset-1", limit=1000)) == 100
    finally:
        await storage.close()
    assert process.pid is None, "close() ends the writer process"


async def test_sqlite_a_sample_msgpack_cannot_carry_is_stored_by_the_storage_thread(
    tmp_path: Path,
) -> None:
    """Details holding an integer past 64 bits (JSON allows it, msgpack does not) cannot
    go to the writer process: that batch is written on the storage thread instead, and
    reads back exactly."""
    storage = SQLiteStorage(tmp_path / "bigint.db", writer="process")
    await storage.open()
    try:
        big = sample("asset-1", 0)
        big.details = {"counter": 2**70}
        assert await storage.append_telemetry([big, sample("asset-1", 1)]) == 2
        stored = await storage.telemetry_history("asset-1", limit=10)
        assert sorted(s.details.get("counter", 0) for s in stored) == [0, 2**70]
    finally:
        await storage.close()


def test_sqlite_writer_setting_is_checked_and_named() -> None:
    """``DER_SQLITE_WRITER`` (or ``writer=``) takes ``process`` or ``thread``; anything else
    is refused with the name of the setting; an in-memory database always writes on its
    thread (a child process cannot see it)."""
    from der_sdk.errors import DerSdkError

    with pytest.raises(DerSdkError, match="writer='child' is not one of process, thread"):
        SQLiteStorage("x.db", writer="child")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DER_SQLITE_WRITER", "fork")
        with pytest.raises(DerSdkError, match="DER_SQLITE_WRITER='fork'"):
            SQLiteStorage("x.db")
        patch.setenv("DER_SQLITE_WRITER", "Thread")
        assert SQLiteStorage("x.db").writer == "thread"
    assert SQLiteStorage("x.db").writer == "process"
    assert SQLiteStorage(":memory:", writer="process").writer == "thread"


async def test_sqlite_the_log_is_copied_into_the_database_by_its_own_thread(
    tmp_path: Path,
) -> None:
    """Checkpoints run on a second connection, not inside the storage thread's commits
    (where a dispatch record would wait for them): the storage connection checkpoints only
    far behind, and after a write the checkpointer copies every frame of the log."""
    from der_sdk.storage.sqlite import WAL_CHECKPOINT_PAGES

    storage = SQLiteStorage(tmp_path / "checkpoint.db")
    await storage.open()
    try:
        checkpointer = storage._checkpointer
        assert checkpointer is not None
        autocheckpoint = await storage._run(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        )
        assert autocheckpoint == WAL_CHECKPOINT_PAGES
        await storage.append_telemetry([sample(ASSET_A, n) for n in range(500)])
        for _ in range(500):
            if checkpointer.checkpoints:
                break
            await asyncio.sleep(0.01)
        assert checkpointer.checkpoints >= 1
        with contextlib.closing(sqlite3.connect(tmp_path / "checkpoint.db")) as conn:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and frames > 0 and copied == frames
    finally:
        await storage.close()
    assert storage._checkpointer is None


@pytest.mark.parametrize("long_log", [True, False], ids=["long-log", "short-log"])
async def test_sqlite_a_long_log_is_copied_again_after_the_next_write_without_the_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, long_log: bool
) -> None:
    """While the log holds BUSY_LOG_PAGES or more, the next write is followed by another
    checkpoint at once (so the log catches up and starts over); a short log waits
    CHECKPOINT_S between passes."""
    import der_sdk.storage.sqlite as sqlite_backend

    monkeypatch.setattr(sqlite_backend, "CHECKPOINT_S", 30.0)
    monkeypatch.setattr(sqlite_backend, "BUSY_LOG_PAGES", 1 if long_log else 10**9)
    storage = SQLiteStorage(tmp_path / "busy.db")
    await storage.open()
    try:
        checkpointer = storage._checkpointer
        assert checkpointer is not None

        async def checkpoints_after_a_write(n: int, within_s: float) -> int:
            await storage.append_telemetry([sample(ASSET_A, n * 100 + k) for k in range(100)])
            for _ in range(int(within_s / 0.01)):
                if checkpointer.checkpoints > n:
                    break
                await asyncio.sleep(0.01)
            return checkpointer.checkpoints

        assert await checkpoints_after_a_write(0, 10.0) == 1  # the first, after a write
        if long_log:
            assert await checkpoints_after_a_write(1, 10.0) == 2
            assert await checkpoints_after_a_write(2, 10.0) == 3
        else:
            assert await checkpoints_after_a_write(1, 1.0) == 1  # the pause: 30 s
    finally:
        await storage.close()


async def test_sqlite_in_memory_has_no_checkpointer() -> None:
    storage = SQLiteStorage(":memory:")
    await storage.open()
    try:
        assert storage._checkpointer is None
        assert await storage.append_telemetry([sample(ASSET_A, 0)]) == 1
    finally:
        await storage.close()


async def test_sqlite_a_job_cancelled_while_it_waits_never_runs(tmp_path: Path) -> None:
    import asyncio
    import threading

    from der_sdk.sqlite_worker import SQLiteWorker

    thread = SQLiteWorker(str(tmp_path / "cancel.db"))
    await thread.open()
    ran: list[str] = []
    gate = threading.Event()
    try:
        blocker = asyncio.create_task(thread.run(lambda _: gate.wait(10)))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(thread.run(lambda _: ran.append("cancelled")))
        await asyncio.sleep(0.01)
        waiting.cancel()
        gate.set()
        await blocker
        assert await thread.run(lambda _: ran.append("next")) is None
    finally:
        await thread.close()
    assert ran == ["next"]
    with pytest.raises(RuntimeError, match="not open"):
        await thread.run(lambda _: None)


async def test_sqlite_errors_in_a_write_roll_it_back_and_reach_the_caller(tmp_path: Path) -> None:
    import sqlite3

    storage = SQLiteStorage(tmp_path / "errors.db")
    await storage.open()
    try:

        def half_then_fail(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO events (ts, kind, message, data) VALUES (1, 'k', 'm', '{}')")
            conn.execute("INSERT INTO no_such_table VALUES (1)")

        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            await storage._write(half_then_fail)
        assert await storage.events() == []
        assert await storage.healthy()
    finally:
        await storage.close()
    assert not await storage.healthy()
