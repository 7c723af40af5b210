"""A program source that reads its controls from a calendar file: the smallest complete
example of the ``der_program_sources`` hook (docs/programs.md, "A runnable example").

The file (YAML) lists events; each becomes a scheduled dispatch named by its ``id``:

.. code-block:: yaml

    events:
      - id: evening-peak-2026-12-07
        site_id: ed7332b8-d686-44d3-938c-9ddfd76b4791   # or asset_id
        start: 2026-12-07T17:00:00Z
        duration_s: 3600
        mw: 1.5

The source reads the file every ``poll_interval_s``: a new or changed event is
scheduled, an event taken out of the file is cancelled. A file that cannot be read is
its "server" lost: the headend shows it in /healthz and raises ``program_comms_loss``,
and the dispatches already made keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from pathlib import Path

import msgspec
import yaml

from der_sdk import hookimpl
from der_sdk.models import Dispatch
from der_sdk.programs import (
    ProgramContext,
    ProgramDispatch,
    ProgramRefusedError,
    ProgramSource,
    ProgramSourceType,
)


class CalendarOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str
    poll_interval_s: float = 5.0


class CalendarEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    start: datetime
    mw: float
    duration_s: float | None = None
    site_id: str | None = None
    asset_id: str | None = None


class Calendar(msgspec.Struct, kw_only=True):
    events: list[CalendarEvent] = msgspec.field(default_factory=list)


def read_calendar(path: str) -> Calendar:
    """The calendar at ``path`` (blocking: call it in a thread)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return msgspec.convert(data, Calendar)


class CalendarSource(ProgramSource):
    def __init__(self, ctx: ProgramContext, options: CalendarOptions) -> None:
        self.ctx = ctx
        self.options = options
        self.closed = asyncio.Event()
        self.refused: dict[str, str] = {}  # event id → why the headend did not make it

    async def run(self) -> None:
        while not self.closed.is_set():
            try:
                calendar = await asyncio.to_thread(read_calendar, self.options.path)
            except (OSError, yaml.YAMLError, msgspec.ValidationError) as exc:
                self.ctx.report_health(False, f"{self.options.path}: {exc}")
            else:
                self.ctx.report_health(True, f"{len(calendar.events)} event(s) in the calendar")
                await self.apply(calendar)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.poll_interval_s):
                    await self.closed.wait()

    async def apply(self, calendar: Calendar) -> None:
        listed = set()
        for event in calendar.events:
            listed.add(event.id)
            control = ProgramDispatch(
                external_id=event.id,
                site_id=event.site_id,
                asset_id=event.asset_id,
                mw=event.mw,
                start_at=event.start,
                duration_s=event.duration_s,
                reason=f"calendar {self.options.path}",
            )
            try:
                await self.ctx.schedule(control)
                self.refused.pop(event.id, None)
            except ProgramRefusedError as exc:
                if self.refused.get(event.id) != str(exc):
                    self.ctx.log.warning("event %s: cannot comply: %s", event.id, exc)
                self.refused[event.id] = str(exc)
        for dispatch in await self.ctx.open_dispatches():
            if dispatch.external_id is not None and dispatch.external_id not in listed:
                await self.ctx.cancel(dispatch.external_id, "taken out of the calendar")

    async def dispatch_changed(self, dispatch: Dispatch) -> None:
        self.ctx.log.info("event %s: dispatch %s", dispatch.external_id, dispatch.state)

    async def close(self) -> None:
        self.closed.set()


@hookimpl
def der_program_sources() -> list[ProgramSourceType]:
    return [
        ProgramSourceType(
            name="calendar",
            factory=CalendarSource,
            options=CalendarOptions,
            description="events read from a YAML calendar file",
        )
    ]
