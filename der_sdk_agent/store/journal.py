"""The command journal: each headend command's outcome, and where each setpoint in force
came from.

Its tables in the buffer file (:mod:`.file`):

* ``outcomes`` — one row per headend command id, ``acked`` when received and then its
  final outcome, reported until the headend acknowledges it (``SetpointOutcomeAck``);
* ``schedules`` — each schedule command (a ``Setpoint`` with ``start_at``): its steps, the
  first step not begun yet (``next_step``) and where a newer command cut it. Its row in
  ``outcomes`` is ``scheduled``, then ``active`` once a step began, then final
  (``completed``, ``cancelled``, ``superseded``, ``rejected``, ``failed``); each step has
  its own ``outcomes`` row, ``"<command_id>#<index>"``, ``acked`` while it is applied and
  then final (or ``skipped``), reported like any outcome;
* ``in_force`` — per asset, where its setpoint in force came from (``headend``,
  ``schedule``, ``local``, ``fallback`` or ``default``), for the link-loss fallback after
  a restart.

A step is begun (``next_step`` moved past it and its row written as ``acked``) in one
transaction before the device is written, so a step is written at most once, across
restarts; a step row still ``acked`` at open is ``failed`` like any command.

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
    "Schedule",
    "step_key",
]

log = logging.getLogger("der.agent.buffer")

JOURNAL_KEEP_S = 7 * 24 * 3600.0
JOURNAL_KEEP_ROWS = 10_000
JOURNAL_PRUNE_EVERY_S = 3600.0
FINAL_STATUSES = frozenset(
    {
        "applied",
        "rejected",
        "failed",
        "expired",
        "completed",
        "cancelled",
        "superseded",
        "skipped",
    }
)
_FINAL_SQL = "status IN ({})".format(", ".join(f"'{s}'" for s in sorted(FINAL_STATUSES)))
RESTARTED_REASON = "agent restarted before the outcome was known; not applied again"

_allocations_decode = msgspec.json.Decoder(tuple[Allocation, ...]).decode
_json_encode = msgspec.json.Encoder().encode

_COLUMNS = (
    "command_id, status, received_us, final_us, reason, allocations, reported, "
    "asset_id, site_id, mw, duration_s, superseded_by"
)
_DONE = 1_000_000
"""``next_step`` of a finished schedule: past any step and its end."""
_steps_decode = msgspec.json.Decoder(tuple[tuple[float, float], ...]).decode


def step_key(command_id: str, index: int) -> str:
    """The journal's key of step ``index`` of the schedule ``command_id``."""
    return f"{command_id}#{index}"


def split_step_key(key: str) -> tuple[str, int | None]:
    """``(command_id, step)`` of a journal key; ``step`` is ``None`` for a command."""
    command_id, sep, index = key.rpartition("#")
    if sep and index.isdigit():
        return command_id, int(index)
    return key, None


@dataclass(kw_only=True)
class Schedule:
    """A schedule the agent runs (times in wall-clock seconds since the epoch).

    ``next_step`` is the first step not begun; ``len(steps)``: every step begun (the end,
    if it has a ``duration_s``, is next); more: done. ``cut``: stop there (``cut_by``, a
    newer command, starts then).
    """

    command_id: str
    asset_id: str | None
    site_id: str | None
    start: float
    steps: tuple[tuple[float, float], ...]
    duration_s: float | None
    next_step: int = 0
    cut: float | None = None
    cut_by: str | None = None

    def step_at(self, index: int) -> float:
        return self.start + self.steps[index][0]

    @property
    def end(self) -> float | None:
        return None if self.duration_s is None else self.start + self.duration_s


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
    superseded_by: str | None = None

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
        self._schedules: dict[str, Schedule] = {}
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
        *,
        superseded_by: str | None = None,
    ) -> JournalEntry:
        """Record a command's final outcome (unreported until :meth:`mark_reported`); for
        a schedule, it is done (no step of it runs any more)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final status")
        await self.file.ready()
        now_us = us(self._clock())
        encoded = _json_encode(tuple(allocations))

        def finish(conn: sqlite3.Connection) -> JournalEntry:
            conn.execute(
                "UPDATE outcomes SET status = ?, final_us = ?, allocations = ?, reason = ?, "
                "reported = 0, superseded_by = ? WHERE command_id = ?",
                (status, now_us, encoded, reason, superseded_by, command_id),
            )
            conn.execute(
                "UPDATE schedules SET next_step = ? WHERE command_id = ?",
                (_DONE, command_id),
            )
            entry = _get(conn, command_id)
            if entry is None:
                raise KeyError(f"command {command_id} is not in the dispatch journal")
            return entry

        entry = await self.file.write(finish)
        self._unreported.add(command_id)
        self._schedules.pop(command_id, None)
        return entry

    # ------------------------------------------------------------------ schedules

    @property
    def schedules(self) -> list[Schedule]:
        """The schedules not finished yet (in memory; change them only through here)."""
        return list(self._schedules.values())

    async def schedule(
        self,
        command_id: str,
        *,
        asset_id: str | None,
        site_id: str | None,
        start: float,
        steps: Sequence[tuple[float, float]],
        duration_s: float | None,
    ) -> tuple[JournalEntry, bool]:
        """Record a schedule command as ``scheduled`` and commit, unless it is known.

        :return: its journal entry, and whether it is new (not new: nothing changes).
        """
        await self.file.ready()
        now_us = us(self._clock())
        steps = tuple((float(o), float(m)) for o, m in steps)

        def schedule(conn: sqlite3.Connection) -> tuple[JournalEntry, bool]:
            existing = _get(conn, command_id)
            if existing is not None:
                return existing, False
            conn.execute(
                "INSERT INTO outcomes (command_id, received_us, asset_id, site_id, mw, "
                "duration_s, status) VALUES (?, ?, ?, ?, ?, ?, 'scheduled')",
                (command_id, now_us, asset_id, site_id, steps[0][1], duration_s),
            )
            conn.execute(
                "INSERT INTO schedules (command_id, asset_id, site_id, start_us, steps, "
                "duration_s) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    command_id,
                    asset_id,
                    site_id,
                    us(start),
                    _json_encode(steps).decode(),
                    duration_s,
                ),
            )
            entry = _get(conn, command_id)
            assert entry is not None
            return entry, True

        entry, new = await self.file.write(schedule)
        if new:
            self._schedules[command_id] = Schedule(
                command_id=command_id,
                asset_id=asset_id,
                site_id=site_id,
                start=start,
                steps=steps,
                duration_s=duration_s,
            )
        return entry, new

    async def begin_step(self, command_id: str, index: int) -> bool:
        """Begin step ``index`` of a schedule (``len(steps)``: its end), committed before
        the device is touched: ``next_step`` moves past it, the step's row is ``acked``
        and the schedule ``active``.

        :return: ``False`` when the step was begun before (do **not** write it again).
        """
        await self.file.ready()
        now_us = us(self._clock())
        schedule = self._schedules.get(command_id)
        if schedule is None:  # finished meanwhile (cancelled, superseded)
            return False
        steps = schedule.steps

        def begin(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT next_step FROM schedules WHERE command_id = ?", (command_id,)
            ).fetchone()
            if row is None or row[0] > index:
                return False
            conn.execute(
                "UPDATE schedules SET next_step = ? WHERE command_id = ?", (index + 1, command_id)
            )
            if index < len(steps):
                conn.execute(
                    "INSERT OR IGNORE INTO outcomes (command_id, received_us, asset_id, "
                    "site_id, mw, status) VALUES (?, ?, ?, ?, ?, 'acked')",
                    (
                        step_key(command_id, index),
                        now_us,
                        schedule.asset_id,
                        schedule.site_id,
                        steps[index][1],
                    ),
                )
            conn.execute(
                "UPDATE outcomes SET status = 'active' WHERE command_id = ? "
                "AND status = 'scheduled'",
                (command_id,),
            )
            return True

        begun = await self.file.write(begin)
        schedule.next_step = max(schedule.next_step, index + 1)
        return begun

    async def skip_steps(
        self, command_id: str, indexes: Sequence[int], reason: str
    ) -> list[JournalEntry]:
        """Record steps whose time passed before they could run as ``skipped`` (never
        run late); ``next_step`` moves past them."""
        if not indexes:
            return []
        await self.file.ready()
        now_us = us(self._clock())
        schedule = self._schedules.get(command_id)
        if schedule is None:
            return []

        def skip(conn: sqlite3.Connection) -> list[JournalEntry]:
            entries = []
            for index in indexes:
                key = step_key(command_id, index)
                conn.execute(
                    "INSERT OR IGNORE INTO outcomes (command_id, received_us, asset_id, "
                    "site_id, mw, status, final_us, reason) "
                    "VALUES (?, ?, ?, ?, ?, 'skipped', ?, ?)",
                    (
                        key,
                        now_us,
                        schedule.asset_id,
                        schedule.site_id,
                        schedule.steps[index][1],
                        now_us,
                        reason,
                    ),
                )
                entry = _get(conn, key)
                if entry is not None:
                    entries.append(entry)
            conn.execute(
                "UPDATE schedules SET next_step = MAX(next_step, ?) WHERE command_id = ?",
                (max(indexes) + 1, command_id),
            )
            return entries

        entries = await self.file.write(skip)
        schedule.next_step = max(schedule.next_step, max(indexes) + 1)
        self._unreported.update(e.command_id for e in entries)
        return entries

    async def cut(self, command_id: str, at: float, by: str) -> None:
        """Stop the schedule ``command_id`` at ``at`` (wall clock): ``by`` starts then."""
        await self.file.ready()
        schedule = self._schedules.get(command_id)
        if schedule is None or (schedule.cut is not None and schedule.cut <= at):
            return
        await self.file.write(
            lambda conn: conn.execute(
                "UPDATE schedules SET cut_us = ?, cut_by = ? WHERE command_id = ?",
                (us(at), by, command_id),
            )
        )
        schedule.cut, schedule.cut_by = at, by

    async def get(self, command_id: str) -> JournalEntry | None:
        await self.file.ready()
        return await self.file.run(lambda conn: _get(conn, command_id))

    async def mark_reported(self, command_id: str) -> None:
        """The headend recorded the final outcome (``SetpointOutcomeAck``)."""
        await self.file.ready()

        def mark(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                f"UPDATE outcomes SET reported = 1 WHERE command_id = ? AND {_FINAL_SQL}",
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
                f"SELECT {_COLUMNS} FROM outcomes WHERE {_FINAL_SQL} AND reported = 0 "
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
                    f"SELECT command_id, reported FROM outcomes WHERE {_FINAL_SQL} "
                    "AND received_us < ? AND command_id NOT IN (SELECT command_id FROM "
                    "outcomes ORDER BY received_us DESC LIMIT ?)",
                    (cutoff_us, keep_rows),
                )
            ]
            conn.executemany("DELETE FROM outcomes WHERE command_id = ?", [(c,) for c, _ in doomed])
            conn.execute(
                "DELETE FROM schedules WHERE command_id NOT IN (SELECT command_id FROM outcomes)"
            )
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
            columns = {row[1] for row in conn.execute("PRAGMA table_info(outcomes)")}
            if "superseded_by" not in columns:  # a file from before schedules
                conn.execute("ALTER TABLE outcomes ADD COLUMN superseded_by TEXT")
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
                    f"SELECT command_id FROM outcomes WHERE {_FINAL_SQL} AND reported = 0"
                )
            ]
            in_force = dict(conn.execute("SELECT asset_id, source FROM in_force").fetchall())
            schedules = [
                Schedule(
                    command_id=row[0],
                    asset_id=row[1],
                    site_id=row[2],
                    start=row[3] / 1e6,
                    steps=_steps_decode(row[4]),
                    duration_s=row[5],
                    next_step=row[6],
                    cut=row[7] / 1e6 if row[7] is not None else None,
                    cut_by=row[8],
                )
                for row in conn.execute(
                    "SELECT s.command_id, s.asset_id, s.site_id, s.start_us, s.steps, "
                    "s.duration_s, s.next_step, s.cut_us, s.cut_by FROM schedules AS s "
                    "JOIN outcomes AS o ON o.command_id = s.command_id "
                    "WHERE o.status IN ('scheduled', 'active') ORDER BY o.received_us"
                )
            ]
            return lambda: self._loaded(recovered, unreported, in_force, schedules)

        return load

    def _loaded(
        self,
        recovered: list[str],
        unreported: list[str],
        in_force: dict[str, str],
        schedules: list[Schedule],
    ) -> None:
        self._unreported.update(unreported)
        self._in_force.update(in_force)
        self._schedules.update((s.command_id, s) for s in schedules)
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
        superseded_by,
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
        superseded_by=superseded_by,
    )
