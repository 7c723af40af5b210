"""The agent's buffer file: one SQLite file, its lock, its schema and its one thread.

:class:`BufferFile` opens the file once for the stores kept in it (the telemetry queue,
the command journal and the outbox); each store is a :class:`Store` that attaches itself
to the file when it is made. What the file holds, each in its own table:

* ``meta`` — the schema version and when the file was created, and the telemetry queue's
  ``stream_id``, next ``seq`` and drop counters;
* ``telemetry`` and ``dropped`` — the telemetry queue (:mod:`.telemetry`);
* ``outcomes``, ``schedules`` and ``in_force`` — the command journal (:mod:`.journal`);
* ``events`` and ``local_reports`` — the outbox (:mod:`.outbox`).

**Durability.** The file is in WAL mode. With ``sync="normal"`` (the default) a committed
row survives the agent process being killed (``kill -9``, a crash) but the last commits
may be lost on power loss or an OS crash; ``sync="full"`` makes every commit survive those
too, at the cost of an fsync per commit. ``path=":memory:"`` keeps everything in memory
(not durable; for tests). While the file is open its process holds an advisory lock
(``flock``) on ``<path>.lock``: a second agent pointed at the same file fails at start
instead of sharing sequence numbers. Other readers (an operator's ``sqlite3`` shell) may
read the file meanwhile; a killed agent's lock goes with its process.

**Threading.** SQLite runs on one dedicated thread (:class:`der_sdk.sqlite_worker.
SQLiteWorker`, the same as the headend's SQLite storage): every operation of a store is a
whole transaction or query in one hop, so transactions never interleave and the event loop
never blocks on the disk. Each store mirrors what the link asks often (what is held, how
many are waiting) on the loop, so those questions never touch the disk.

**Opening.** Every async method of a store opens the file on first use. Opening creates
the schema, checks its version, and reads every store's state in one transaction; then
each store does its upkeep once (:meth:`Store.after_open`). :meth:`BufferFile.close` lets
each store finish (the telemetry queue deletes what was acknowledged) and closes the file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from der_sdk.errors import DerSdkError
from der_sdk.sqlite_worker import SQLiteWorker, transaction

__all__ = ["MEMORY", "SCHEMA_VERSION", "BufferFile", "Loaded", "Store", "SyncMode"]

log = logging.getLogger("der.agent.buffer")

T = TypeVar("T")

MEMORY = ":memory:"
SCHEMA_VERSION = 1
SyncMode = Literal["normal", "full"]

Loaded = Callable[[], None]
"""What a store's loader returns from the thread: it applies what was read, on the loop."""

_SCHEMA = """
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
    reported INTEGER NOT NULL DEFAULT 0,
    superseded_by TEXT
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
CREATE TABLE IF NOT EXISTS schedules (
    command_id TEXT PRIMARY KEY,
    asset_id TEXT,
    site_id TEXT,
    start_us INTEGER NOT NULL,
    steps BLOB NOT NULL,
    duration_s REAL,
    next_step INTEGER NOT NULL DEFAULT 0,
    cut_us INTEGER,
    cut_by TEXT
);
CREATE TABLE IF NOT EXISTS in_force (
    asset_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    command_id TEXT,
    ts_us INTEGER NOT NULL
);
"""


def us(seconds: float) -> int:
    """Seconds as integer microseconds (how the file keeps times)."""
    return round(seconds * 1_000_000)


class Store:
    """One kind of record in a :class:`BufferFile`; it attaches itself to the file.

    A store overrides what it needs of :meth:`loader`, :meth:`after_open` and
    :meth:`before_close`; the file calls them.
    """

    def __init__(self, file: BufferFile) -> None:
        self.file = file
        file.attach(self)

    async def open(self) -> None:
        """Open the file this store is kept in (see :meth:`BufferFile.open`)."""
        await self.file.open()

    def loader(self) -> Callable[[sqlite3.Connection], Loaded]:
        """Called on the loop as the file opens; returns the job that reads the store's
        state inside the opening transaction, on the thread."""
        return lambda conn: _nothing

    async def after_open(self) -> None:
        """Upkeep once the file is open (every store is loaded by then)."""

    async def before_close(self) -> None:
        """Last writes before the file closes."""


def _nothing() -> None:
    pass


class BufferFile:
    """The agent's buffer file (see the module docstring).

    :param path: the SQLite file (its folder is created), or ``":memory:"``.
    :param sync: ``normal`` survives a killed process; ``full`` also survives power loss.
    :param clock: wall clock in seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        path: str = MEMORY,
        *,
        sync: SyncMode = "normal",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sync not in ("normal", "full"):
            raise ValueError(f"sync must be 'normal' or 'full', got {sync!r}")
        self.path = path
        self.sync: SyncMode = sync
        self._clock = clock
        self._stores: list[Store] = []
        self._worker: SQLiteWorker | None = None
        self._lock_file: Any = None  # the open <path>.lock while the file is open
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._closed = False

    @property
    def durable(self) -> bool:
        """``False`` for an in-memory buffer."""
        return self.path != MEMORY

    @property
    def accepting(self) -> bool:
        """New work may start: the file is open and not closing."""
        return self._worker is not None and not self._closed

    def attach(self, store: Store) -> None:
        """Keep ``store`` in this file: it is loaded when the file opens. Stores attach
        before the file is opened."""
        if self._opened:
            raise RuntimeError(f"buffer file {self.path} is open; attach stores before")
        self._stores.append(store)

    async def open(self) -> None:
        """Open (or create) the file, load every store and run their upkeep. Idempotent.

        :raises DerSdkError: the file is closed, locked by another process, is not a
            buffer, or cannot be created; the message names the path.
        """
        if self._closed:
            raise DerSdkError(f"telemetry buffer {self.path} is closed")
        if self._opened:
            return
        async with self._open_lock:
            if self._opened:
                return
            worker = SQLiteWorker(
                self.path, connect=self._connect, name=f"der-agent-buffer:{self.path}"
            )
            try:
                await worker.open()
                loaders = [store.loader() for store in self._stores]
                loaded = await worker.run(self._prepare(us(self._clock()), loaders))
            except BaseException:
                await worker.close()
                self._release_lock()
                raise
            self._worker = worker
            for apply in loaded:
                apply()
            self._opened = True
        for store in self._stores:
            await store.after_open()

    async def ready(self) -> None:
        """Open the file unless it is open; refuse once it is closed."""
        if not self._opened or self._closed:
            await self.open()

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job(connection)`` on the file's thread (a read; see :meth:`write`)."""
        if self._worker is None:
            raise DerSdkError(f"telemetry buffer {self.path} is closed")
        result: T = await self._worker.run(job)
        return result

    async def write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job(connection)`` as one transaction on the file's thread."""
        return await self.run(transaction(job))

    async def close(self) -> None:
        """Let each store finish its writes, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        worker = self._worker
        if worker is None:  # never opened
            return
        for store in self._stores:
            await store.before_close()
        self._worker = None
        await worker.close()
        self._release_lock()

    # ------------------------------------------------------------------ on the thread

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        try:
            if path != MEMORY:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self._lock_exclusively(path + ".lock")
            return sqlite3.connect(path, isolation_level=None, timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            self._release_lock()
            raise DerSdkError(
                f"cannot open the telemetry buffer {path}: {exc}; check the path and its "
                f"folder's permissions (agent config buffer.path, AGENT_BUFFER_PATH)"
            ) from None

    def _lock_exclusively(self, lock_path: str) -> None:
        """Hold an advisory lock for as long as the file is open: two agents must never
        share a buffer. The OS drops it with the process, however that ends."""
        if sys.platform == "win32":  # no flock; one agent per file is up to the operator
            return
        import fcntl

        handle = open(lock_path, "a")  # noqa: SIM115 - held open, locked, until closed
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DerSdkError(
                f"telemetry buffer {self.path} is in use by another process (another agent "
                f"with the same buffer path?); give each agent its own buffer file"
            ) from None
        except BaseException:
            handle.close()
            raise
        self._lock_file = handle

    def _release_lock(self) -> None:
        # Once the thread has closed the connection (or never made one): closing the
        # handle releases the flock.
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            lock.close()

    def _prepare(
        self, now_us: int, loaders: list[Callable[[sqlite3.Connection], Loaded]]
    ) -> Callable[[sqlite3.Connection], list[Loaded]]:
        """The opening job: settings, schema, version check and every store's loader, the
        last three in one transaction."""

        def load(conn: sqlite3.Connection) -> list[Loaded]:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            version = int(meta.get("schema_version", SCHEMA_VERSION))
            if version > SCHEMA_VERSION:
                raise DerSdkError(
                    f"telemetry buffer {self.path} has schema version {version}, newer than "
                    f"this agent's ({SCHEMA_VERSION}); upgrade the agent or move the file away"
                )
            if "schema_version" not in meta:
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [("schema_version", SCHEMA_VERSION), ("created_us", now_us)],
                )
            return [loader(conn) for loader in loaders]

        def prepare(conn: sqlite3.Connection) -> list[Loaded]:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
                return transaction(load)(conn)
            except sqlite3.OperationalError as exc:
                raise DerSdkError(f"telemetry buffer {self.path} cannot be used: {exc}") from None
            except sqlite3.DatabaseError as exc:
                raise DerSdkError(
                    f"telemetry buffer {self.path} is not an agent buffer ({exc}); move the "
                    f"file away to start a new buffer"
                ) from None

        return prepare
