"""Schedules: headend commands with a start time and steps, run by the agent's own clock.

The headend sends a schedule ahead of its start (``Setpoint.start_at_us`` and ``steps``);
the agent keeps it in its journal (:class:`~der_sdk_agent.store.journal.CommandJournal`)
and runs it whether or not the link is up. The rules (``docs/dispatch.md`` has the
operator's version):

* **Clock bound.** The agent measures its clock offset from the headend's (the link,
  from the time stamps on the headend's messages). A schedule that arrives while the
  offset is larger than ``clock_offset_max_s`` is refused (``rejected``, with the offset
  in the reason): its steps would run at the wrong time.
* **Steps.** Step ``i`` is due at ``start + offset_s``; each is begun in the journal
  (committed) before the device is written, so it is written at most once, across
  restarts. A step whose time passed while it could not run (the agent was down) is
  ``skipped`` once the next step is due: only the step in force now runs, late; no past
  step is replayed.
* **End.** With ``duration_s``, the assets return to their default (0 MW, or the value
  nearest 0 their limits allow) at ``start + duration_s``, then the schedule is
  ``completed``; without it, it is ``completed`` once its last step ran, which stays in
  force.
* **Supersede.** A newer command for an asset of a schedule (received later) cuts the
  schedule at the newer's start: it ends ``superseded`` then (at once if it had not
  started by then), naming the newer command. A schedule that ends before the newer
  starts, or starts after a newer schedule ends, is left alone.
* **Cancel.** A cancel command stops the schedule (``cancelled``) and, if one of its steps
  ran, returns its assets to their default; the cancel command itself is acknowledged
  like any command, with what it applied. A cancel for a command the agent has not seen
  records that command as ``cancelled``, so it never runs if it arrives later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from der_sdk.models import Allocation
from der_sdk_agent.store.journal import CommandJournal, JournalEntry, Schedule, step_key

if TYPE_CHECKING:
    from der_sdk_agent.dispatch import Dispatcher

__all__ = ["DEFAULT_CLOCK_OFFSET_MAX_S", "CancelResult", "ScheduleRunner"]

log = logging.getLogger("der.agent.schedule")

DEFAULT_CLOCK_OFFSET_MAX_S = 2.0
_MAX_WAIT_S = 1.0
"""The runner looks at the clock at least this often (a wall clock that jumps)."""

Send = Callable[[JournalEntry], None]


@dataclass(frozen=True, kw_only=True)
class CancelResult:
    """What a cancel command did: ``status`` (``applied`` or ``rejected``), ``revert``
    (a step of the schedule ran: return its assets to their default) and a reason."""

    status: str
    revert: bool = False
    reason: str | None = None
    asset_id: str | None = None
    site_id: str | None = None


class ScheduleRunner:
    """Runs the journal's schedules by the agent's wall clock (see the module docstring).

    :param dispatcher: applies each step (:meth:`~der_sdk_agent.dispatch.Dispatcher.handle`).
    :param clock: the agent's wall clock, seconds since the epoch.
    :param clock_offset: the measured offset from the headend's clock (headend minus
        agent), ``None`` while not measured.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        journal: CommandJournal,
        *,
        clock: Callable[[], float] = time.time,
        clock_offset: Callable[[], float | None] = lambda: None,
        clock_offset_max_s: float = DEFAULT_CLOCK_OFFSET_MAX_S,
    ) -> None:
        self._dispatcher = dispatcher
        self.journal = journal
        self.clock = clock
        self.clock_offset = clock_offset
        self.clock_offset_max_s = clock_offset_max_s
        self._send: Send = _nowhere
        self._wake = asyncio.Event()
        self._writing: set[str] = set()
        """Schedules with a step being begun or written now (a cancel then reverts)."""

    # ------------------------------------------------------------------ commands

    def refusal(self) -> str | None:
        """Why a schedule cannot be accepted now (the clock offset), or ``None``."""
        offset = self.clock_offset()
        if offset is None or abs(offset) <= self.clock_offset_max_s:
            return None
        return (
            f"the agent's clock is {abs(offset):.3f} s {'behind' if offset > 0 else 'ahead of'} "
            f"the headend's, more than the bound of {self.clock_offset_max_s:g} s "
            "(clock_offset_max_s, AGENT_CLOCK_OFFSET_MAX_S): the schedule would not run on "
            "time; fix the agent's time (NTP) and send it again"
        )

    async def accept(
        self,
        command_id: str,
        *,
        asset_id: str | None,
        site_id: str | None,
        start: float,
        steps: tuple[tuple[float, float], ...],
        duration_s: float | None,
        send: Send,
    ) -> JournalEntry:
        """Take a schedule into the journal (or refuse it) and acknowledge it."""
        why = self.refusal()
        if why is None and not steps:
            why = "the schedule has no steps"
        if why is not None:
            entry, new = await self.journal.receive(
                command_id, asset_id=asset_id, site_id=site_id, mw=0.0, duration_s=duration_s
            )
            if new:
                log.warning("schedule %s rejected: %s", command_id, why)
                entry = await self.journal.finish(command_id, "rejected", (), why)
            if entry.final:
                send(entry)
            return entry
        entry, new = await self.journal.schedule(
            command_id,
            asset_id=asset_id,
            site_id=site_id,
            start=start,
            steps=steps,
            duration_s=duration_s,
        )
        send(entry)
        if not new:
            return entry
        log.info(
            "schedule %s for %s: %d step(s) from %s%s",
            command_id,
            f"asset {asset_id}" if asset_id else f"site {site_id}",
            len(steps),
            _fmt_time(start),
            f", {duration_s:g} s" if duration_s is not None else "",
        )
        await self.supersede(self._assets(asset_id, site_id), start, by=command_id)
        self._wake.set()
        return entry

    async def supersede(self, assets: Iterable[str], at: float, *, by: str) -> None:
        """A newer command (``by``) for ``assets`` starts at ``at``: cut every other
        schedule of those assets that is in force then or later (see the module)."""
        mine = set(assets)
        for schedule in self.journal.schedules:
            if schedule.command_id == by:
                continue
            if not mine & set(self._assets(schedule.asset_id, schedule.site_id)):
                continue
            end = schedule.end
            if end is not None and end <= at:
                continue  # over before the newer one starts
            await self.journal.cut(schedule.command_id, at, by)
            log.info(
                "schedule %s: cut at %s by newer command %s",
                schedule.command_id,
                _fmt_time(at),
                by,
            )
        self._wake.set()

    async def cancel(self, command_id: str, target: str, *, send: Send) -> CancelResult:
        """Stop the schedule ``target`` for the cancel command ``command_id`` (the
        caller returns the assets to their default when ``revert``)."""
        running = {s.command_id: s for s in self.journal.schedules}
        schedule = running.get(target)
        if schedule is not None:
            began = schedule.next_step > 0 or target in self._writing
            entry = await self.journal.finish(
                target, "cancelled", (), f"cancelled by command {command_id}"
            )
            send(entry)
            self._wake.set()
            log.info("schedule %s cancelled by command %s", target, command_id)
            return CancelResult(
                status="applied",
                revert=began,
                reason=None if began else f"schedule {target} had not started",
                asset_id=schedule.asset_id,
                site_id=schedule.site_id,
            )
        known = await self.journal.get(target)
        if known is None:
            await self.journal.receive(target, asset_id=None, site_id=None, mw=0.0, duration_s=None)
            entry = await self.journal.finish(
                target, "cancelled", (), f"cancelled by command {command_id} before it arrived"
            )
            send(entry)
            return CancelResult(
                status="applied", reason=f"command {target} had not arrived; it will not run"
            )
        return CancelResult(status="rejected", reason=f"command {target} is already {known.status}")

    # ------------------------------------------------------------------ the runner

    async def run(self, send: Send) -> None:
        """Run due steps until cancelled; ``send`` acknowledges each report."""
        self._send = send
        await self.journal.file.ready()
        while True:
            self._wake.clear()
            due: list[float] = []
            for schedule in self.journal.schedules:
                try:
                    when = await self._advance(schedule)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("schedule %s: running it failed", schedule.command_id)
                    when = self.clock() + _MAX_WAIT_S
                if when is not None:
                    due.append(when)
            wait = min(due) - self.clock() if due else _MAX_WAIT_S
            if wait <= 0:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, _MAX_WAIT_S)):
                    await self._wake.wait()

    def wake(self) -> None:
        self._wake.set()

    async def _advance(self, schedule: Schedule) -> float | None:
        """Run what is due of ``schedule`` now; when to look again (``None``: done)."""
        now = self.clock()
        n = len(schedule.steps)
        cut = schedule.cut
        if cut is not None and (now >= cut or cut <= schedule.start):
            await self._finish(
                schedule,
                "superseded",
                f"superseded by command {schedule.cut_by} from {_fmt_time(cut)}",
                superseded_by=schedule.cut_by,
            )
            return None
        if schedule.next_step < n:
            current = -1
            for i in range(schedule.next_step, n):
                if schedule.step_at(i) <= now:
                    current = i
            if current < 0:
                return _earliest(schedule.step_at(schedule.next_step), cut)
            window_end = _earliest(
                schedule.step_at(current + 1) if current + 1 < n else schedule.end, cut
            )
            late = window_end is not None and now >= window_end
            missed = list(range(schedule.next_step, current + (1 if late else 0)))
            if missed:
                for entry in await self.journal.skip_steps(
                    schedule.command_id,
                    missed,
                    "its time passed before the agent could run it (agent stopped or "
                    "schedule received late); not run late",
                ):
                    self._send(entry)
                log.warning(
                    "schedule %s: step(s) %s skipped: their time passed",
                    schedule.command_id,
                    ", ".join(str(i) for i in missed),
                )
            if not late:
                await self._run_step(schedule, current, now)
            return now
        if schedule.next_step == n:
            end = schedule.end
            if end is None:
                await self._finish(schedule, "completed", None)
                return None
            if now < end:
                return _earliest(end, cut)
            if await self.journal.begin_step(schedule.command_id, n):
                outcome = await self._dispatcher.handle(
                    f"{schedule.command_id}#end",
                    asset_id=schedule.asset_id,
                    site_id=schedule.site_id,
                    mw=0.0,
                    source="default",
                )
                await self._finish(
                    schedule,
                    "completed",
                    f"ended after {schedule.duration_s:g} s; returned to default: "
                    f"{outcome.status}" + (f" ({outcome.reason})" if outcome.reason else ""),
                    allocations=outcome.allocations,
                )
                return None
        await self._finish(schedule, "completed", None)
        return None

    async def _run_step(self, schedule: Schedule, index: int, now: float) -> None:
        self._writing.add(schedule.command_id)
        try:
            await self._write_step(schedule, index, now)
        finally:
            self._writing.discard(schedule.command_id)

    async def _write_step(self, schedule: Schedule, index: int, now: float) -> None:
        if not await self.journal.begin_step(schedule.command_id, index):
            return
        key = step_key(schedule.command_id, index)
        if all(s.command_id != schedule.command_id for s in self.journal.schedules):
            # stopped (cancelled, superseded) while the step was begun: not written
            self._send(
                await self.journal.finish(key, "cancelled", (), "the schedule stopped first")
            )
            return
        offset, mw = schedule.steps[index]
        late_s = now - schedule.step_at(index)
        outcome = await self._dispatcher.handle(
            step_key(schedule.command_id, index),
            asset_id=schedule.asset_id,
            site_id=schedule.site_id,
            mw=mw,
            source="schedule",
        )
        reason = outcome.reason
        if late_s > 1.0:
            note = f"ran {late_s:.1f} s late (the agent could not run it on time)"
            reason = f"{reason}; {note}" if reason else note
        entry = await self.journal.finish(
            step_key(schedule.command_id, index), outcome.status, outcome.allocations, reason
        )
        log.info(
            "schedule %s: step %d (+%g s) %g MW: %s",
            schedule.command_id,
            index,
            offset,
            mw,
            outcome.status,
        )
        self._send(entry)

    async def _finish(
        self,
        schedule: Schedule,
        status: str,
        reason: str | None,
        *,
        superseded_by: str | None = None,
        allocations: Sequence[Allocation] = (),
    ) -> None:
        entry = await self.journal.finish(
            schedule.command_id,
            status,
            allocations,
            reason,
            superseded_by=superseded_by,
        )
        log.info("schedule %s %s%s", schedule.command_id, status, f": {reason}" if reason else "")
        self._send(entry)

    def _assets(self, asset_id: str | None, site_id: str | None) -> list[str]:
        runtimes = self._dispatcher.runtimes
        if asset_id:
            return [asset_id if asset_id in runtimes else asset_id.lower()]
        return list(runtimes) if site_id else []


def _earliest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def _nowhere(entry: JournalEntry) -> None:
    pass
