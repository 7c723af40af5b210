"""The command journal: each headend command's outcome, and where each setpoint in force
came from.

Its tables in the buffer file (:mod:`.file`):

* ``outcomes`` — one row per headend command id, ``acked`` when received and then its
  final outcome, reported until the headend acknowledges it (``SetpointOutcomeAck``);
* ``in_force`` — per asset, where its setpoint in force came from (``headend``, ``local``,
  ``fallback`` or ``default``), for the link-loss fallback after a restart.

A command is committed as ``acked`` before any device is touched, so a command id in the
journal is never applied again. A row still ``acked`` when the file opens (the agent died
while applying it) becomes ``failed`` with :data:`RESTARTED_REASON`. Rows are pruned once
older than :data:`JOURNAL_KEEP_S` *and* beyond the newest :data:`JOURNAL_KEEP_ROWS`; the
telemetry bounds never touch them. The unreported command ids and the in-force table are
mirrored on the loop.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from der_sdk.wire import codec
from der_sdk.wire.codec import Allocation
from der_sdk_agent.store.file import BufferFile, Loaded, Store, us

__all__ = [
    "FINAL_STATUSES",
    "JOURNAL_KEEP_ROWS",
    "JOURNAL_KEEP_S",
    "RESTARTED_REASON",
    "CommandJournal",
    "JournalEntry",
]

log = logging.getLogger("der.agent.buffer")

JOURNAL_KEEP_S = 7 * 24 * 3600.0
JOURNAL_KEEP_ROWS = 10_000
JOURNAL_PRUNE_EVERY_S = 3600.0
FINAL_STATUSES = frozenset({"applied", "rejected", "failed", "expired"})
RESTARTED_REASON = "agent restarted before the outcome was known; not applied again"

_allocations_decode = msgspec.json.Decoder(tuple[Allocation, ...]).decode
_json_encode = msgspec.json.Encoder().encode

_COLUMNS = (
    "command_id, status, received_us, final_us, reason, allocations, reported, "
    "asset_id, site_id, mw, duration_s"
)


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """One headend command in the dispatch journal.

    ``status`` is ``acked`` (received, not yet finished) or a final status in
    :data:`FINAL_STATUSES`. ``ts`` is when it reached that status. ``reported``: the headend
    acknowledged the final outcome (``SetpointOutcomeAck``).
    """

    command_id: str
    status: str
    ts: datetime
    received: datetime
    reason: str | None = None
    allocations: tuple[Allocation, ...] = ()
    reported: bool = False
    asset_id: str | None = None
    site_id: str | None = None
    mw: float = 0.0
    duration_s: float | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


class CommandJournal(Store):
    """The dispatch journal and the setpoints in force (see the module docstring).

    :param file: the buffer file it is kept in.
    :param clock: wall clock in seconds since the epoch (tests pass a fake one).
    """

    def __init__(self, file: BufferFile, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(file)
        self._clock = clock
        self._unreported: set[str] = set()
        self._in_force: dict[str, str] = {}
        self._last_prune = -math.inf

    # ------------------------------------------------------------------ outcomes

    @property
    def unreported_count(self) -> int:
        """Final outcomes the headend has not acknowledged yet."""
        return len(self._unreported)

    async def receive(
        self,
        command_id: str,
        *,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None,
    ) -> tuple[JournalEntry, bool]:
        """Record a headend command as ``acked`` and commit, unless it is known.

        :return: the command's journal entry, and whether it is new (now recorded as
            ``acked``: go ahead and apply it). Not new: do **not** apply it again.
        """
        await self.file.ready()
        now_us = us(self._clock())

        def receive(conn: sqlite3.Connection) -> tuple[JournalEntry, bool]:
            existing = _get(conn, command_id)
            if existing is not None:
                return existing, False
            conn.execute(
                "INSERT INTO outcomes (command_id, received_us, asset_id, site_id, mw, "
                "duration_s, status) VALUES (?, ?, ?, ?, ?, ?, 'acked')",
                (command_id, now_us, asset_id, site_id, mw, duration_s),
            )
            return JournalEntry(
                command_id=command_id,
                status="acked",
                ts=codec.datetime_from_us(now_us),
                received=codec.datetime_from_us(now_us),
                asset_id=asset_id,
                site_id=site_id,
                mw=mw,
                duration_s=duration_s,
            ), True

        return await self.file.write(receive)

    async def finish(
        self,
        command_id: str,
        status: str,
        allocations: Sequence[Allocation] = (),
        reason: str | None = None,
    ) -> JournalEntry:
        """Record a command's final outcome (unreported until :meth:`mark_reported`)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final status")
        await self.file.ready()
        now_us = us(self._clock())
        encoded = _json_encode(tuple(allocations))

        def finish(conn: sqlite3.Connection) -> JournalEntry:
            conn.execute(
                "UPDATE outcomes SET status = ?, final_us = ?, allocations = ?, reason = ?, "
                "reported = 0 WHERE command_id = ?",
                (status, now_us, encoded, reason, command_id),
            )
            entry = _get(conn, command_id)
            if entry is None:
                raise KeyError(f"command {command_id} is not in the dispatch journal")
            return entry

        entry = await self.file.write(finish)
        self._unreported.add(command_id)
        return entry

    async def get(self, command_id: str) -> JournalEntry | None:
        await self.file.ready()
        return await self.file.run(lambda conn: _get(conn, command_id))

    async def mark_reported(self, command_id: str) -> None:
        """The headend recorded the final outcome (``SetpointOutcomeAck``)."""
        await self.file.ready()

        def mark(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE outcomes SET reported = 1 WHERE command_id = ? AND status != 'acked'",
                (command_id,),
            )
            return cursor.rowcount > 0

        if await self.file.write(mark):
            self._unreported.discard(command_id)

    async def unreported(self) -> list[JournalEntry]:
        """Final outcomes not acknowledged yet, oldest first."""
        await self.file.ready()

        def unreported(conn: sqlite3.Connection) -> list[JournalEntry]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM outcomes WHERE status != 'acked' AND reported = 0 "
                "ORDER BY final_us, received_us"
            )
            return [_entry(row) for row in rows]

        return await self.file.run(unreported)

    async def maintain(self) -> None:
        """Periodic upkeep (the agent calls it every minute): prune the journal, at most
        once an hour."""
        await self.file.ready()
        now = time.monotonic()
        if now - self._last_prune < JOURNAL_PRUNE_EVERY_S:
            return
        self._last_prune = now
        cutoff_us, keep_rows = us(self._clock() - JOURNAL_KEEP_S), JOURNAL_KEEP_ROWS

        def prune(conn: sqlite3.Connection) -> list[str]:
            doomed = [
                (row[0], row[1])
                for row in conn.execute(
                    "SELECT command_id, reported FROM outcomes WHERE status != 'acked' "
                    "AND received_us < ? AND command_id NOT IN (SELECT command_id FROM "
                    "outcomes ORDER BY received_us DESC LIMIT ?)",
                    (cutoff_us, keep_rows),
                )
            ]
            conn.executemany("DELETE FROM outcomes WHERE command_id = ?", [(c,) for c, _ in doomed])
            unreported = [c for c, reported in doomed if not reported]
            if unreported:
                log.warning(
                    "dispatch journal: forgot %d outcome(s) the headend never acknowledged "
                    "in 7 days",
                    len(unreported),
                )
            return [c for c, _ in doomed]

        pruned = await self.file.write(prune)
        for command_id in pruned:
            self._unreported.discard(command_id)
        if pruned:
            log.info("dispatch journal: pruned %d command(s) older than 7 days", len(pruned))

    # ------------------------------------------------------------------ setpoints in force

    @property
    def in_force(self) -> Mapping[str, str]:
        """Per asset id, where its setpoint in force came from: ``headend``, ``local``,
        ``fallback`` or ``default`` (absent: not commanded since the file was created)."""
        return dict(self._in_force)

    async def set_in_force(self, asset_id: str, source: str, command_id: str | None) -> None:
        await self.file.ready()
        row = (asset_id, source, command_id, us(self._clock()))
        await self.file.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO in_force (asset_id, source, command_id, ts_us) "
                "VALUES (?, ?, ?, ?)",
                row,
            )
        )
        self._in_force[asset_id] = source

    # ------------------------------------------------------------------ the file's calls

    def loader(self) -> Callable[[sqlite3.Connection], Loaded]:
        now_us = us(self._clock())

        def load(conn: sqlite3.Connection) -> Loaded:
            recovered = [
                row[0]
                for row in conn.execute("SELECT command_id FROM outcomes WHERE status = 'acked'")
            ]
            conn.execute(
                "UPDATE outcomes SET status = 'failed', reason = ?, final_us = ?, reported = 0 "
                "WHERE status = 'acked'",
                (RESTARTED_REASON, now_us),
            )
            unreported = [
                row[0]
                for row in conn.execute(
                    "SELECT command_id FROM outcomes WHERE status != 'acked' AND reported = 0"
                )
            ]
            in_force = dict(conn.execute("SELECT asset_id, source FROM in_force").fetchall())
            return lambda: self._loaded(recovered, unreported, in_force)

        return load

    def _loaded(
        self, recovered: list[str], unreported: list[str], in_force: dict[str, str]
    ) -> None:
        self._unreported.update(unreported)
        self._in_force.update(in_force)
        for command_id in recovered:
            log.warning(
                "command %s was being applied when the agent stopped; recorded as failed "
                "and not applied again",
                command_id,
            )

    async def after_open(self) -> None:
        await self.maintain()


def _get(conn: sqlite3.Connection, command_id: str) -> JournalEntry | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM outcomes WHERE command_id = ?", (command_id,)
    ).fetchone()
    return _entry(row) if row else None


def _entry(row: Iterable[Any]) -> JournalEntry:
    (
        command_id,
        status,
        received_us,
        final_us,
        reason,
        allocations,
        reported,
        asset_id,
        site_id,
        mw,
        duration_s,
    ) = row
    return JournalEntry(
        command_id=command_id,
        status=status,
        ts=codec.datetime_from_us(final_us if final_us is not None else received_us),
        received=codec.datetime_from_us(received_us),
        reason=reason,
        allocations=_allocations_decode(allocations),
        reported=bool(reported),
        asset_id=asset_id,
        site_id=site_id,
        mw=mw,
        duration_s=duration_s,
    )
