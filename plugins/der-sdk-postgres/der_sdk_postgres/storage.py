"""The PostgreSQL storage backend (``postgresql://`` and ``postgres://``), on asyncpg.

* One asyncpg pool; size, timeouts and the statement cache come from the URL
  (:class:`~der_sdk_postgres.settings.PostgresSettings`).
* The schema is created and upgraded by :func:`~der_sdk_postgres.migrations.migrate` at
  :meth:`PostgresStorage.open`, under an advisory lock, on a connection of its own.
* Telemetry is written with binary ``COPY`` into a per-connection temporary staging table,
  then ``INSERT ... SELECT ... ON CONFLICT (asset_id, ts) DO NOTHING`` into ``telemetry``,
  in one transaction per call: the batch is atomic, and a re-sent sample is stored once.
* ``jsonb`` columns use a binary codec on msgspec: Python objects are encoded on the way
  in, and raw JSON bytes come back so each caller decodes into its own type.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import asyncpg
import msgspec

from der_sdk.errors import DerSdkError
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
from der_sdk.storage.contract import (
    ALARM_COLUMNS,
    EXPORT_PAGE_ROWS,
    TELEMETRY_COLUMNS,
    AlarmUpdate,
    AlarmWrite,
    ExporterLease,
    ExporterLeaseLostError,
    StorageBackend,
    TelemetryChanges,
    alarm_conditions,
    check_page_size,
    checked_alarm_update,
)
from der_sdk.tasks import cancel_and_wait
from der_sdk_postgres.migrations import migrate
from der_sdk_postgres.settings import PostgresSettings

__all__ = ["PROJECT_TABLES", "PostgresStorage", "PostgresUnavailableError"]

log = logging.getLogger("der.storage.postgres")

PROJECT_TABLES = (
    "telemetry",
    "dispatch_targets",
    "dispatches",
    "dispatch_events",
    "agent_sessions",
    "heartbeats",
    "events",
    "alarms",
    "alarm_events",
    "exporter_cursors",
)
"""The tables ``reset()`` (``RESET_DB``) empties: this project's data and nothing else. The
migrations table is kept, so the schema stays in place."""

STAGING_TABLE = "der_telemetry_staging"
"""A temporary table per pooled connection (``ON COMMIT DELETE ROWS``) that COPY fills."""

HEALTH_TIMEOUT_S = 5.0
"""Longest a health check waits for a connection and ``SELECT 1``."""
CLOSE_TIMEOUT_S = 10.0
"""How long close() lets running queries finish before terminating the connections."""
PRUNE_BATCH_ROWS = 50_000
"""Rows the retention job deletes per statement (and per transaction)."""
DISPATCH_LOCK_CLASS = 0x44535054
"""The first key of every dispatch lock (the bytes of ``DSPT``): dispatch locks are
``pg_advisory_lock(DISPATCH_LOCK_CLASS, hashtext(dispatch_id))``, in the two-key space,
apart from the one-key lock of the migrations."""

ALARM_LOCK_CLASS = 0x414C524D
"""The first key of the lock :meth:`PostgresStorage.update_alarm` takes (the bytes of
``ALRM``): ``pg_advisory_xact_lock(ALARM_LOCK_CLASS, hashtext(asset_id || '/' || code))``,
held until its transaction ends."""

EXPORTER_LOCK_CLASS = 0x45585054
"""The first key of an exporter's lease (the bytes of ``EXPT``):
``pg_try_advisory_lock(EXPORTER_LOCK_CLASS, hashtext(name))``, held by a connection of the
lease's own for as long as the lease is (:meth:`PostgresStorage.exporter_lease`)."""


@dataclass(slots=True, eq=False)
class _HeldLock:
    """The pooled connection on which a task holds dispatch locks; the dispatch reads
    and writes of that task run on it while it holds them."""

    storage: PostgresStorage
    task: asyncio.Task[object] | None
    conn: asyncpg.Connection


_held_lock: contextvars.ContextVar[_HeldLock | None] = contextvars.ContextVar(
    "der_postgres_dispatch_lock", default=None
)

_TELEMETRY_SELECT = ", ".join(TELEMETRY_COLUMNS)
_telemetry_row = attrgetter(*TELEMETRY_COLUMNS)

_INSERT_FROM_STAGING = (
    f"INSERT INTO telemetry ({_TELEMETRY_SELECT})"
    f" SELECT {_TELEMETRY_SELECT} FROM {STAGING_TABLE}"
    " ON CONFLICT (asset_id, ts) DO NOTHING"
)

# The latest sample of every asset in one statement: a recursive "skip scan" walks the
# primary key from one distinct asset_id to the next, then a LATERAL probe reads each
# asset's newest row. Cost grows with the number of assets, not the number of samples.
_LATEST_PER_ASSET = f"""
WITH RECURSIVE assets (asset_id) AS (
    (SELECT asset_id FROM telemetry ORDER BY asset_id LIMIT 1)
    UNION ALL
    SELECT (SELECT t.asset_id FROM telemetry AS t
            WHERE t.asset_id > assets.asset_id ORDER BY t.asset_id LIMIT 1)
    FROM assets WHERE assets.asset_id IS NOT NULL
)
SELECT newest.* FROM assets CROSS JOIN LATERAL (
    SELECT {_TELEMETRY_SELECT} FROM telemetry AS t
    WHERE t.asset_id = assets.asset_id ORDER BY t.ts DESC LIMIT 1
) AS newest
WHERE assets.asset_id IS NOT NULL
"""

# Rows in the order they became visible (migration 0007): only those whose transaction
# is older than every transaction still running, so none can later appear before them.
_CHANGES = (
    f"SELECT {_TELEMETRY_SELECT}, ingest_xid FROM telemetry"
    " WHERE ingest_xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint{after}"
    " ORDER BY ingest_xid, asset_id, ts LIMIT $1"
)
_CHANGES_AFTER = " AND (ingest_xid, asset_id, ts) > ($2, $3, $4)"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _changes_cursor(xid: int, asset_id: str, ts: datetime) -> str:
    """The cursor after a row: ``XID:MICROSECONDS:ASSET_ID`` (asset ids may hold ``:``)."""
    return f"{xid}:{(ts - _EPOCH) // _MICROSECOND}:{asset_id}"


def _parse_changes_cursor(cursor: str) -> tuple[int, str, datetime]:
    try:
        xid, us, asset_id = cursor.split(":", 2)
        return int(xid), asset_id, _EPOCH + timedelta(microseconds=int(us))
    except ValueError:
        raise DerSdkError(
            f"exporter cursor {cursor!r} is not a PostgreSQL telemetry cursor "
            "(XID:MICROSECONDS:ASSET_ID); was it written by another storage backend?"
        ) from None


_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS; TimeoutError is an OSError too
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,  # starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)

_json_encoder = msgspec.json.Encoder()
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_decode_dispatch = msgspec.json.Decoder(Dispatch).decode
_JSONB_VERSION = b"\x01"


class PostgresUnavailableError(ConnectionError):
    """PostgreSQL cannot be reached now (down, starting, or the network is cut).

    A ``ConnectionError``: the headend keeps retrying ``open()`` on it, where other errors
    (wrong password, missing database) end the start with their message.
    """


# --------------------------------------------------------------------------- conversions


def _encode_jsonb(value: Any) -> bytes:
    """jsonb binary format: a version byte, then JSON text. Bytes are taken as JSON."""
    if isinstance(value, bytes):
        return _JSONB_VERSION + value
    return _JSONB_VERSION + _json_encoder.encode(value)


def _decode_jsonb(data: bytes) -> bytes:
    return data[1:]


def _check_aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"storage needs timezone-aware datetimes, got naive {value!r}")
    return value


def _check_timestamps(samples: Sequence[TelemetrySample]) -> None:
    """Refuse the whole batch, before anything is written, if one timestamp is naive."""
    for sample in samples:
        if sample.ts.tzinfo is not UTC:
            _check_aware(sample.ts)


def _telemetry_sample(row: asyncpg.Record) -> TelemetrySample:
    mw = row[3]
    return TelemetrySample(
        asset_id=row[0],
        site_id=row[1],
        ts=row[2],
        mw=float("nan") if mw is None else mw,
        mw_setpoint=row[4],
        online=row[5],
        status=row[6],
        fault_code=row[7],
        seq=row[8],
        quality=row[9],
        quality_reason=row[10],
        details=_decode_object(row[11]),
    )


def _count(status: str) -> int:
    """The row count of a command status such as ``INSERT 0 12`` or ``UPDATE 3``."""
    return int(status.rpartition(" ")[2])


def _range(start: datetime | None, end: datetime | None, first: int) -> tuple[str, list[Any]]:
    """SQL conditions and parameters for ``start <= ts < end``, numbered from ``$first``.

    Each combination of bounds is its own statement text, so every cached plan has both
    bounds as index conditions instead of ``$n IS NULL OR ...`` filters.
    """
    sql, params = "", []
    if start is not None:
        params.append(_check_aware(start))
        sql += f" AND ts >= ${first + len(params) - 1}"
    if end is not None:
        params.append(_check_aware(end))
        sql += f" AND ts < ${first + len(params) - 1}"
    return sql, params


# --------------------------------------------------------------------------- backend


class PostgresStorage(StorageBackend):
    """The headend's storage on PostgreSQL through an asyncpg pool."""

    name = "postgresql"
    shared = True

    def __init__(self, settings: PostgresSettings) -> None:
        self.settings = settings
        self._pool: asyncpg.Pool | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._lease_tries: dict[str, asyncpg.Connection] = {}
        """By exporter name: the connection of this process's last refused lease try."""
        self.hypertable = False
        """Whether ``telemetry`` is a TimescaleDB hypertable (known after open())."""
        # Leave pooled connections for dispatch, sessions and REST reads.
        self.concurrent_writes = max(1, settings.pool_max // 2)

    @classmethod
    def from_url(cls, url: str) -> PostgresStorage:
        return cls(PostgresSettings.from_url(url))

    def __repr__(self) -> str:
        return f"PostgresStorage({self.settings.target!r})"

    # ------------------------------------------------------------------ plumbing

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open; await open() first")
        return self._pool

    def _unavailable(self, exc: BaseException) -> PostgresUnavailableError:
        reason = " ".join(str(exc).split()) or type(exc).__name__  # one log line
        return PostgresUnavailableError(
            f"PostgreSQL at {self.settings.target} is unreachable: {reason}"
        )

    def _refused(self, exc: asyncpg.PostgresError) -> DerSdkError:
        """A clear error for a server that answers but will not let us in."""
        database = self.settings.target.rpartition("/")[2]
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            hint = f"create it (createdb {database}) or fix the database name in DATABASE_URL"
        elif isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
            hint = "check the user and password in DATABASE_URL"
        else:
            hint = "check DATABASE_URL and the server's log"
        return DerSdkError(f"PostgreSQL at {self.settings.target} refused: {exc}; {hint}")

    async def _connect(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(
                self.settings.dsn,
                timeout=self.settings.connect_timeout,
                command_timeout=self.settings.command_timeout_or_none,
                statement_cache_size=0,
            )
        except _UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(exc) from exc
        except asyncpg.PostgresError as exc:
            raise self._refused(exc) from exc

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        """Prepare a new pooled connection: jsonb codec and the telemetry staging table."""
        await conn.set_type_codec(
            "jsonb",
            schema="pg_catalog",
            encoder=_encode_jsonb,
            decoder=_decode_jsonb,
            format="binary",
        )
        await conn.execute(
            # The sample's columns only: telemetry fills in ingest_xid itself (0007).
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} ON COMMIT DELETE ROWS AS"
            f" SELECT {_TELEMETRY_SELECT} FROM telemetry WITH NO DATA"
        )

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Migrate the schema, then open the pool.

        :raises PostgresUnavailableError: the server cannot be reached (retry later).
        :raises DerSdkError: the server refused (database, user, password), or its schema
            is newer than this plugin.
        """
        if self._pool is not None:
            return
        settings = self.settings
        conn = await self._connect()
        try:
            applied = await migrate(conn)
            self.hypertable = await _is_hypertable(conn)
        except _UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(exc) from exc
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=CLOSE_TIMEOUT_S)
        for migration in applied:
            log.info("applied migration %04d_%s", migration.version, migration.name)
        try:
            pool = await asyncpg.create_pool(
                settings.dsn,
                min_size=settings.pool_min,
                max_size=settings.pool_max,
                max_inactive_connection_lifetime=settings.max_inactive_connection_lifetime,
                timeout=settings.connect_timeout,
                command_timeout=settings.command_timeout_or_none,
                statement_cache_size=settings.statement_cache_size,
                init=self._init_connection,
            )
        except _UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(exc) from exc
        except asyncpg.PostgresError as exc:
            raise self._refused(exc) from exc
        self._pool = pool
        log.info(
            "PostgreSQL %s: pool %d..%d, telemetry %s",
            settings.target,
            settings.pool_min,
            settings.pool_max,
            "is a TimescaleDB hypertable" if self.hypertable else "is a plain table",
        )
        if settings.retention_days is not None:
            self._retention_task = asyncio.create_task(
                self._retention_loop(settings.retention_days), name="postgres-retention"
            )

    async def close(self) -> None:
        tries, self._lease_tries = self._lease_tries, {}
        await asyncio.gather(*(_close_quietly(conn) for conn in tries.values()))
        task, self._retention_task = self._retention_task, None
        await cancel_and_wait([task])
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
            except Exception:  # a hung or broken server: do not let shutdown wait on it
                pool.terminate()

    async def reset(self) -> None:
        await self.pool.execute(f"TRUNCATE {', '.join(PROJECT_TABLES)} RESTART IDENTITY")

    async def healthy(self) -> bool:
        pool = self._pool
        if pool is None or pool.is_closing():
            return False
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S), pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except Exception:
            return False
        return True

    # ------------------------------------------------------------------ retention

    async def prune_telemetry(self, older_than: datetime) -> int:
        """Delete telemetry with ``ts < older_than``; return how many rows were deleted.

        Rows go in batches of :data:`PRUNE_BATCH_ROWS`, each its own short transaction, so
        ingest is never blocked for long and no statement runs into ``command_timeout``.
        On a TimescaleDB hypertable whole chunks before the cutoff are dropped first with
        ``drop_chunks`` (cheap, and not counted: TimescaleDB does not report their rows);
        only the chunk that straddles the cutoff is deleted row by row. Run it from a
        scheduler, or set ``retention_days`` in the URL to have the headend run it.
        """
        cutoff = _check_aware(older_than)
        if self.hypertable:
            await self.pool.execute("SELECT drop_chunks('telemetry', older_than => $1)", cutoff)
        return await self._delete_before("telemetry", cutoff)

    async def prune_heartbeats(self, older_than: datetime) -> int:
        """Delete heartbeats with ``ts < older_than``; return how many rows were deleted."""
        return await self._delete_before("heartbeats", _check_aware(older_than))

    async def _delete_before(self, table: str, cutoff: datetime) -> int:
        deleted = 0
        while True:
            # By key, not ctid: a hypertable's ctids repeat across its chunks.
            status = await self.pool.execute(
                f"DELETE FROM {table} WHERE (asset_id, ts) IN ("
                f"SELECT asset_id, ts FROM {table} WHERE ts < $1 LIMIT {PRUNE_BATCH_ROWS})",
                cutoff,
            )
            count = _count(status)
            deleted += count
            if count < PRUNE_BATCH_ROWS:
                return deleted

    async def _retention_loop(self, days: float) -> None:
        """Prune telemetry and heartbeats older than ``days``, every retention interval."""
        while True:
            cutoff = datetime.now(UTC) - timedelta(days=days)
            try:
                telemetry = await self.prune_telemetry(cutoff)
                heartbeats = await self.prune_heartbeats(cutoff)
            except Exception as exc:
                log.warning("retention: pruning rows older than %s failed: %s", cutoff, exc)
            else:
                if telemetry or heartbeats:
                    log.info(
                        "retention: deleted %d telemetry row(s) and %d heartbeat(s) before %s",
                        telemetry,
                        heartbeats,
                        cutoff.isoformat(),
                    )
            await asyncio.sleep(self.settings.retention_interval_s)

    # ------------------------------------------------------------------ telemetry

    async def append_telemetry(self, samples: Sequence[TelemetrySample]) -> int:
        if not samples:
            return 0
        _check_timestamps(samples)
        size = self.settings.batch_size
        new = 0
        async with self.pool.acquire() as conn, conn.transaction():
            for start in range(0, len(samples), size):
                if start:
                    await conn.execute(f"TRUNCATE {STAGING_TABLE}")
                # Rows are made as COPY consumes them: a list of a whole batch of tuples
                # would mostly feed the garbage collector.
                rows = map(_telemetry_row, samples[start : start + size])
                await conn.copy_records_to_table(
                    STAGING_TABLE, records=rows, columns=TELEMETRY_COLUMNS
                )
                # Within one INSERT a later duplicate meets the row an earlier one just
                # inserted, so the first sample for a timestamp wins and is counted once.
                new += _count(await conn.execute(_INSERT_FROM_STAGING))
        return new

    async def telemetry_history(
        self,
        asset_id: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[TelemetrySample]:
        where, params = _range(start, end, first=2)
        rows = await self.pool.fetch(
            f"SELECT {_TELEMETRY_SELECT} FROM telemetry WHERE asset_id = $1{where}"
            f" ORDER BY ts DESC LIMIT ${len(params) + 2}",
            asset_id,
            *params,
            max(limit, 0),
        )
        return [_telemetry_sample(row) for row in rows]

    async def latest_telemetry(self) -> dict[str, TelemetrySample]:
        rows = await self.pool.fetch(_LATEST_PER_ASSET)
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
        where, params = _range(start, end, first=1)
        for column, value in (("site_id", site_id), ("asset_id", asset_id)):
            if value is not None:
                params.append(value)
                where += f" AND {column} = ${len(params)}"
        query = f"SELECT {_TELEMETRY_SELECT} FROM telemetry WHERE TRUE{where} ORDER BY ts, asset_id"
        # One server-side cursor in one read-only transaction: a consistent snapshot of
        # the range, sorted once by the server, fetched a page at a time.
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            cursor = await conn.cursor(query, *params)
            while True:
                rows = await cursor.fetch(page_size)
                if not rows:
                    return
                yield [_telemetry_sample(row) for row in rows]
                if len(rows) < page_size:
                    return

    async def telemetry_changes(self, after: str | None, limit: int) -> TelemetryChanges:
        if after is None:
            rows = await self.pool.fetch(_CHANGES.format(after=""), max(limit, 0))
        else:
            rows = await self.pool.fetch(
                _CHANGES.format(after=_CHANGES_AFTER),
                max(limit, 0),
                *_parse_changes_cursor(after),
            )
        if not rows:
            return TelemetryChanges([], after)
        last = rows[-1]
        return TelemetryChanges(
            [_telemetry_sample(row) for row in rows],
            _changes_cursor(last["ingest_xid"], last["asset_id"], last["ts"]),
        )

    async def exporter_cursor(self, name: str) -> str | None:
        found: str | None = await self.pool.fetchval(
            "SELECT cursor FROM exporter_cursors WHERE name = $1", name
        )
        return found

    async def save_exporter_cursor(self, name: str, cursor: str) -> None:
        await self.pool.execute(_SAVE_CURSOR, name, cursor)

    async def exporter_lease(self, name: str) -> ExporterLease | None:
        """Exporter ``name``'s lease, when no other process holds it: a session-level
        advisory lock (:data:`EXPORTER_LOCK_CLASS`) on a connection of its own, outside
        the pool, kept open while the lease is held.

        The server releases the lock when that connection ends (closed, broken, or
        terminated by ``pg_terminate_backend``); the holder finds out at its next
        :meth:`~ExporterLease.check` or :meth:`~ExporterLease.save_cursor`, which run
        on that connection, so a holder that lost its lock saves no cursor. A try that
        is refused keeps its connection for the next try of that name, so a standby
        replica opens no connection per try.
        """
        kept = self._lease_tries.pop(name, None)
        conn: asyncpg.Connection | None = None
        granted = False
        if kept is not None and not kept.is_closed():
            with contextlib.suppress(Exception):  # broken since: a new connection
                granted = await _try_lease_lock(kept, name)
                conn = kept
        if conn is None:
            conn = await self._connect()
            granted = await _try_lease_lock(conn, name)
        if not granted:
            if (other := self._lease_tries.pop(name, None)) is not None:
                other.terminate()  # another task's try of the same name meanwhile
            self._lease_tries[name] = conn
            return None
        return _PostgresExporterLease(self, name, conn)

    # ------------------------------------------------------------------ dispatch

    @contextlib.asynccontextmanager
    async def dispatch_lock(self, dispatch_id: str) -> AsyncIterator[None]:
        """Hold ``dispatch_id`` against every other process (and task) using this
        database: a session-level advisory lock on a pooled connection, for as long as
        the block runs.

        The dispatch reads and writes of the holding task run on that connection, so a
        holder never waits for a second pooled connection, and a lock taken inside
        another (a new dispatch superseding older ones) reuses it. Waiting for a lock
        another holder keeps counts against ``command_timeout``.
        """
        held = self._held()
        if held is not None:
            await held.execute(_LOCK, DISPATCH_LOCK_CLASS, dispatch_id)
            try:
                yield
            finally:
                await _unlock(held, dispatch_id)
            return
        async with self.pool.acquire() as conn:
            await conn.execute(_LOCK, DISPATCH_LOCK_CLASS, dispatch_id)
            token = _held_lock.set(_HeldLock(self, asyncio.current_task(), conn))
            try:
                yield
            finally:
                _held_lock.reset(token)
                # A connection that fails here goes back to the pool, whose reset (or
                # the end of the session) releases every advisory lock it holds.
                await _unlock(conn, dispatch_id)

    def _held(self) -> asyncpg.Connection | None:
        """The connection of the dispatch lock the current task holds, if any."""
        held = _held_lock.get()
        if held is None or held.storage is not self or held.task is not asyncio.current_task():
            return None
        return held.conn

    async def save_dispatch(self, dispatch: Dispatch) -> None:
        held = self._held()
        if held is not None:
            async with held.transaction():
                await self._save_dispatch(held, dispatch)
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await self._save_dispatch(conn, dispatch)

    async def record_dispatch(self, dispatch: Dispatch, event: DispatchEvent) -> None:
        held = self._held()
        if held is not None:
            async with held.transaction():
                await self._save_dispatch(held, dispatch)
                await held.execute(*_dispatch_event_insert(event))
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await self._save_dispatch(conn, dispatch)
            await conn.execute(*_dispatch_event_insert(event))

    async def record_dispatches(
        self, records: Sequence[tuple[Dispatch, DispatchEvent]], events: Sequence[Event] = ()
    ) -> None:
        held = self._held()
        if held is not None:
            async with held.transaction():
                await self._record_dispatches(held, records, events)
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await self._record_dispatches(conn, records, events)

    async def _record_dispatches(
        self,
        conn: asyncpg.Connection,
        records: Sequence[tuple[Dispatch, DispatchEvent]],
        events: Sequence[Event],
    ) -> None:
        for dispatch, event in records:
            await self._save_dispatch(conn, dispatch)
            await conn.execute(*_dispatch_event_insert(event))
        if events:
            await conn.executemany(_INSERT_EVENT, [_event_args(e) for e in events])

    @staticmethod
    async def _save_dispatch(conn: asyncpg.Connection, dispatch: Dispatch) -> None:
        record = msgspec.structs.replace(
            dispatch,
            created_at=_check_aware(dispatch.created_at).astimezone(UTC),
            updated_at=_check_aware(dispatch.updated_at).astimezone(UTC),
        )
        await conn.execute(
            "INSERT INTO dispatches"
            " (dispatch_id, created_at, updated_at, asset_id, site_id, state, mw, record)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (dispatch_id) DO UPDATE SET created_at = excluded.created_at,"
            " updated_at = excluded.updated_at, asset_id = excluded.asset_id,"
            " site_id = excluded.site_id, state = excluded.state, mw = excluded.mw,"
            " record = excluded.record",
            record.dispatch_id,
            record.created_at,
            record.updated_at,
            record.asset_id,
            record.site_id,
            record.state,
            record.mw,
            _json_encoder.encode(record),
        )
        await conn.execute(
            "DELETE FROM dispatch_targets WHERE dispatch_id = $1", record.dispatch_id
        )
        if record.targets:
            await conn.execute(
                "INSERT INTO dispatch_targets"
                " (dispatch_id, asset_id, mw, state, applied_mw, reason)"
                " SELECT $1, * FROM unnest($2::text[], $3::float8[], $4::text[],"
                " $5::float8[], $6::text[])"
                " ON CONFLICT (dispatch_id, asset_id) DO NOTHING",
                record.dispatch_id,
                [t.asset_id for t in record.targets],
                [t.mw for t in record.targets],
                [t.state for t in record.targets],
                [t.applied_mw for t in record.targets],
                [t.reason for t in record.targets],
            )

    async def get_dispatch(self, dispatch_id: str) -> Dispatch | None:
        raw = await (self._held() or self.pool).fetchval(
            "SELECT record FROM dispatches WHERE dispatch_id = $1", dispatch_id
        )
        return None if raw is None else _decode_dispatch(raw)

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
            params.append(asset_id)
            conditions.append(
                f"(d.asset_id = ${len(params)} OR d.dispatch_id IN"
                f" (SELECT t.dispatch_id FROM dispatch_targets AS t"
                f" WHERE t.asset_id = ${len(params)}))"
            )
        if site_id is not None:
            params.append(site_id)
            conditions.append(f"d.site_id = ${len(params)}")
        if state is not None:
            params.append(state)
            conditions.append(f"d.state = ${len(params)}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        params.append(max(limit, 0))
        rows = await (self._held() or self.pool).fetch(
            f"SELECT d.record FROM dispatches AS d{where}"
            f" ORDER BY d.created_at DESC, d.dispatch_id DESC LIMIT ${len(params)}",
            *params,
        )
        return [_decode_dispatch(row[0]) for row in rows]

    async def record_dispatch_event(self, event: DispatchEvent) -> None:
        await (self._held() or self.pool).execute(*_dispatch_event_insert(event))

    async def dispatch_events(self, dispatch_id: str) -> list[DispatchEvent]:
        rows = await (self._held() or self.pool).fetch(
            "SELECT dispatch_id, state, ts, detail FROM dispatch_events"
            " WHERE dispatch_id = $1 ORDER BY ts, id",
            dispatch_id,
        )
        return [
            DispatchEvent(dispatch_id=row[0], state=row[1], ts=row[2], detail=row[3])
            for row in rows
        ]

    # ------------------------------------------------------------------ presence

    async def open_session(self, session: Session) -> None:
        disconnected_at = session.disconnected_at
        await self.pool.execute(
            "INSERT INTO agent_sessions (session_id, asset_id, asset_name, site_id, site_name,"
            " agent_id, peer, connected_at, disconnected_at, headend_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            " ON CONFLICT (session_id) DO UPDATE SET asset_id = excluded.asset_id,"
            " asset_name = excluded.asset_name, site_id = excluded.site_id,"
            " site_name = excluded.site_name, agent_id = excluded.agent_id,"
            " peer = excluded.peer, connected_at = excluded.connected_at,"
            " disconnected_at = excluded.disconnected_at, headend_id = excluded.headend_id",
            session.session_id,
            session.asset_id,
            # Names are kept when the session carries them (newer der-sdk models).
            getattr(session, "asset_name", None),
            session.site_id,
            getattr(session, "site_name", None),
            session.agent_id,
            session.peer,
            _check_aware(session.connected_at),
            None if disconnected_at is None else _check_aware(disconnected_at),
            session.headend_id,
        )

    async def close_session(self, session_id: str, disconnected_at: datetime) -> None:
        await self.pool.execute(
            "UPDATE agent_sessions SET disconnected_at = $2"
            " WHERE session_id = $1 AND disconnected_at IS NULL",
            session_id,
            _check_aware(disconnected_at),
        )

    async def close_open_sessions(
        self, disconnected_at: datetime, headend_id: str | None = None
    ) -> int:
        if headend_id is None:
            status = await self.pool.execute(
                "UPDATE agent_sessions SET disconnected_at = $1 WHERE disconnected_at IS NULL",
                _check_aware(disconnected_at),
            )
        else:
            status = await self.pool.execute(
                "UPDATE agent_sessions SET disconnected_at = $1 WHERE disconnected_at IS NULL"
                " AND (headend_id = $2 OR headend_id IS NULL)",
                _check_aware(disconnected_at),
                headend_id,
            )
        return _count(status)

    async def recent_sessions(self, asset_id: str, limit: int = 5) -> list[Session]:
        rows = await self.pool.fetch(
            "SELECT session_id, asset_id, site_id, agent_id, peer, connected_at,"
            " disconnected_at, headend_id FROM agent_sessions WHERE asset_id = $1"
            " ORDER BY connected_at DESC, session_id DESC LIMIT $2",
            asset_id,
            max(limit, 0),
        )
        return [
            Session(
                session_id=row[0],
                asset_id=row[1],
                site_id=row[2],
                agent_id=row[3],
                peer=row[4],
                connected_at=row[5],
                disconnected_at=row[6],
                headend_id=row[7],
            )
            for row in rows
        ]

    async def append_heartbeats(self, heartbeats: Sequence[Heartbeat]) -> None:
        if not heartbeats:
            return
        await self.pool.execute(
            "INSERT INTO heartbeats (asset_id, site_id, agent_id, ts, uptime_s)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],"
            " $5::float8[]) ON CONFLICT (asset_id, ts) DO NOTHING",
            [beat.asset_id for beat in heartbeats],
            [beat.site_id for beat in heartbeats],
            [beat.agent_id for beat in heartbeats],
            [_check_aware(beat.ts) for beat in heartbeats],
            [beat.uptime_s for beat in heartbeats],
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
        where, params = _range(start, end, first=2)
        rows = await self.pool.fetch(
            "SELECT asset_id, site_id, agent_id, ts, uptime_s FROM heartbeats"
            f" WHERE asset_id = $1{where} ORDER BY ts DESC LIMIT ${len(params) + 2}",
            asset_id,
            *params,
            max(limit, 0),
        )
        return [
            Heartbeat(asset_id=row[0], site_id=row[1], agent_id=row[2], ts=row[3], uptime_s=row[4])
            for row in rows
        ]

    # ------------------------------------------------------------------ events

    async def append_event(self, event: Event) -> None:
        await self.pool.execute(_INSERT_EVENT, *_event_args(event))

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
                params.append(value)
                conditions.append(f"{column} = ${len(params)}")
        excluded = sorted(set(exclude_kinds))
        if excluded:
            params.append(excluded)
            conditions.append(f"kind <> ALL(${len(params)}::text[])")
        if start is not None:
            params.append(_check_aware(start))
            conditions.append(f"ts >= ${len(params)}")
        if end is not None:
            params.append(_check_aware(end))
            conditions.append(f"ts < ${len(params)}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        params.append(max(limit, 0))
        rows = await self.pool.fetch(
            f"SELECT ts, kind, message, asset_id, site_id, data FROM events{where}"
            f" ORDER BY ts DESC, id DESC LIMIT ${len(params)}",
            *params,
        )
        return [
            Event(
                ts=row[0],
                kind=row[1],
                message=row[2],
                asset_id=row[3],
                site_id=row[4],
                data=_decode_object(row[5]),
            )
            for row in rows
        ]

    # ------------------------------------------------------------------ alarms

    async def update_alarm(
        self,
        asset_id: str,
        code: str,
        update: AlarmUpdate,
        *,
        event_id: str | None = None,
    ) -> AlarmWrite | None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1::int4, hashtext($2))",
                ALARM_LOCK_CLASS,
                f"{asset_id}/{code}",
            )
            if event_id is not None:
                inserted = await conn.execute(
                    "INSERT INTO alarm_events (event_id) VALUES ($1)"
                    " ON CONFLICT (event_id) DO NOTHING",
                    event_id,
                )
                if not _count(inserted):
                    return None
            row = await conn.fetchrow(
                f"SELECT {ALARM_COLUMNS} FROM alarms"
                " WHERE asset_id = $1 AND code = $2 AND live FOR UPDATE",
                asset_id,
                code,
            )
            live = None if row is None else _alarm(row)
            new = update(live)
            checked_alarm_update(asset_id, code, new)
            if new is None:
                return None
            if live is not None and live.alarm_id != new.alarm_id:
                await conn.execute(
                    "UPDATE alarms SET live = NULL WHERE alarm_id = $1", live.alarm_id
                )
            stored = await conn.fetchrow(
                f"INSERT INTO alarms ({ALARM_COLUMNS}, live)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, true)"
                " ON CONFLICT (alarm_id) DO UPDATE SET site_id = excluded.site_id,"
                " severity = excluded.severity, text = excluded.text, state = excluded.state,"
                " raised_at = excluded.raised_at, cleared_at = excluded.cleared_at,"
                " acknowledged_at = excluded.acknowledged_at,"
                " acknowledged_by = excluded.acknowledged_by,"
                " raise_count = excluded.raise_count, updated_at = excluded.updated_at,"
                f" live = true RETURNING {ALARM_COLUMNS}",
                new.alarm_id,
                new.asset_id,
                new.site_id,
                new.code,
                new.severity,
                new.text,
                new.state,
                _check_aware(new.raised_at),
                _optional_aware(new.cleared_at),
                _optional_aware(new.acknowledged_at),
                new.acknowledged_by,
                new.raise_count,
                _optional_aware(new.updated_at),
            )
            return AlarmWrite(live, _alarm(stored))

    async def acknowledge_alarm(
        self, alarm_id: str, acknowledged_at: datetime, acknowledged_by: str
    ) -> tuple[Alarm, bool] | None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE alarms SET acknowledged_at = $2, acknowledged_by = $3, updated_at = $2"
                f" WHERE alarm_id = $1 AND acknowledged_at IS NULL RETURNING {ALARM_COLUMNS}",
                alarm_id,
                _check_aware(acknowledged_at),
                acknowledged_by,
            )
            if row is not None:
                return _alarm(row), True
            row = await conn.fetchrow(
                f"SELECT {ALARM_COLUMNS} FROM alarms WHERE alarm_id = $1", alarm_id
            )
            return None if row is None else (_alarm(row), False)

    async def get_alarm(self, alarm_id: str) -> Alarm | None:
        row = await self.pool.fetchrow(
            f"SELECT {ALARM_COLUMNS} FROM alarms WHERE alarm_id = $1", alarm_id
        )
        return None if row is None else _alarm(row)

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
            lambda n: f"${n}",
            state=state,
            severity=severity,
            site_id=site_id,
            asset_id=asset_id,
            code=code,
            acknowledged=acknowledged,
            after=after,
        )
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        params.append(max(limit, 0))
        rows = await self.pool.fetch(
            f"SELECT {ALARM_COLUMNS} FROM alarms{where}"
            f" ORDER BY raised_at DESC, alarm_id DESC LIMIT ${len(params)}",
            *params,
        )
        return [_alarm(row) for row in rows]

    async def active_alarm_counts(self) -> dict[AlarmSeverity, int]:
        rows = await self.pool.fetch(
            "SELECT severity, COUNT(*) FROM alarms WHERE state = 'active' GROUP BY severity"
        )
        return {row[0]: row[1] for row in rows}


def _optional_aware(value: datetime | None) -> datetime | None:
    return None if value is None else _check_aware(value)


def _alarm(row: asyncpg.Record) -> Alarm:
    return Alarm(
        alarm_id=row[0],
        asset_id=row[1],
        site_id=row[2],
        code=row[3],
        severity=row[4],
        text=row[5],
        state=row[6],
        raised_at=row[7],
        cleared_at=row[8],
        acknowledged_at=row[9],
        acknowledged_by=row[10],
        raise_count=row[11],
        updated_at=row[12],
    )


async def _is_hypertable(conn: asyncpg.Connection) -> bool:
    """Whether ``telemetry`` (in the current schema) is a TimescaleDB hypertable."""
    installed = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    )
    if not installed:
        return False
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables"
            " WHERE hypertable_name = 'telemetry' AND hypertable_schema = current_schema())"
        )
    )


_LOCK = "SELECT pg_advisory_lock($1::int4, hashtext($2))"
_UNLOCK = "SELECT pg_advisory_unlock($1::int4, hashtext($2))"
_TRY_LOCK = "SELECT pg_try_advisory_lock($1::int4, hashtext($2))"
_SAVE_CURSOR = (
    "INSERT INTO exporter_cursors (name, cursor, updated_at) VALUES ($1, $2, now())"
    " ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor,"
    " updated_at = excluded.updated_at"
)


async def _unlock(conn: asyncpg.Connection, dispatch_id: str) -> None:
    try:
        await conn.execute(_UNLOCK, DISPATCH_LOCK_CLASS, dispatch_id)
    except Exception as exc:  # the pool's reset or the session's end releases it
        log.warning(
            "releasing the lock of dispatch %s failed (%s: %s); the connection's reset releases it",
            dispatch_id,
            type(exc).__name__,
            exc,
        )


class _PostgresExporterLease(ExporterLease):
    """An exporter's advisory lock, held by ``conn`` (not pooled) until released or
    lost. Any failure on ``conn`` loses the lease: the connection is dropped, which
    releases the lock on the server if it still held it."""

    def __init__(self, storage: PostgresStorage, name: str, conn: asyncpg.Connection) -> None:
        super().__init__(storage, name)
        self._conn: asyncpg.Connection | None = conn

    async def check(self) -> None:
        await self._on_lease("SELECT 1")

    async def save_cursor(self, cursor: str) -> None:
        await self._on_lease(_SAVE_CURSOR, self.name, cursor)

    async def _on_lease(self, query: str, *args: object) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            self._conn = None
            raise ExporterLeaseLostError(f"exporter {self.name}: its lease was released or lost")
        try:
            await conn.execute(query, *args)
        except Exception as exc:
            self._conn = None
            conn.terminate()
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ExporterLeaseLostError(
                f"exporter {self.name}: the connection holding its lease failed: {reason}"
            ) from exc

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close_quietly(conn)


async def _try_lease_lock(conn: asyncpg.Connection, name: str) -> bool:
    """Whether ``conn`` took exporter ``name``'s lock; ``conn`` is terminated when the
    try fails."""
    try:
        return bool(await conn.fetchval(_TRY_LOCK, EXPORTER_LOCK_CLASS, name))
    except BaseException:
        conn.terminate()
        raise


async def _close_quietly(conn: asyncpg.Connection) -> None:
    """Close ``conn`` (ending its session releases its advisory locks); terminate it if
    closing fails or is cancelled."""
    try:
        await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except Exception:
        conn.terminate()


_INSERT_EVENT = (
    "INSERT INTO events (ts, kind, message, asset_id, site_id, data)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)


def _event_args(event: Event) -> tuple[Any, ...]:
    """The arguments of :data:`_INSERT_EVENT` for ``event``."""
    return (
        _check_aware(event.ts),
        event.kind,
        event.message,
        event.asset_id,
        event.site_id,
        event.data,
    )


def _dispatch_event_insert(event: DispatchEvent) -> tuple[Any, ...]:
    """The statement and arguments that append one dispatch lifecycle event."""
    return (
        "INSERT INTO dispatch_events (dispatch_id, state, ts, detail) VALUES ($1, $2, $3, $4)",
        event.dispatch_id,
        event.state,
        _check_aware(event.ts),
        event.detail,
    )
