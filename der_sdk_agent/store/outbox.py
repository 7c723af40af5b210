"""The outbox: records for the headend's history, kept until it acknowledges each one.

Two kinds, each a :class:`OutboxQueue` with its own table in the buffer file
(:mod:`.file`):

* ``events`` — :class:`~der_sdk.wire.codec.AgentEventRecord` (``EventAck``);
* ``local_reports`` — reports of local commands,
  :class:`~der_sdk.wire.codec.LocalDispatchReport` (``LocalDispatchAck``).

A record gets a position ``n`` when it is committed; positions only grow, so the link
sends what is new on a stream by asking for the records after the last one it sent. The
count and the newest position are mirrored on the loop; the records themselves are read
from the file a page (:data:`PAGE`) at a time. The telemetry bounds never drop them.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec

from der_sdk.wire import codec
from der_sdk.wire.codec import AgentEventRecord, LocalDispatchReport
from der_sdk_agent.store.file import BufferFile, Loaded, Store, us

__all__ = ["PAGE", "Outbox", "OutboxQueue"]

R = TypeVar("R")

PAGE = 100
"""Records read from the file at once."""

_json_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class _Table(Generic[R]):
    """Where a kind of record lives: its table, its key and record columns."""

    name: str
    key: str
    column: str
    key_of: Callable[[R], str]
    created_us: Callable[[R, int], int]  # (record, now) -> the row's created_us
    decode: Callable[[bytes], R]


_EVENTS = _Table[AgentEventRecord](
    name="events",
    key="event_id",
    column="record",
    key_of=lambda event: event.event_id,
    created_us=lambda event, _: codec.datetime_to_us(event.ts),
    decode=msgspec.json.Decoder(AgentEventRecord).decode,
)
_LOCAL_REPORTS = _Table[LocalDispatchReport](
    name="local_reports",
    key="command_id",
    column="report",
    key_of=lambda report: report.command_id,
    created_us=lambda _, now_us: now_us,
    decode=msgspec.json.Decoder(LocalDispatchReport).decode,
)


class OutboxQueue(Store, Generic[R]):
    """One kind of record waiting for the headend's acknowledgement."""

    PAGE = PAGE

    def __init__(
        self,
        file: BufferFile,
        table: _Table[R],
        *,
        clock: Callable[[], float],
        notify: Callable[[], None],
    ) -> None:
        super().__init__(file)
        self._table = table
        self._clock = clock
        self._notify = notify
        self._count = 0
        self._last_n = 0

    @property
    def count(self) -> int:
        """Records not acknowledged yet."""
        return self._count

    @property
    def last_n(self) -> int:
        """The position of the newest record (positions only grow; see :meth:`after`)."""
        return self._last_n

    async def add(self, record: R) -> None:
        """Commit ``record``; it is kept until acknowledged."""
        await self.file.ready()
        now_us = us(self._clock())
        self.added(await self.file.write(lambda conn: self.insert(conn, record, now_us)))

    def insert(self, conn: sqlite3.Connection, record: R, now_us: int) -> int:
        """On the file's thread, inside a transaction (another store's too): add
        ``record``; returns its position. Call :meth:`added` with it once committed."""
        table = self._table
        created_us = table.created_us(record, now_us)
        cursor = conn.execute(
            f"INSERT INTO {table.name} ({table.key}, created_us, {table.column}) VALUES (?, ?, ?)",
            (table.key_of(record), created_us, _json_encode(record)),
        )
        return int(cursor.lastrowid or 0)

    def added(self, n: int | None) -> None:
        """Record ``n`` was committed (``None``: nothing was)."""
        if n is not None:
            self._count += 1
            self._last_n = max(self._last_n, n)
            self._notify()

    async def after(self, n: int = 0, limit: int = PAGE) -> list[tuple[int, R]]:
        """Up to ``limit`` unacknowledged records after position ``n``, oldest first, each
        with its position."""
        await self.file.ready()
        table = self._table
        rows = await self.file.run(
            lambda conn: conn.execute(
                f"SELECT n, {table.column} FROM {table.name} WHERE n > ? ORDER BY n LIMIT ?",
                (n, limit),
            ).fetchall()
        )
        return [(int(position), table.decode(bytes(blob))) for position, blob in rows]

    async def all(self) -> list[R]:
        """Every unacknowledged record, oldest first."""
        return [record for _, record in await self.after(0, max(self._count, 1))]

    async def ack(self, key: str) -> None:
        """The headend recorded the record with this event id or command id."""
        await self.file.ready()
        table = self._table
        deleted: int = await self.file.write(
            lambda conn: (
                conn.execute(f"DELETE FROM {table.name} WHERE {table.key} = ?", (key,)).rowcount
            )
        )
        # Not ``self._count -= await …``: that reads the count before the await and would
        # lose a record added meanwhile.
        self._count -= deleted

    def loader(self) -> Callable[[sqlite3.Connection], Loaded]:
        name = self._table.name

        def load(conn: sqlite3.Connection) -> Loaded:
            count, last_n = conn.execute(
                f"SELECT count(*), coalesce(max(n), 0) FROM {name}"
            ).fetchone()
            return lambda: self._loaded(count, last_n)

        return load

    def _loaded(self, count: int, last_n: int) -> None:
        self._count, self._last_n = count, last_n


class Outbox:
    """The agent's events and local command reports (see the module docstring).

    :param file: the buffer file they are kept in.
    :param clock: wall clock in seconds since the epoch (tests pass a fake one).
    """

    def __init__(self, file: BufferFile, *, clock: Callable[[], float] = time.time) -> None:
        self.file = file
        self._clock = clock
        self._listeners: list[Callable[[], None]] = []
        self.events = OutboxQueue(file, _EVENTS, clock=clock, notify=self._notify)
        self.local_reports = OutboxQueue(file, _LOCAL_REPORTS, clock=clock, notify=self._notify)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously) after an event or local report is added."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    async def add_event(
        self,
        kind: str,
        message: str,
        *,
        asset_id: str | None = None,
        data: Mapping[str, Any] | None = None,
        ts: datetime | None = None,
    ) -> AgentEventRecord:
        """Commit an event for the headend's record; it is kept until acknowledged.

        :param ts: when it happened (aware); default: now, by the outbox's clock.
        """
        await self.file.ready()
        event = AgentEventRecord(
            event_id=str(uuid.uuid4()),
            ts=ts if ts is not None else datetime.fromtimestamp(self._clock(), UTC),
            kind=kind,
            message=message,
            asset_id=asset_id,
            data=dict(data or {}),
        )
        await self.events.add(event)
        return event
