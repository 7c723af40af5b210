"""One SQLite connection on a thread of its own, running whole jobs for the event loop.

The SQLite storage backend and the agent's buffer file both use it. A job is a function
of the connection: a whole transaction (wrap it in :func:`transaction`) or a whole query.
Every operation is therefore one hand-over to the thread and back, no other job's
statements can interleave with it, and the event loop never waits on the disk.

Jobs are urgent (the default) or bulk. Urgent jobs run before queued bulk jobs, but at most
:data:`URGENT_BURST` in a row while a bulk job waits, so a stream of reads cannot starve
bulk writes (the headend's telemetry). A caller cancelled while its job waits in line takes
the job out of line; a job that has started runs to its end.

A long bulk job that may commit in parts (the headend's telemetry inserts: every row is
``INSERT OR IGNORE`` and nobody is told it is stored before the whole job ends) calls
:meth:`SQLiteWorker.yield_to_urgent` between its statements, so an urgent job that
arrives while it runs (a dispatch's lifecycle record) waits for one statement, not for
the whole job.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["URGENT_BURST", "Job", "SQLiteWorker", "transaction"]

_T = TypeVar("_T")

Job = Callable[[sqlite3.Connection], Any]

URGENT_BURST = 8
"""Urgent jobs run before waiting bulk jobs, but at most this many in a row while a bulk
job waits."""


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _connect_plain(path: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; jobs issue BEGIN themselves.
    return sqlite3.connect(path, isolation_level=None)


class SQLiteWorker:
    """One ``sqlite3`` connection, owned by one thread that runs whole jobs.

    :param path: the database file, or ``":memory:"``; it names the thread.
    :param connect: makes the connection, on the worker's thread (default:
        ``sqlite3.connect(path, isolation_level=None)``). It may raise; :meth:`open` then
        raises the same error and the thread ends.
    :param name: the thread's name (default ``der-sqlite:<file name>``).
    """

    def __init__(
        self,
        path: str,
        *,
        connect: Callable[[], sqlite3.Connection] | None = None,
        name: str | None = None,
    ) -> None:
        self.path = path
        self._connect = connect if connect is not None else lambda: _connect_plain(path)
        self._name = name or f"der-sqlite:{Path(path).name}"
        self._urgent: deque[tuple[Job, asyncio.Future[Any]]] = deque()
        self._bulk: deque[tuple[Job, asyncio.Future[Any]]] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._urgent_run = 0
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self.on_urgent: Callable[[], object] | None = None
        """Called (on the event loop) when an urgent job is queued: a bulk job that runs
        its statements elsewhere (the SQLite backend's writer process) is told to pause."""

    async def open(self) -> None:
        """Start the thread and connect on it."""
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()
        try:
            await self.run(self._open_connection)
        except BaseException:
            await self.close()
            raise

    def _open_connection(self, _: sqlite3.Connection | None) -> None:
        self._conn = self._connect()

    async def run(self, job: Job, *, bulk: bool = False) -> Any:
        """Run ``job(connection)`` on the thread; its result or exception comes back.

        :param bulk: queue behind urgent jobs (see the module docstring).
        :raises RuntimeError: the worker is not open, or is closing.
        """
        if self._loop is None or self._stopped is None or self._stopped.done():
            raise RuntimeError(f"SQLite database {self.path} is not open; await open() first")
        future: asyncio.Future[Any] = self._loop.create_future()
        with self._ready:
            if self._stopping:
                raise RuntimeError(f"SQLite database {self.path} is closing")
            (self._bulk if bulk else self._urgent).append((job, future))
            self._ready.notify()
        if not bulk and self.on_urgent is not None:
            self.on_urgent()
        return await future

    def _next(self) -> tuple[Job, asyncio.Future[Any]] | None:
        with self._ready:
            while not (self._urgent or self._bulk or self._stopping):
                self._ready.wait()
            if self._bulk and (not self._urgent or self._urgent_run >= URGENT_BURST):
                self._urgent_run = 0
                return self._bulk.popleft()
            if self._urgent:
                self._urgent_run += 1 if self._bulk else 0
                return self._urgent.popleft()
            return None  # stopping, and nothing left to do

    def yield_to_urgent(self, conn: sqlite3.Connection) -> int:
        """Run the urgent jobs waiting now, from inside a bulk job, between two of its
        statements; call it only on the worker's thread.

        When some wait, what the bulk job wrote so far is committed first (its
        transaction is begun again after them), so call it only from a job for which a
        part committed early is harmless. Cheap when nothing waits: one length check.

        :return: how many urgent jobs ran.
        """
        if not self._urgent:
            return 0
        in_transaction = conn.in_transaction
        if in_transaction:
            conn.execute("COMMIT")
        ran = 0
        while True:
            with self._ready:
                if not self._urgent or ran >= URGENT_BURST:
                    break
                job, future = self._urgent.popleft()
            ran += 1
            self._run_job(job, future)
        if in_transaction:
            conn.execute("BEGIN IMMEDIATE")
        return ran

    def _run_job(self, job: Job, future: asyncio.Future[Any]) -> None:
        if future.cancelled():  # its caller gave up while it waited
            return
        result: Any = None
        error: BaseException | None = None
        try:
            result = job(self._conn)  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the caller
            error = exc
        # RuntimeError: the loop is closed, so nobody waits any more.
        with contextlib.suppress(RuntimeError):
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_resolve, future, result, error)

    def _serve(self) -> None:
        loop, stopped = self._loop, self._stopped
        assert loop is not None and stopped is not None
        try:
            while (item := self._next()) is not None:
                self._run_job(*item)
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, stopped, None, None)

    async def close(self) -> None:
        """Finish the queued jobs, close the connection and end the thread."""
        if self._stopped is None:
            return
        with self._ready:
            self._stopping = True
            self._ready.notify()
        await asyncio.shield(self._stopped)


def transaction(job: Callable[[sqlite3.Connection], _T]) -> Callable[[sqlite3.Connection], _T]:
    """``job`` inside ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back if it raises."""

    def run(conn: sqlite3.Connection) -> _T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = job(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    return run
