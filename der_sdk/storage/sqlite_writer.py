"""The SQLite backend's telemetry inserts, in a process of their own.

Why a process: the sqlite3 module binds every value under the GIL, and takes the GIL
back after every statement it steps. In the headend the event loop (gRPC, decoding,
REST) holds the GIL much of the time, so the storage thread waited for it: sampled
under load, a third of the thread's busy time was spent waiting to take the GIL back
(docs/performance.md, "The SQLite writer in a process of its own"). A child process has
an interpreter, and a GIL, of its own: it binds and steps while the event loop decodes.

Everything else stays where it was: the storage connection on its thread
(:class:`~der_sdk.sqlite_worker.SQLiteWorker`) still runs every other job, and still
decides the order of jobs. A telemetry write is a bulk job on that thread which hands
the rows to the child and waits (without the GIL) for its answer, so no two writes
overlap and the storage connection holds no transaction meanwhile.

The two talk over pipes in frames (a kind byte, a 4-byte length, a body):

* ``W`` (the samples as msgpack) asks for one write. The child decodes them, makes the
  rows (:func:`der_sdk.storage.sqlite._stored_params`: that work leaves the event loop
  too), and inserts them in one transaction, as
  :func:`der_sdk.storage.sqlite._insert_stored` does on the thread; it answers ``D``
  (rows inserted) or ``E`` (the error's class and message).
* Urgent jobs go first, as on the thread: when one is queued during a write, the
  storage thread writes a byte to a third pipe. Between two statements the child looks
  at that pipe; if a byte came it commits what it has inserted so far, answers ``Y``
  and waits for ``R`` while the storage thread runs the urgent jobs, then begins again.

If the child ends during a write, the write fails with :class:`sqlite3.OperationalError`
(whatever it had not committed is rolled back by SQLite) and the next write starts a new
child; the caller retries the whole write, and rows already stored are skipped as
duplicates, as for any failed write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

__all__ = ["TelemetryWriterProcess"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<cI")
_COUNT = struct.Struct("<q")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _send(fd: int, kind: bytes, body: bytes = b"") -> None:
    # One system call for header and body where the pipe has room: each call lets go of
    # the GIL, and taking it back from a busy event loop is what this process avoids.
    header = _HEADER.pack(kind, len(body))
    sent = os.writev(fd, [header, body]) if body else os.write(fd, header)
    if sent < len(header):
        _write_all(fd, header[sent:])
        sent = len(header)
    if sent - len(header) < len(body):
        _write_all(fd, memoryview(body)[sent - len(header) :])


PIPE_BYTES = 1 << 20
"""The command pipe's buffer (Linux's default limit for ``F_SETPIPE_SZ``): a write of
5,000 rows (about 600 KB) goes into it in one call."""


def _grow_pipe(fd: int) -> None:
    import fcntl  # POSIX only, as is this process (Windows writes on the storage thread)

    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, setpipe, PIPE_BYTES)


def _receive(fd: int) -> tuple[bytes, bytes]:
    kind, size = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return kind, _read_exact(fd, size) if size else b""


def _error(body: bytes) -> Exception:
    name, message = msgspec.msgpack.decode(body)
    cls = getattr(sqlite3, name, None)
    if isinstance(cls, type) and issubclass(cls, sqlite3.Error):
        return cls(message)
    if name in ("ValueError", "ValidationError"):  # a sample the rows refuse
        return ValueError(message)
    if name == "TypeError":
        return TypeError(message)
    return sqlite3.DatabaseError(f"{name}: {message}")


class TelemetryWriterProcess:
    """The child process that inserts telemetry for one SQLite file.

    :meth:`insert` and :meth:`close` run on the storage thread; :meth:`urgent` on any
    thread. Not for ``:memory:`` databases (a child cannot see them).
    """

    def __init__(self, path: str, rows_per_statement: int) -> None:
        self.path = path
        self.rows_per_statement = rows_per_statement
        self._process: subprocess.Popen[bytes] | None = None
        self._commands = -1  # we write, the child reads
        self._replies = -1  # the child writes, we read
        self._urgent = -1  # we write a byte: urgent jobs wait
        self._lock = threading.Lock()
        self._signalled = False

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child and wait until it has opened the database.

        :raises sqlite3.Error: the child could not open it (its error).
        :raises OSError: the child could not be started, or ended at once.
        """
        commands_r, commands_w = os.pipe()
        _grow_pipe(commands_w)
        replies_r, replies_w = os.pipe()
        urgent_r, urgent_w = os.pipe()
        child_fds = (commands_r, replies_w, urgent_r)
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "der_sdk.storage.sqlite_writer",
                    self.path,
                    str(self.rows_per_statement),
                    *(str(fd) for fd in child_fds),
                ],
                pass_fds=child_fds,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (*child_fds, commands_w, replies_r, urgent_w):
                os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        self._process = process
        self._commands, self._replies, self._urgent = commands_w, replies_r, urgent_w
        try:
            kind, body = _receive(self._replies)
        except EOFError:
            self._end()
            raise OSError(
                f"the SQLite telemetry writer for {self.path} ended while starting "
                f"(exit status {process.returncode}); its error is in the log above"
            ) from None
        if kind == b"E":
            self._end()
            raise _error(body)

    def insert(self, samples: bytes, run_urgent: Callable[[], object]) -> int:
        """Insert ``samples`` (msgpack of a list of
        :class:`~der_sdk.models.TelemetrySample`) in the child; ``run_urgent`` runs the
        urgent jobs waiting while the child has paused.

        :return: how many rows were inserted (the rest were stored already).
        :raises sqlite3.Error: the child's error, or ``OperationalError`` if it ended.
        """
        if self._process is None:
            self.start()
        try:
            _send(self._commands, b"W", samples)
            while True:
                kind, body = _receive(self._replies)
                if kind == b"D":
                    count: int = _COUNT.unpack(body)[0]
                    return count
                if kind == b"Y":
                    with self._lock:
                        self._signalled = False
                    run_urgent()
                    _send(self._commands, b"R")
                elif kind == b"E":
                    raise _error(body)
                else:
                    raise OSError(f"unexpected frame {kind!r} from the telemetry writer")
        except (EOFError, OSError) as exc:
            status = self._end()
            raise sqlite3.OperationalError(
                f"the SQLite telemetry writer for {self.path} ended during a write "
                f"(exit status {status}; {exc}); what it had not committed is rolled back, "
                "and the next write starts a new one"
            ) from exc

    def urgent(self) -> None:
        """An urgent job waits: ask the write in progress, or the next one, to pause at
        its next statement. (Asked between two writes, the next write pauses once after
        its first statement for nothing: cheaper than a race with a write starting.)"""
        with self._lock:
            if self._signalled or self._urgent < 0:
                return
            self._signalled = True
            with contextlib.suppress(OSError):
                os.write(self._urgent, b"u")

    def _end(self) -> int | None:
        """Close the pipes and reap the child (killed if it does not end by itself)."""
        with self._lock:
            fds = (self._commands, self._replies, self._urgent)
            self._commands = self._replies = self._urgent = -1
            self._signalled = False
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        process, self._process = self._process, None
        if process is None:
            return None
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("SQLite telemetry writer %s did not end; killing it", process.pid)
            process.kill()
            return process.wait()

    def close(self) -> None:
        """End the child: it sees the command pipe close, and exits."""
        self._end()


# --------------------------------------------------------------------------- the child


def _serve(path: str, rows_per_statement: int, commands: int, replies: int, urgent: int) -> None:
    # Imported here: the parent only needs the frames above.
    from der_sdk.models import TelemetrySample
    from der_sdk.storage import sqlite as backend

    backend.ROWS_PER_STATEMENT = rows_per_statement  # the parent's setting
    # The sample's fields, checked no more than the storage thread checks them (it is
    # handed samples, not validated data): only the time stamp must decode to a datetime.
    loose = msgspec.defstruct(
        "StoredSample",
        [(name, datetime if name == "ts" else Any) for name in TelemetrySample.__struct_fields__],
        gc=False,
    )
    decode_samples = msgspec.msgpack.Decoder(list[loose]).decode  # type: ignore[valid-type]

    # Ctrl-C reaches the whole process group: the headend stops this child by closing
    # the command pipe once its writes are done, so the child must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_blocking(urgent, False)
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(f"PRAGMA cache_size=-{backend.CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint={backend.WAL_CHECKPOINT_PAGES}")
    except sqlite3.Error as exc:
        _send(replies, b"E", msgspec.msgpack.encode([type(exc).__name__, str(exc)]))
        return
    _send(replies, b"O")

    def between(conn: sqlite3.Connection) -> None:
        try:
            asked = os.read(urgent, 64)
        except BlockingIOError:
            return
        if not asked:
            return
        conn.execute("COMMIT")
        _send(replies, b"Y")
        kind, _ = _receive(commands)
        if kind != b"R":
            raise OSError(f"expected R from the headend, got {kind!r}")
        conn.execute("BEGIN IMMEDIATE")

    while True:
        try:
            kind, body = _receive(commands)
        except EOFError:
            break  # the parent closed the pipe (or ended): so do we
        if kind != b"W":
            raise OSError(f"unexpected frame {kind!r} from the headend")
        try:
            params = backend._stored_params(decode_samples(body))
            conn.execute("BEGIN IMMEDIATE")
            try:
                count = backend._insert_stored(conn, params, between)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:  # the write's own error, for the caller: this child goes on
            _send(replies, b"E", msgspec.msgpack.encode([type(exc).__name__, str(exc)]))
        else:
            _send(replies, b"D", _COUNT.pack(count))
    conn.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m der_sdk.storage.sqlite_writer PATH ROWS COMMANDS REPLIES URGENT``: the
    child's side (ROWS per statement; the last three are inherited pipe descriptors)."""
    path, *numbers = argv if argv is not None else sys.argv[1:]
    rows, commands, replies, urgent = (int(n) for n in numbers)
    # BrokenPipeError, EOFError: the headend went away mid-write; SQLite rolls back what
    # was not committed.
    with contextlib.suppress(BrokenPipeError, EOFError):
        _serve(path, rows, commands, replies, urgent)


if __name__ == "__main__":
    main()
