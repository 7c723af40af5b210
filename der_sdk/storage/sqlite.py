"""The SQLite storage backend (``sqlite:///PATH``), the embedded default of the headend.

URL forms: ``sqlite:///relative/path.db`` (relative to the working directory),
``sqlite:////absolute/path.db``, and ``sqlite://:memory:`` or ``sqlite:///:memory:``.

All I/O runs on the backend's own thread (one connection, one thread; every operation
is one job on it: :class:`der_sdk.sqlite_worker.SQLiteWorker`), so the event loop never
blocks. Times are
stored as integer microseconds since the Unix epoch (UTC), which keeps range queries on
plain integer indexes and round-trips every ``datetime`` exactly.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import operator
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from der_sdk.errors import DerSdkError
from der_sdk.extensions import StorageBackendType
from der_sdk.models import (
    Alarm,
    AlarmSeverity,
    AlarmState,
    Dispatch,
    DispatchEvent,
    Event,
    Heartbeat,
    Session,
    TelemetrySample,
)
from der_sdk.plugins import hookimpl
from der_sdk.sqlite_worker import SQLiteWorker, transaction
from der_sdk.storage.contract import (
    ALARM_COLUMNS,
    EXPORT_PAGE_ROWS,
    TELEMETRY_COLUMNS,
    AlarmUpdate,
    AlarmWrite,
    StorageBackend,
    TelemetryChanges,
    alarm_conditions,
    check_page_size,
    checked_alarm_update,
)
from der_sdk.storage.sqlite_writer import TelemetryWriterProcess

log = logging.getLogger("der.storage.sqlite")

_T = TypeVar("_T")

__all__ = ["SCHEMA_VERSION", "SQLiteStorage", "der_storage_backends", "sqlite_path_from_url"]

SCHEMA_VERSION = 7
"""The schema this module creates; a newer version in the file is refused at open.
1: the first schema. 2: dispatch state ``pending`` renamed ``submitted``. 3: sessions
record the headend that opened them (``headend_id``). 4: alarms (``alarms`` and the
applied events ``alarm_events``; created by the schema script, nothing to migrate).
6: telemetry keeps its storage order (``ingest_seq``, numbered in time order for the
rows of an older file) and an index by time for range exports; continuous exporters'
cursors (``exporter_cursors``). 7: telemetry stored in that order (``ingest_seq`` is the
rowid; unique by ``(asset_id, ts)`` through an index), not keyed by asset and time."""

_MEMORY = ":memory:"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_decode_json_object = msgspec.json.Decoder(dict[str, Any]).decode
_decode_dispatch = msgspec.json.Decoder(Dispatch).decode

# The tables of this project, in the order reset() empties them.
_TABLES = (
    "telemetry",
    "dispatch_targets",
    "dispatches",
    "dispatch_events",
    "sessions",
    "heartbeats",
    "events",
    "alarms",
    "alarm_events",
    "exporter_cursors",
)

# Telemetry is stored in the order it arrived: ``ingest_seq`` is the rowid, so a write
# appends to the table's end and only the narrow index by (asset_id, ts), which also
# refuses a sample stored twice, takes inserts all over. A table keyed by (asset_id, ts)
# (schemas 1-6: WITHOUT ROWID) puts every whole row where its asset's rows are: about a
# third more CPU per sample stored, for history reads that now take one more lookup per
# row (docs/performance.md).
_TELEMETRY_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    ingest_seq     INTEGER PRIMARY KEY,
    asset_id       TEXT    NOT NULL,
    site_id        TEXT    NOT NULL,
    ts             INTEGER NOT NULL,
    mw             REAL,
    mw_setpoint    REAL,
    online         INTEGER NOT NULL,
    status         TEXT,
    fault_code     TEXT,
    seq            INTEGER NOT NULL,
    quality        TEXT    NOT NULL,
    quality_reason TEXT,
    details        TEXT    NOT NULL
);"""

_SCHEMA = f"""
BEGIN IMMEDIATE;

CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
INSERT INTO schema_version (version)
    SELECT {SCHEMA_VERSION} WHERE NOT EXISTS (SELECT 1 FROM schema_version);

{_TELEMETRY_TABLE.format(name="telemetry")}

CREATE TABLE IF NOT EXISTS dispatches (
    dispatch_id TEXT    PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    asset_id    TEXT,
    site_id     TEXT,
    state       TEXT    NOT NULL,
    record      TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS dispatches_by_created ON dispatches (created_at);
CREATE INDEX IF NOT EXISTS dispatches_by_asset ON dispatches (asset_id, created_at);
CREATE INDEX IF NOT EXISTS dispatches_by_site ON dispatches (site_id, created_at);

CREATE TABLE IF NOT EXISTS dispatch_targets (
    dispatch_id TEXT NOT NULL,
    asset_id    TEXT NOT NULL,
    PRIMARY KEY (dispatch_id, asset_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dispatch_targets_by_asset ON dispatch_targets (asset_id);

CREATE TABLE IF NOT EXISTS dispatch_events (
    id          INTEGER PRIMARY KEY,
    dispatch_id TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    ts          INTEGER NOT NULL,
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS dispatch_events_by_dispatch ON dispatch_events (dispatch_id, ts);

CREATE TABLE IF NOT EXISTS sessions (
    session_id      TEXT    PRIMARY KEY,
    asset_id        TEXT    NOT NULL,
    site_id         TEXT    NOT NULL,
    agent_id        TEXT    NOT NULL,
    peer            TEXT    NOT NULL,
    connected_at    INTEGER NOT NULL,
    disconnected_at INTEGER,
    headend_id      TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_asset ON sessions (asset_id, connected_at);

CREATE TABLE IF NOT EXISTS heartbeats (
    asset_id TEXT    NOT NULL,
    site_id  TEXT    NOT NULL,
    agent_id TEXT    NOT NULL,
    ts       INTEGER NOT NULL,
    uptime_s REAL,
    PRIMARY KEY (asset_id, ts)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY,
    ts       INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    message  TEXT    NOT NULL,
    asset_id TEXT,
    site_id  TEXT,
    data     TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_by_asset ON events (asset_id, ts);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind, ts);
CREATE INDEX IF NOT EXISTS events_by_site ON events (site_id, ts);

-- live is 1 for the live alarm of its (asset_id, code), NULL for the alarms before it.
CREATE TABLE IF NOT EXISTS alarms (
    alarm_id        TEXT    PRIMARY KEY,
    asset_id        TEXT    NOT NULL,
    site_id         TEXT    NOT NULL,
    code            TEXT    NOT NULL,
    severity        TEXT    NOT NULL,
    text            TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    raised_at       INTEGER NOT NULL,
    cleared_at      INTEGER,
    acknowledged_at INTEGER,
    acknowledged_by TEXT,
    raise_count     INTEGER NOT NULL,
    updated_at      INTEGER,
    live            INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS alarms_live ON alarms (asset_id, code) WHERE live = 1;
CREATE INDEX IF NOT EXISTS alarms_by_raised ON alarms (raised_at, alarm_id);
CREATE INDEX IF NOT EXISTS alarms_active ON alarms (severity) WHERE state = 'active';

-- The agent events already applied to alarms (an agent sends one again until acked).
CREATE TABLE IF NOT EXISTS alarm_events (
    event_id   TEXT    PRIMARY KEY,
    applied_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Where each continuous exporter (der_exporters) has got to: an ingest_seq.
CREATE TABLE IF NOT EXISTS exporter_cursors (
    name       TEXT    PRIMARY KEY,
    cursor     TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

COMMIT;
"""

# After the migrations: a file from schema 2 has no headend_id column before them.
_SESSIONS_OPEN_INDEX = (
    "CREATE INDEX IF NOT EXISTS sessions_open_by_headend ON sessions (headend_id)"
    " WHERE disconnected_at IS NULL"
)
# After the migrations too: before schema 7 the telemetry table was another shape. The
# index by (ts, asset_id) is the order of a range export.
_TELEMETRY_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS telemetry_by_asset ON telemetry (asset_id, ts)",
    "CREATE INDEX IF NOT EXISTS telemetry_by_ts ON telemetry (ts, asset_id)",
)
_SESSION_COLUMNS = (
    "session_id, asset_id, site_id, agent_id, peer, connected_at, disconnected_at, headend_id"
)

_TELEMETRY_SELECT = ", ".join(TELEMETRY_COLUMNS)
_STORED_COLUMNS = (*TELEMETRY_COLUMNS, "ingest_seq")
_HEARTBEAT_COLUMNS = ("asset_id", "site_id", "agent_id", "ts", "uptime_s")
_INSERT_DISPATCH_EVENT = (
    "INSERT INTO dispatch_events (dispatch_id, state, ts, detail) VALUES (?, ?, ?, ?)"
)
_INSERT_EVENT = (
    "INSERT INTO events (ts, kind, message, asset_id, site_id, data) VALUES (?, ?, ?, ?, ?, ?)"
)


# --------------------------------------------------------------------------- conversions


def _utc(value: datetime) -> datetime:
    """``value`` in UTC; naive datetimes are refused (the contract stores aware UTC only)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"storage needs timezone-aware datetimes, got naive {value!r}")
    return value.astimezone(UTC)


def _to_us(value: datetime) -> int:
    if value.tzinfo is None:  # an aware difference needs no conversion to UTC first
        _utc(value)  # raises, naming the value
    return (value - _EPOCH) // _MICROSECOND


def _from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _json(value: object) -> str:
    return _json_encoder.encode(value).decode()


def _telemetry_row(sample: TelemetrySample) -> tuple[Any, ...]:
    return (
        sample.asset_id,
        sample.site_id,
        _to_us(sample.ts),
        sample.mw,
        sample.mw_setpoint,
        int(sample.online),
        sample.status,
        sample.fault_code,
        sample.seq,
        sample.quality,
        sample.quality_reason,
        _json(sample.details),
    )


_WIDTH = len(TELEMETRY_COLUMNS)
# The sample's fields in column order (the columns are named after the fields).
_telemetry_fields = operator.attrgetter(*TELEMETRY_COLUMNS)
_TS, _ONLINE, _DETAILS = (TELEMETRY_COLUMNS.index(c) for c in ("ts", "online", "details"))


def _telemetry_params(samples: Sequence[TelemetrySample]) -> list[Any]:
    """The :func:`_telemetry_row` of every sample, flattened into one parameter list.

    The same values, built by loops in C rather than Python code per sample: each
    column that needs converting (time stamp, ``online``, ``details``) is converted as a
    whole, one extended slice of the list at a time.

    :raises ValueError: a time stamp is naive (as :func:`_to_us`).
    """
    params = list(itertools.chain.from_iterable(map(_telemetry_fields, samples)))
    try:
        deltas = map(operator.sub, params[_TS::_WIDTH], itertools.repeat(_EPOCH))
        params[_TS::_WIDTH] = map(operator.floordiv, deltas, itertools.repeat(_MICROSECOND))
    except TypeError:  # a naive datetime cannot be subtracted from an aware one
        for sample in samples:
            _to_us(sample.ts)  # raises, naming the value
        raise
    params[_ONLINE::_WIDTH] = map(int, params[_ONLINE::_WIDTH])
    # One JSON document per line in one call (JSON text never holds a raw newline).
    lines = _json_encoder.encode_lines(params[_DETAILS::_WIDTH]).decode().split("\n")
    params[_DETAILS::_WIDTH] = lines[:-1]  # the text ends with a newline
    return params


def _stored_params(samples: Sequence[TelemetrySample]) -> list[Any]:
    """:func:`_telemetry_params` with room for ``ingest_seq`` after each row's values
    (``None`` here; the write fills it in under the write lock)."""
    params = _telemetry_params(samples)
    width = len(_STORED_COLUMNS)
    stored: list[Any] = [None] * (len(samples) * width)
    for column in range(_WIDTH):
        stored[column::width] = params[column::_WIDTH]
    return stored


def _rebuild_telemetry(conn: sqlite3.Connection) -> None:
    """Copy a telemetry table of schemas 1-6 (keyed by asset and time) into the table of
    schema 7 (in storage order). Rows stored before schema 6 have no storage order: they
    are numbered in time order, so a continuous exporter starting from nothing takes them
    oldest first."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(telemetry)")}
    order = "ingest_seq, ts, asset_id" if "ingest_seq" in columns else "ts, asset_id"
    conn.execute(_TELEMETRY_TABLE.format(name="telemetry_v7"))
    conn.execute(
        f"INSERT INTO telemetry_v7 (ingest_seq, {_TELEMETRY_SELECT})"
        f" SELECT ROW_NUMBER() OVER (ORDER BY {order}), {_TELEMETRY_SELECT} FROM telemetry"
    )
    conn.execute("DROP TABLE telemetry")
    conn.execute("ALTER TABLE telemetry_v7 RENAME TO telemetry")


def _insert_stored(
    conn: sqlite3.Connection,
    params: list[Any],
    between: Callable[[sqlite3.Connection], object] | None = None,
) -> int:
    """Insert the rows of :func:`_stored_params`, numbering them after the highest
    ``ingest_seq`` stored. It runs in the write transaction, so no other write takes
    numbers meanwhile, and no reader sees a number before every lower one is committed
    (where ``between`` commits a first part early, that part holds the lower numbers,
    and what runs between the parts writes no telemetry).
    """
    base = conn.execute("SELECT COALESCE(MAX(ingest_seq), 0) FROM telemetry").fetchone()[0]
    width = len(_STORED_COLUMNS)
    rows = len(params) // width
    params[width - 1 :: width] = range(base + 1, base + 1 + rows)
    return _insert_params(conn, "telemetry", _STORED_COLUMNS, params, between)


def _telemetry_sample(row: Sequence[Any]) -> TelemetrySample:
    asset_id, site_id, ts, mw, mw_setpoint, online, status, fault_code, seq = row[:9]
    quality, quality_reason, details = row[9:12]
    return TelemetrySample(
        asset_id=asset_id,
        site_id=site_id,
        ts=_from_us(ts),
        # SQLite stores NaN as NULL; a NaN reading comes back as NaN, not None.
        mw=float("nan") if mw is None else mw,
        mw_setpoint=mw_setpoint,
        online=bool(online),
        status=status,
        fault_code=fault_code,
        seq=seq,
        quality=quality,
        quality_reason=quality_reason,
        details=_decode_json_object(details),
    )


def _heartbeat(row: Sequence[Any]) -> Heartbeat:
    asset_id, site_id, agent_id, ts, uptime_s = row
    return Heartbeat(
        asset_id=asset_id, site_id=site_id, agent_id=agent_id, ts=_from_us(ts), uptime_s=uptime_s
    )


def _session(row: Sequence[Any]) -> Session:
    session_id, asset_id, site_id, agent_id, peer, connected_at, disconnected_at = row[:7]
    return Session(
        session_id=session_id,
        asset_id=asset_id,
        site_id=site_id,
        agent_id=agent_id,
        peer=peer,
        connected_at=_from_us(connected_at),
        disconnected_at=None if disconnected_at is None else _from_us(disconnected_at),
        headend_id=row[7],
    )


def _event(row: Sequence[Any]) -> Event:
    ts, kind, message, asset_id, site_id, data = row
    return Event(
        ts=_from_us(ts),
        kind=kind,
        message=message,
        asset_id=asset_id,
        site_id=site_id,
        data=_decode_json_object(data),
    )


def _opt_us(value: datetime | None) -> int | None:
    return None if value is None else _to_us(value)


def _opt_time(value: int | None) -> datetime | None:
    return None if value is None else _from_us(value)


def _alarm_row(alarm: Alarm) -> tuple[Any, ...]:
    return (
        alarm.alarm_id,
        alarm.asset_id,
        alarm.site_id,
        alarm.code,
        alarm.severity,
        alarm.text,
        alarm.state,
        _to_us(alarm.raised_at),
        _opt_us(alarm.cleared_at),
        _opt_us(alarm.acknowledged_at),
        alarm.acknowledged_by,
        alarm.raise_count,
        _opt_us(alarm.updated_at),
    )


def _alarm(row: Sequence[Any]) -> Alarm:
    return Alarm(
        alarm_id=row[0],
        asset_id=row[1],
        site_id=row[2],
        code=row[3],
        severity=row[4],
        text=row[5],
        state=row[6],
        raised_at=_from_us(row[7]),
        cleared_at=_opt_time(row[8]),
        acknowledged_at=_opt_time(row[9]),
        acknowledged_by=row[10],
        raise_count=row[11],
        updated_at=_opt_time(row[12]),
    )


def _update_alarm(
    conn: sqlite3.Connection,
    asset_id: str,
    code: str,
    update: AlarmUpdate,
    event_id: str | None,
) -> AlarmWrite | None:
    """:meth:`SQLiteStorage.update_alarm` in one transaction on the storage thread."""
    if event_id is not None:
        inserted = conn.execute(
            "INSERT OR IGNORE INTO alarm_events (event_id, applied_at) VALUES (?, ?)",
            (event_id, _to_us(datetime.now(UTC))),
        ).rowcount
        if not inserted:
            return None
    row = conn.execute(
        f"SELECT {ALARM_COLUMNS} FROM alarms WHERE asset_id = ? AND code = ? AND live = 1",
        (asset_id, code),
    ).fetchone()
    live = None if row is None else _alarm(row)
    new = update(live)
    checked_alarm_update(asset_id, code, new)
    if new is None:
        return None
    if live is not None and live.alarm_id != new.alarm_id:
        conn.execute("UPDATE alarms SET live = NULL WHERE alarm_id = ?", (live.alarm_id,))
    conn.execute(
        f"INSERT OR REPLACE INTO alarms ({ALARM_COLUMNS}, live)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
        _alarm_row(new),
    )
    return AlarmWrite(live, _alarm(_alarm_row(new)))


def _range(start: datetime | None, end: datetime | None) -> tuple[str, list[Any]]:
    """SQL conditions and parameters for ``start <= ts < end`` (either bound optional)."""
    sql, params = "", []
    if start is not None:
        sql += " AND ts >= ?"
        params.append(_to_us(start))
    if end is not None:
        sql += " AND ts < ?"
        params.append(_to_us(end))
    return sql, params


def _dispatch_params(dispatch: Dispatch) -> tuple[tuple[Any, ...], list[tuple[str, str]]]:
    """The ``dispatches`` row and the ``dispatch_targets`` rows of a record."""
    record = msgspec.structs.replace(
        dispatch, created_at=_utc(dispatch.created_at), updated_at=_utc(dispatch.updated_at)
    )
    row = (
        record.dispatch_id,
        _to_us(record.created_at),
        _to_us(record.updated_at),
        record.asset_id,
        record.site_id,
        record.state,
        _json(record),
    )
    return row, [(record.dispatch_id, target.asset_id) for target in record.targets]


def _save_dispatch(
    conn: sqlite3.Connection, row: tuple[Any, ...], targets: list[tuple[str, str]]
) -> None:
    conn.execute(
        "INSERT INTO dispatches"
        " (dispatch_id, created_at, updated_at, asset_id, site_id, state, record)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (dispatch_id) DO UPDATE SET created_at = excluded.created_at,"
        " updated_at = excluded.updated_at, asset_id = excluded.asset_id,"
        " site_id = excluded.site_id, state = excluded.state, record = excluded.record",
        row,
    )
    conn.execute("DELETE FROM dispatch_targets WHERE dispatch_id = ?", (row[0],))
    conn.executemany(
        "INSERT OR IGNORE INTO dispatch_targets (dispatch_id, asset_id) VALUES (?, ?)", targets
    )


def _dispatch_event_row(event: DispatchEvent) -> tuple[Any, ...]:
    return (event.dispatch_id, event.state, _to_us(event.ts), event.detail)


def _event_row(event: Event) -> tuple[Any, ...]:
    return (
        _to_us(event.ts),
        event.kind,
        event.message,
        event.asset_id,
        event.site_id,
        _json(event.data),
    )


WRITER_ENV = "DER_SQLITE_WRITER"
"""Where a file database's telemetry inserts run: ``process`` (default: a child process,
:mod:`der_sdk.storage.sqlite_writer`) or ``thread`` (the storage thread itself)."""
WRITERS = ("process", "thread")


def _writer_mode(writer: str | None, path: str) -> str:
    """``writer``, or :data:`WRITER_ENV`, checked; always ``thread`` for ``:memory:``."""
    source = "writer"
    if writer is None:
        writer, source = os.environ.get(WRITER_ENV, "process").strip().lower(), WRITER_ENV
    if writer not in WRITERS:
        raise DerSdkError(f"{source}={writer!r} is not one of {', '.join(WRITERS)}")
    if path == _MEMORY or os.name != "posix":
        return "thread"  # a child cannot open another process's in-memory database
    return writer


def sqlite_path_from_url(url: str) -> str:
    """The database path of a ``sqlite:`` URL, or ``":memory:"``.

    :raises DerSdkError: the URL is not one of the supported forms.
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "sqlite" or not sep:
        rest = ""
    if rest in (_MEMORY, "/" + _MEMORY):
        return _MEMORY
    if rest.startswith("/") and len(rest) > 1 and "?" not in rest:
        return rest[1:]  # sqlite:///rel → "rel"; sqlite:////abs → "/abs"
    raise DerSdkError(
        f"invalid SQLite database URL {url!r}: use sqlite:///relative/path.db, "
        "sqlite:////absolute/path.db or sqlite://:memory:"
    )


# --------------------------------------------------------------------------- statements

CACHE_KIB = 32 * 1024
"""SQLite's page cache of the storage connection, in KiB (SQLite's default: 2,000)."""
WAL_CHECKPOINT_PAGES = 40_000
"""Pages in the write-ahead log before the storage connection copies them into the
database file itself (SQLite's default: 1,000): only if the :class:`_Checkpointer` falls
behind, which normally does it on its own thread."""
CHECKPOINT_S = 1.0
"""The :class:`_Checkpointer` copies the write-ahead log into the database file at most
this often, and only after writes."""
BUSY_LOG_PAGES = 8_000
"""Log frames (pages) from which the :class:`_Checkpointer` copies again after the next
write without waiting :data:`CHECKPOINT_S`."""


class _Checkpointer:
    """Copies the write-ahead log into the database file on a second connection and a
    thread of its own (``PRAGMA wal_checkpoint(PASSIVE)``), at most every
    :data:`CHECKPOINT_S` and only after writes; back to back while the log is long.

    Left to SQLite, the checkpoint runs inside whichever commit crosses the threshold, on
    the storage thread: every few telemetry writes one took twice the CPU and several
    times the wall time (the copy and its ``fsync``), and a dispatch record queued behind
    it, or whose own commit crossed the threshold, waited for all of it. In WAL mode a
    checkpoint runs beside the writer, which keeps writing to the log meanwhile.

    SQLite starts the log over only when a write begins after a checkpoint has copied all
    of it. Once a second, a log filling at tens of thousands of pages a second seldom got
    there, reached the writer's own threshold, and then a commit took the checkpoint in,
    70 to 200 ms (a dispatch record waited for that commit). Copying again while
    the log holds :data:`BUSY_LOG_PAGES` or more (after the next write, not a second
    later) catches up with the writer between two of its writes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.checkpoints = 0

    def start(self) -> None:
        name = f"der-sqlite-checkpoint:{Path(self.path).name}"
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def written(self) -> None:
        """Something was committed: checkpoint within :data:`CHECKPOINT_S` (any thread)."""
        self._due.set()

    def _serve(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:  # the writer checkpoints by itself then
            log.warning("SQLite database %s: no checkpoint connection: %s", self.path, exc)
            return
        try:
            while True:
                self._due.wait()
                if self._stop.is_set():
                    return
                self._due.clear()
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # the writer checkpoints itself meanwhile
                    log.warning("SQLite database %s: checkpoint failed: %s", self.path, exc)
                    frames = 0
                if frames >= BUSY_LOG_PAGES:
                    continue  # a long log: copy again after the next write, not a second later
                if self._stop.wait(CHECKPOINT_S):
                    return
        finally:
            conn.close()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._due.set()
        await asyncio.to_thread(thread.join)


ROWS_PER_STATEMENT = 512
"""Telemetry rows per ``INSERT`` statement (fewer where SQLite allows fewer variables).
About 5 ms of SQLite work on the reference machine: the longest an urgent job (a
dispatch's record) waits for a telemetry write, which yields between statements."""


@functools.lru_cache(maxsize=64)
def _insert_sql(table: str, columns: tuple[str, ...], rows: int) -> str:
    one = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([one] * rows)


def _insert_or_ignore(
    conn: sqlite3.Connection,
    table: str,
    columns: tuple[str, ...],
    rows: Sequence[Sequence[Any]],
) -> int:
    """``INSERT OR IGNORE`` ``rows``: :func:`_insert_params` of the rows flattened.

    :return: how many rows were inserted.
    """
    return _insert_params(conn, table, columns, list(itertools.chain.from_iterable(rows)))


def _insert_params(
    conn: sqlite3.Connection,
    table: str,
    columns: tuple[str, ...],
    params: list[Any],
    between: Callable[[sqlite3.Connection], object] | None = None,
) -> int:
    """``INSERT OR IGNORE`` the rows whose values ``params`` lists one after another
    (``len(columns)`` each), with as few statements as SQLite allows.

    Multi-row statements, not ``executemany``: the sqlite3 module lets go of the GIL
    around every statement it steps, and taking it back from a busy event loop can take a
    whole switch interval (5 ms), so one statement per row is what made a 5,000-row write
    take seconds while the loop was busy. A short last chunk is padded with copies of its
    last row (ignored as duplicates) up to a power of two, so a handful of statement
    sizes are compiled and cached, not one per batch size.

    ``between`` is called between two statements (the worker's
    :meth:`~der_sdk.sqlite_worker.SQLiteWorker.yield_to_urgent`, so a dispatch record
    waits for one statement, not for the whole write).

    :return: how many rows were inserted.
    """
    width = len(columns)
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
    per = max(1, min(ROWS_PER_STATEMENT, limit))
    step = per * width
    inserted = 0
    for start in range(0, len(params), step):
        chunk = params[start : start + step]
        rows = len(chunk) // width
        size = min(per, max(16, 1 << (rows - 1).bit_length()))
        if size > rows:
            chunk.extend(chunk[-width:] * (size - rows))
        if between is not None and start:
            between(conn)
        before = conn.total_changes
        conn.execute(_insert_sql(table, columns, size), chunk)
        inserted += conn.total_changes - before
    return inserted


# --------------------------------------------------------------------------- backend


class SQLiteStorage(StorageBackend):
    """One SQLite file (or an in-memory database) on one connection and its own thread.

    Every operation is one job on that thread (:class:`SQLiteWorker`): a whole
    transaction or a whole query. Telemetry writes are bulk jobs; everything else
    (dispatch records, sessions, events, reads) goes ahead of them, so a dispatch does
    not wait behind a backlog of telemetry.
    """

    name = "sqlite"
    ordered_writes = True  # urgent jobs run in the order they were queued
    # Two telemetry writes at once: they still run one after the other on the storage
    # thread, but the second is made and queued while the first is stored, so the thread
    # (or the writer process) starts it the moment the first ends.
    concurrent_writes = 2

    def __init__(self, path: str | Path, *, writer: str | None = None) -> None:
        self.path = str(path)
        self.writer = _writer_mode(writer, self.path)
        self._worker: SQLiteWorker | None = None
        self._checkpointer: _Checkpointer | None = None
        self._writer_process: TelemetryWriterProcess | None = None

    @classmethod
    def from_url(cls, url: str) -> SQLiteStorage:
        return cls(sqlite_path_from_url(url))

    def __repr__(self) -> str:
        return f"SQLiteStorage({self.path!r})"

    # ------------------------------------------------------------------ plumbing

    async def _run(self, job: Callable[[sqlite3.Connection], _T], *, bulk: bool = False) -> _T:
        if self._worker is None:
            raise RuntimeError(f"{self!r} is not open; await open() first")
        result: _T = await self._worker.run(job, bulk=bulk)
        return result

    async def _write(self, job: Callable[[sqlite3.Connection], _T], *, bulk: bool = False) -> _T:
        try:
            return await self._run(transaction(job), bulk=bulk)
        finally:
            if self._checkpointer is not None:
                self._checkpointer.written()

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._run(lambda conn: conn.execute(sql, params).fetchall())

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._worker is not None:
            return
        if self.path != _MEMORY:
            await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        worker = SQLiteWorker(self.path)
        await worker.open()
        try:
            await worker.run(self._prepare)
        except BaseException:
            await worker.close()
            raise
        if self.writer == "process":
            process = TelemetryWriterProcess(self.path, ROWS_PER_STATEMENT)
            try:
                await worker.run(lambda _: process.start())
            except BaseException:
                await worker.close()
                raise
            worker.on_urgent = process.urgent
            self._writer_process = process
        self._worker = worker
        if self.path != _MEMORY:
            self._checkpointer = _Checkpointer(self.path)
            self._checkpointer.start()

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Settings, the version check, the schema and migrations (on the thread)."""
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        # Telemetry arrives for every asset at once, so each write touches a leaf page per
        # asset: a page cache that holds them cut SQLite's CPU per row by a fifth
        # (docs/performance.md). Checkpoints run on the _Checkpointer's thread; this
        # connection checkpoints only if that one falls far behind.
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        self._check_schema_version(conn)
        conn.executescript(_SCHEMA)
        self._migrate(conn)
        conn.execute(_SESSIONS_OPEN_INDEX)
        for index in _TELEMETRY_INDEXES:
            conn.execute(index)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring a file written by an older der-sdk up to :data:`SCHEMA_VERSION`."""

        def migrate(conn: sqlite3.Connection) -> int | None:
            # Read under the write lock: another headend on the same file may be migrating.
            found: int = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            found = found or SCHEMA_VERSION
            if found >= SCHEMA_VERSION:
                return None
            if found < 2:
                conn.execute(
                    "UPDATE dispatches SET state = 'submitted',"
                    ' record = replace(record, \'"state":"pending"\', \'"state":"submitted"\')'
                    ' WHERE record LIKE \'%"state":"pending"%\''
                )
                conn.execute(
                    "UPDATE dispatch_events SET state = 'submitted' WHERE state = 'pending'"
                )
            session_columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
            if "headend_id" not in session_columns:
                # Sessions written before have no headend id (NULL): the first headend to
                # start closes them, whatever its id (close_open_sessions).
                conn.execute("ALTER TABLE sessions ADD COLUMN headend_id TEXT")
            if found < 7:
                _rebuild_telemetry(conn)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            return found

        found = transaction(migrate)(conn)
        if found is not None:
            log.info(
                "SQLite database %s migrated from schema %d to %d",
                self.path,
                found,
                SCHEMA_VERSION,
            )

    def _check_schema_version(self, conn: sqlite3.Connection) -> None:
        """Refuse a file written by a newer der-sdk before touching its schema."""
        has_table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if not has_table:
            return
        found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if found is not None and found > SCHEMA_VERSION:
            raise DerSdkError(
                f"SQLite database {self.path} has schema version {found}, newer than the "
                f"{SCHEMA_VERSION} this der-sdk supports; upgrade der-sdk or use another file"
            )

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        checkpointer, self._checkpointer = self._checkpointer, None
        process, self._writer_process = self._writer_process, None
        if checkpointer is not None:
            await checkpointer.stop()
        if worker is not None:
            await worker.close()  # runs the writes queued, then no job is left
        if process is not None:
            await asyncio.to_thread(process.close)

    async def reset(self) -> None:
        def reset(conn: sqlite3.Connection) -> None:
            for table in _TABLES:
                conn.execute(f"DELETE FROM {table}")

        await self._write(reset)

    async def healthy(self) -> bool:
        if self._worker is None:
            return False
        try:
            await self._fetchall("SELECT 1")
        except Exception:
            return False
        return True

    # ------------------------------------------------------------------ telemetry

    async def append_telemetry(self, samples: Sequence[TelemetrySample]) -> int:
        if not samples:
            return 0
        worker = self._worker
        process = self._writer_process
        payload = b""
        if worker is not None and process is not None:
            try:
                payload = _msgpack_encoder.encode(samples)
            except (OverflowError, msgspec.EncodeError):  # e.g. an integer past 64 bits
                process = None  # in details: JSON holds it, msgpack cannot carry it
        if worker is None or process is None:
            # Built here, not on the storage thread: that thread is the one a write waits
            # for, so it only binds and steps (while it steps, the loop builds the next).
            params = _stored_params(samples)
            between = worker.yield_to_urgent if worker is not None else None
            return await self._write(lambda conn: _insert_stored(conn, params, between), bulk=True)
        # The child process makes the rows and inserts them (its own transaction); this
        # thread waits for it, and runs urgent jobs while the child pauses between two
        # statements. The loop only encodes the samples (a fifth of making the rows; a
        # naive time stamp goes as text, and the child refuses it with a ValueError).
        try:
            count: int = await self._run(
                lambda conn: process.insert(payload, lambda: worker.yield_to_urgent(conn)),
                bulk=True,
            )
        finally:
            if self._checkpointer is not None:
                self._checkpointer.written()
        return count

    async def telemetry_history(
        self,
        asset_id: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[TelemetrySample]:
        where, params = _range(start, end)
        rows = await self._fetchall(
            f"SELECT {_TELEMETRY_SELECT} FROM telemetry WHERE asset_id = ?{where}"
            " ORDER BY ts DESC LIMIT ?",
            [asset_id, *params, max(limit, 0)],
        )
        return [_telemetry_sample(row) for row in rows]

    async def latest_telemetry(self) -> dict[str, TelemetrySample]:
        columns = ", ".join(f"t.{field}" for field in TELEMETRY_COLUMNS)
        rows = await self._fetchall(
            f"SELECT {columns} FROM telemetry AS t"
            " JOIN (SELECT asset_id, MAX(ts) AS ts FROM telemetry GROUP BY asset_id) AS newest"
            " ON t.asset_id = newest.asset_id AND t.ts = newest.ts"
        )
        samples = (_telemetry_sample(row) for row in rows)
        return {sample.asset_id: sample for sample in samples}

    async def telemetry_pages(
        self,
        start: datetime,
        end: datetime,
        *,
        site_id: str | None = None,
        asset_id: str | None = None,
        page_size: int = EXPORT_PAGE_ROWS,
    ) -> AsyncIterator[list[TelemetrySample]]:
        check_page_size(page_size)
        where, params = _range(start, end)
        for column, value in (("site_id", site_id), ("asset_id", asset_id)):
            if value is not None:
                where += f" AND {column} = ?"
                params.append(value)
        after: list[Any] = []
        while True:
            # Keyset paging: each page is one short query from where the last one ended
            # (on the (ts, asset_id) order of telemetry_by_ts), so no reader holds the
            # database between pages and memory holds one page.
            rows = await self._fetchall(
                f"SELECT {_TELEMETRY_SELECT} FROM telemetry WHERE 1 = 1{where}"
                f"{' AND (ts, asset_id) > (?, ?)' if after else ''}"
                " ORDER BY ts, asset_id LIMIT ?",
                [*params, *after, page_size],
            )
            if not rows:
                return
            yield [_telemetry_sample(row) for row in rows]
            if len(rows) < page_size:
                return
            after = [rows[-1][_TS], rows[-1][0]]

    async def telemetry_changes(self, after: str | None, limit: int) -> TelemetryChanges:
        rows = await self._fetchall(
            f"SELECT {_TELEMETRY_SELECT}, ingest_seq FROM telemetry WHERE ingest_seq > ?"
            " ORDER BY ingest_seq LIMIT ?",
            (0 if after is None else int(after), max(limit, 0)),
        )
        if not rows:
            return TelemetryChanges([], after)
        return TelemetryChanges([_telemetry_sample(row) for row in rows], str(rows[-1][-1]))

    async def exporter_cursor(self, name: str) -> str | None:
        rows = await self._fetchall("SELECT cursor FROM exporter_cursors WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def save_exporter_cursor(self, name: str, cursor: str) -> None:
        row = (name, cursor, _to_us(datetime.now(UTC)))
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO exporter_cursors (name, cursor, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor,"
                " updated_at = excluded.updated_at",
                row,
            )
        )

    # ------------------------------------------------------------------ dispatch

    async def save_dispatch(self, dispatch: Dispatch) -> None:
        params = _dispatch_params(dispatch)
        await self._write(lambda conn: _save_dispatch(conn, *params))

    async def record_dispatch(self, dispatch: Dispatch, event: DispatchEvent) -> None:
        params = _dispatch_params(dispatch)
        event_row = _dispatch_event_row(event)

        def record(conn: sqlite3.Connection) -> None:
            _save_dispatch(conn, *params)
            conn.execute(_INSERT_DISPATCH_EVENT, event_row)

        await self._write(record)

    async def record_dispatches(
        self, records: Sequence[tuple[Dispatch, DispatchEvent]], events: Sequence[Event] = ()
    ) -> None:
        """One job, one transaction, ahead of queued telemetry writes like every record."""
        rows = [(_dispatch_params(d), _dispatch_event_row(e)) for d, e in records]
        event_rows = [_event_row(e) for e in events]

        def record(conn: sqlite3.Connection) -> None:
            for params, event_row in rows:
                _save_dispatch(conn, *params)
                conn.execute(_INSERT_DISPATCH_EVENT, event_row)
            if event_rows:
                conn.executemany(_INSERT_EVENT, event_rows)

        await self._write(record)

    async def get_dispatch(self, dispatch_id: str) -> Dispatch | None:
        rows = await self._fetchall(
            "SELECT record FROM dispatches WHERE dispatch_id = ?", (dispatch_id,)
        )
        return _decode_dispatch(rows[0][0]) if rows else None

    async def dispatch_history(
        self,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        state: str | None = None,
        limit: int = 100,
    ) -> list[Dispatch]:
        conditions: list[str] = []
        params: list[Any] = []
        if asset_id is not None:
            conditions.append(
                "(d.asset_id = ? OR EXISTS (SELECT 1 FROM dispatch_targets AS t"
                " WHERE t.dispatch_id = d.dispatch_id AND t.asset_id = ?))"
            )
            params += [asset_id, asset_id]
        if site_id is not None:
            conditions.append("d.site_id = ?")
            params.append(site_id)
        if state is not None:
            conditions.append("d.state = ?")
            params.append(state)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._fetchall(
            f"SELECT d.record FROM dispatches AS d{where}"
            " ORDER BY d.created_at DESC, d.dispatch_id DESC LIMIT ?",
            [*params, max(limit, 0)],
        )
        return [_decode_dispatch(row[0]) for row in rows]

    async def record_dispatch_event(self, event: DispatchEvent) -> None:
        row = _dispatch_event_row(event)
        await self._write(lambda conn: conn.execute(_INSERT_DISPATCH_EVENT, row))

    async def dispatch_events(self, dispatch_id: str) -> list[DispatchEvent]:
        rows = await self._fetchall(
            "SELECT dispatch_id, state, ts, detail FROM dispatch_events"
            " WHERE dispatch_id = ? ORDER BY ts, id",
            (dispatch_id,),
        )
        return [
            DispatchEvent(dispatch_id=d, state=state, ts=_from_us(ts), detail=detail)
            for d, state, ts, detail in rows
        ]

    # ------------------------------------------------------------------ presence

    async def open_session(self, session: Session) -> None:
        disconnected_at = session.disconnected_at
        row = (
            session.session_id,
            session.asset_id,
            session.site_id,
            session.agent_id,
            session.peer,
            _to_us(session.connected_at),
            None if disconnected_at is None else _to_us(disconnected_at),
            session.headend_id,
        )
        await self._write(
            lambda conn: conn.execute(
                f"INSERT OR REPLACE INTO sessions ({_SESSION_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    async def close_session(self, session_id: str, disconnected_at: datetime) -> None:
        params = (_to_us(disconnected_at), session_id)
        await self._write(
            lambda conn: conn.execute(
                "UPDATE sessions SET disconnected_at = ?"
                " WHERE session_id = ? AND disconnected_at IS NULL",
                params,
            )
        )

    async def close_open_sessions(
        self, disconnected_at: datetime, headend_id: str | None = None
    ) -> int:
        sql = "UPDATE sessions SET disconnected_at = ? WHERE disconnected_at IS NULL"
        params: tuple[Any, ...] = (_to_us(disconnected_at),)
        if headend_id is not None:
            sql += " AND (headend_id = ? OR headend_id IS NULL)"
            params += (headend_id,)

        def close(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        return await self._write(close)

    async def recent_sessions(self, asset_id: str, limit: int = 5) -> list[Session]:
        rows = await self._fetchall(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE asset_id = ?"
            " ORDER BY connected_at DESC, session_id DESC LIMIT ?",
            (asset_id, max(limit, 0)),
        )
        return [_session(row) for row in rows]

    async def append_heartbeats(self, heartbeats: Sequence[Heartbeat]) -> None:
        rows = [
            (beat.asset_id, beat.site_id, beat.agent_id, _to_us(beat.ts), beat.uptime_s)
            for beat in heartbeats
        ]
        if rows:
            await self._write(
                lambda conn: _insert_or_ignore(conn, "heartbeats", _HEARTBEAT_COLUMNS, rows)
            )

    async def latest_heartbeat(self, asset_id: str) -> Heartbeat | None:
        found = await self.heartbeat_history(asset_id, limit=1)
        return found[0] if found else None

    async def heartbeat_history(
        self,
        asset_id: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[Heartbeat]:
        where, params = _range(start, end)
        rows = await self._fetchall(
            f"SELECT {', '.join(_HEARTBEAT_COLUMNS)} FROM heartbeats"
            f" WHERE asset_id = ?{where} ORDER BY ts DESC LIMIT ?",
            [asset_id, *params, max(limit, 0)],
        )
        return [_heartbeat(row) for row in rows]

    # ------------------------------------------------------------------ events

    async def append_event(self, event: Event) -> None:
        row = _event_row(event)
        await self._write(lambda conn: conn.execute(_INSERT_EVENT, row))

    async def events(
        self,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        kind: str | None = None,
        exclude_kinds: Collection[str] = (),
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[Event]:
        conditions: list[str] = []
        params: list[Any] = []
        for column, value in (("asset_id", asset_id), ("site_id", site_id), ("kind", kind)):
            if value is not None:
                conditions.append(f"{column} = ?")
                params.append(value)
        excluded = sorted(set(exclude_kinds))
        if excluded:
            conditions.append(f"kind NOT IN ({', '.join('?' * len(excluded))})")
            params.extend(excluded)
        if start is not None:
            conditions.append("ts >= ?")
            params.append(_to_us(start))
        if end is not None:
            conditions.append("ts < ?")
            params.append(_to_us(end))
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._fetchall(
            f"SELECT ts, kind, message, asset_id, site_id, data FROM events{where}"
            " ORDER BY ts DESC, id DESC LIMIT ?",
            [*params, max(limit, 0)],
        )
        return [_event(row) for row in rows]

    # ------------------------------------------------------------------ alarms

    async def update_alarm(
        self,
        asset_id: str,
        code: str,
        update: AlarmUpdate,
        *,
        event_id: str | None = None,
    ) -> AlarmWrite | None:
        return await self._write(lambda conn: _update_alarm(conn, asset_id, code, update, event_id))

    async def acknowledge_alarm(
        self, alarm_id: str, acknowledged_at: datetime, acknowledged_by: str
    ) -> tuple[Alarm, bool] | None:
        at = _to_us(acknowledged_at)

        def acknowledge(conn: sqlite3.Connection) -> tuple[Alarm, bool] | None:
            changed = conn.execute(
                "UPDATE alarms SET acknowledged_at = ?, acknowledged_by = ?, updated_at = ?"
                " WHERE alarm_id = ? AND acknowledged_at IS NULL",
                (at, acknowledged_by, at, alarm_id),
            ).rowcount
            row = conn.execute(
                f"SELECT {ALARM_COLUMNS} FROM alarms WHERE alarm_id = ?", (alarm_id,)
            ).fetchone()
            return None if row is None else (_alarm(row), bool(changed))

        return await self._write(acknowledge)

    async def get_alarm(self, alarm_id: str) -> Alarm | None:
        rows = await self._fetchall(
            f"SELECT {ALARM_COLUMNS} FROM alarms WHERE alarm_id = ?", (alarm_id,)
        )
        return _alarm(rows[0]) if rows else None

    async def alarms(
        self,
        *,
        state: AlarmState | None = None,
        severity: AlarmSeverity | None = None,
        site_id: str | None = None,
        asset_id: str | None = None,
        code: str | None = None,
        acknowledged: bool | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Alarm]:
        conditions, params = alarm_conditions(
            lambda _: "?",
            state=state,
            severity=severity,
            site_id=site_id,
            asset_id=asset_id,
            code=code,
            acknowledged=acknowledged,
            after=after,
        )
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._fetchall(
            f"SELECT {ALARM_COLUMNS} FROM alarms{where}"
            " ORDER BY raised_at DESC, alarm_id DESC LIMIT ?",
            [*params, max(limit, 0)],
        )
        return [_alarm(row) for row in rows]

    async def active_alarm_counts(self) -> dict[AlarmSeverity, int]:
        rows = await self._fetchall(
            "SELECT severity, COUNT(*) FROM alarms WHERE state = 'active' GROUP BY severity"
        )
        return {severity: count for severity, count in rows}


@hookimpl
def der_storage_backends() -> list[StorageBackendType]:
    return [
        StorageBackendType(
            name="sqlite",
            schemes=("sqlite",),
            factory=SQLiteStorage.from_url,
            description="An embedded SQLite file (sqlite:///PATH); the default.",
        )
    ]
