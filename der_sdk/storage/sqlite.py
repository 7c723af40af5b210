"""The SQLite storage backend (``sqlite:///PATH``), the embedded default of the headend.

URL forms: ``sqlite:///relative/path.db`` (relative to the working directory),
``sqlite:////absolute/path.db``, and ``sqlite://:memory:`` or ``sqlite:///:memory:``.

All I/O runs on aiosqlite's worker thread, so the event loop never blocks. Times are
stored as integer microseconds since the Unix epoch (UTC), which keeps range queries on
plain integer indexes and round-trips every ``datetime`` exactly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from der_sdk.errors import DerSdkError
from der_sdk.extensions import StorageBackendType
from der_sdk.models import (
    Dispatch,
    DispatchEvent,
    Event,
    Heartbeat,
    Session,
    TelemetrySample,
)
from der_sdk.plugins import hookimpl
from der_sdk.storage.contract import TELEMETRY_COLUMNS, StorageBackend

log = logging.getLogger("der.storage.sqlite")

__all__ = ["SCHEMA_VERSION", "SQLiteStorage", "der_storage_backends", "sqlite_path_from_url"]

SCHEMA_VERSION = 2
"""1: the first schema. 2: dispatch state ``pending`` renamed ``submitted``."""
"""The schema this module creates; a newer version in the file is refused at open."""

_MEMORY = ":memory:"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_json_encoder = msgspec.json.Encoder()
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
)

_SCHEMA = f"""
BEGIN IMMEDIATE;

CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
INSERT INTO schema_version (version)
    SELECT {SCHEMA_VERSION} WHERE NOT EXISTS (SELECT 1 FROM schema_version);

CREATE TABLE IF NOT EXISTS telemetry (
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
    details        TEXT    NOT NULL,
    PRIMARY KEY (asset_id, ts)
) WITHOUT ROWID;

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
    disconnected_at INTEGER
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

COMMIT;
"""

_TELEMETRY_SELECT = ", ".join(TELEMETRY_COLUMNS)


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


def _telemetry_sample(row: Sequence[Any]) -> TelemetrySample:
    asset_id, site_id, ts, mw, mw_setpoint, online, status, fault_code, seq = row[:9]
    quality, quality_reason, details = row[9:]
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
    session_id, asset_id, site_id, agent_id, peer, connected_at, disconnected_at = row
    return Session(
        session_id=session_id,
        asset_id=asset_id,
        site_id=site_id,
        agent_id=agent_id,
        peer=peer,
        connected_at=_from_us(connected_at),
        disconnected_at=None if disconnected_at is None else _from_us(disconnected_at),
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


# --------------------------------------------------------------------------- backend


class SQLiteStorage(StorageBackend):
    """One SQLite file (or an in-memory database) through one aiosqlite connection.

    A lock serialises the backend's operations on the shared connection, so one
    coroutine's transaction never interleaves with another's statements.
    """

    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteStorage:
        return cls(sqlite_path_from_url(url))

    def __repr__(self) -> str:
        return f"SQLiteStorage({self.path!r})"

    # ------------------------------------------------------------------ plumbing

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError(f"{self!r} is not open; await open() first")
        return self._db

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            yield self._conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            db = self._conn
            try:
                # BEGIN inside the try: a caller cancelled while BEGIN is queued on the
                # connection's thread still gets its ROLLBACK queued behind it, so the
                # connection is never left inside a transaction for the next caller.
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.commit()
            except BaseException:
                await db.rollback()  # a no-op when no transaction is open
                raise

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        async with self._reading() as db:
            return list(await db.execute_fetchall(sql, params))

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._db is not None:
            return
        if self.path != _MEMORY:
            await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; _transaction() issues BEGIN.
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await self._check_schema_version(db)
            await db.executescript(_SCHEMA)
            await self._migrate(db)
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Bring a file written by an older der-sdk up to :data:`SCHEMA_VERSION`."""
        rows = list(await db.execute_fetchall("SELECT MAX(version) FROM schema_version"))
        found = rows[0][0] or SCHEMA_VERSION
        if found >= SCHEMA_VERSION:
            return
        await db.execute("BEGIN IMMEDIATE")
        try:
            if found < 2:
                await db.execute(
                    "UPDATE dispatches SET state = 'submitted',"
                    ' record = replace(record, \'"state":"pending"\', \'"state":"submitted"\')'
                    ' WHERE record LIKE \'%"state":"pending"%\''
                )
                await db.execute(
                    "UPDATE dispatch_events SET state = 'submitted' WHERE state = 'pending'"
                )
            await db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        log.info(
            "SQLite database %s migrated from schema %d to %d", self.path, found, SCHEMA_VERSION
        )

    async def _check_schema_version(self, db: aiosqlite.Connection) -> None:
        """Refuse a file written by a newer der-sdk before touching its schema."""
        has_table = list(
            await db.execute_fetchall(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            )
        )
        if not has_table:
            return
        rows = list(await db.execute_fetchall("SELECT MAX(version) FROM schema_version"))
        found = rows[0][0]
        if found is not None and found > SCHEMA_VERSION:
            raise DerSdkError(
                f"SQLite database {self.path} has schema version {found}, newer than the "
                f"{SCHEMA_VERSION} this der-sdk supports; upgrade der-sdk or use another file"
            )

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()

    async def reset(self) -> None:
        async with self._transaction() as db:
            for table in _TABLES:
                await db.execute(f"DELETE FROM {table}")

    async def healthy(self) -> bool:
        if self._db is None:
            return False
        try:
            await self._fetchall("SELECT 1")
        except Exception:
            return False
        return True

    # ------------------------------------------------------------------ telemetry

    async def append_telemetry(self, samples: Sequence[TelemetrySample]) -> int:
        rows = [_telemetry_row(sample) for sample in samples]
        if not rows:
            return 0
        async with self._transaction() as db:
            before = db.total_changes
            await db.executemany(
                f"INSERT OR IGNORE INTO telemetry ({_TELEMETRY_SELECT})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return db.total_changes - before

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

    # ------------------------------------------------------------------ dispatch

    async def save_dispatch(self, dispatch: Dispatch) -> None:
        record = msgspec.structs.replace(
            dispatch, created_at=_utc(dispatch.created_at), updated_at=_utc(dispatch.updated_at)
        )
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO dispatches"
                " (dispatch_id, created_at, updated_at, asset_id, site_id, state, record)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (dispatch_id) DO UPDATE SET created_at = excluded.created_at,"
                " updated_at = excluded.updated_at, asset_id = excluded.asset_id,"
                " site_id = excluded.site_id, state = excluded.state, record = excluded.record",
                (
                    record.dispatch_id,
                    _to_us(record.created_at),
                    _to_us(record.updated_at),
                    record.asset_id,
                    record.site_id,
                    record.state,
                    _json(record),
                ),
            )
            await db.execute(
                "DELETE FROM dispatch_targets WHERE dispatch_id = ?", (record.dispatch_id,)
            )
            await db.executemany(
                "INSERT OR IGNORE INTO dispatch_targets (dispatch_id, asset_id) VALUES (?, ?)",
                [(record.dispatch_id, target.asset_id) for target in record.targets],
            )

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
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO dispatch_events (dispatch_id, state, ts, detail) VALUES (?, ?, ?, ?)",
                (event.dispatch_id, event.state, _to_us(event.ts), event.detail),
            )

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
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR REPLACE INTO sessions (session_id, asset_id, site_id, agent_id, peer,"
                " connected_at, disconnected_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    session.session_id,
                    session.asset_id,
                    session.site_id,
                    session.agent_id,
                    session.peer,
                    _to_us(session.connected_at),
                    None if disconnected_at is None else _to_us(disconnected_at),
                ),
            )

    async def close_session(self, session_id: str, disconnected_at: datetime) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE sessions SET disconnected_at = ?"
                " WHERE session_id = ? AND disconnected_at IS NULL",
                (_to_us(disconnected_at), session_id),
            )

    async def close_open_sessions(self, disconnected_at: datetime) -> int:
        async with self._transaction() as db:
            before = db.total_changes
            await db.execute(
                "UPDATE sessions SET disconnected_at = ? WHERE disconnected_at IS NULL",
                (_to_us(disconnected_at),),
            )
            return db.total_changes - before

    async def recent_sessions(self, asset_id: str, limit: int = 5) -> list[Session]:
        rows = await self._fetchall(
            "SELECT session_id, asset_id, site_id, agent_id, peer, connected_at, disconnected_at"
            " FROM sessions WHERE asset_id = ?"
            " ORDER BY connected_at DESC, session_id DESC LIMIT ?",
            (asset_id, max(limit, 0)),
        )
        return [_session(row) for row in rows]

    async def append_heartbeats(self, heartbeats: Sequence[Heartbeat]) -> None:
        rows = [
            (beat.asset_id, beat.site_id, beat.agent_id, _to_us(beat.ts), beat.uptime_s)
            for beat in heartbeats
        ]
        if not rows:
            return
        async with self._transaction() as db:
            await db.executemany(
                "INSERT OR IGNORE INTO heartbeats (asset_id, site_id, agent_id, ts, uptime_s)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
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
            "SELECT asset_id, site_id, agent_id, ts, uptime_s FROM heartbeats"
            f" WHERE asset_id = ?{where} ORDER BY ts DESC LIMIT ?",
            [asset_id, *params, max(limit, 0)],
        )
        return [_heartbeat(row) for row in rows]

    # ------------------------------------------------------------------ events

    async def append_event(self, event: Event) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO events (ts, kind, message, asset_id, site_id, data)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    _to_us(event.ts),
                    event.kind,
                    event.message,
                    event.asset_id,
                    event.site_id,
                    _json(event.data),
                ),
            )

    async def events(
        self,
        *,
        asset_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[Event]:
        conditions: list[str] = []
        params: list[Any] = []
        if asset_id is not None:
            conditions.append("asset_id = ?")
            params.append(asset_id)
        if kind is not None:
            conditions.append("kind = ?")
            params.append(kind)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._fetchall(
            f"SELECT ts, kind, message, asset_id, site_id, data FROM events{where}"
            " ORDER BY ts DESC, id DESC LIMIT ?",
            [*params, max(limit, 0)],
        )
        return [_event(row) for row in rows]


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
