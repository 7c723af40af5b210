"""The console's scheduled dispatches (docs/dispatch.md) on the Dispatch and Asset pages,
and their cancel for operators.

- ``GET /console/schedules`` (``asset_id`` or ``site_id`` to narrow): the schedules, newest
  first, each with its start, its steps (offset and MW) with each target's per-step status
  from the record, its state (``superseded`` with the dispatch that replaced it), and for
  operators a **Cancel** button while it is open (``partials/schedule_list.html``). The
  pages include ``partials/schedules_section.html``, which re-reads it on the live
  stream's dispatch changes.
- ``POST /console/dispatch/{dispatch_id}/cancel`` (operator, CSRF): as the console's
  dispatch form does, it acts only with ``confirm=yes``; without it the answer asks for
  the confirmation (nothing cancelled). It cancels through
  :func:`~der_sdk_headend.rest.dispatch.cancel_audited`, the code of
  ``POST /dispatch/{id}/cancel``: audited as ``dispatch.cancel`` with ``via=console``, 404
  for an unknown dispatch, 409 (the reason shown in the row) for one that cannot be.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from der_sdk_headend.console import render
from der_sdk_headend.console.auth import page
from der_sdk_headend.console.trend import parse_time
from der_sdk_headend.dispatch import CancelConflictError
from der_sdk_headend.dispatch.lifecycle import is_open

if TYPE_CHECKING:
    from der_sdk.inventory import Inventory
    from der_sdk.models import Dispatch, DispatchRequest, DispatchTarget
    from der_sdk_headend.service import Headend

__all__ = [
    "SCHEDULE_FIELDS",
    "SCHEDULE_HANDLERS",
    "ScheduleFormError",
    "ScheduleView",
    "names_of",
    "offset_label",
    "schedule_confirmation",
    "schedule_fields",
    "schedule_view",
    "with_line",
]

SCHEDULE_LIMIT = 20
"""Schedules listed (newest first)."""
HISTORY_WINDOW = 500
"""Newest dispatches read to find the schedules among them."""


SCHEDULE_FIELDS = ("start_at", "steps")
"""The Dispatch form's optional schedule fields (``partials/schedule_form_fields.html``)."""


class ScheduleFormError(ValueError):
    """A schedule field of the dispatch form that cannot be read (the message names it)."""


def _steps(text: str) -> list[dict[str, float]]:
    """The steps textarea: one ``offset_s mw`` a line (or separated by ``;``), blank lines
    skipped."""
    steps = []
    lines = [line.strip() for line in re.split(r"[\n;]", text)]
    for number, line in enumerate((line for line in lines if line), start=1):
        parts = line.replace(",", " ").split()
        try:
            if len(parts) != 2:
                raise ValueError
            offset, mw = float(parts[0]), float(parts[1])
        except ValueError:
            raise ScheduleFormError(
                f"form field `steps`, line {number}: {line!r} is not `offset_s mw` "
                "(seconds after the start, then MW; e.g. `0 1.5`)"
            ) from None
        if not (math.isfinite(offset) and math.isfinite(mw)):
            raise ScheduleFormError(f"form field `steps`, line {number}: {line!r} is not finite")
        steps.append({"offset_s": offset, "mw": mw})
    return steps


def schedule_fields(form: Any) -> dict[str, Any]:
    """The ``start_at`` and ``steps`` of the dispatch form, as ``POST /dispatch`` takes
    them (absent when empty); planning validates them as for REST.

    :raises ScheduleFormError: a field that cannot be read, named with its line.
    """
    fields: dict[str, Any] = {}
    start = str(form.get("start_at", "") or "").strip()
    steps = str(form.get("steps", "") or "").strip()
    if start:  # without a time zone it is UTC (the page's field sends none, and says UTC)
        try:
            fields["start_at"] = parse_time(start, "form field `start_at`")
        except ValueError as exc:
            raise ScheduleFormError(f"{exc} (2026-01-01T12:00, UTC)") from None
    if steps:
        if not start:
            raise ScheduleFormError("form field `start_at`: steps need a start time")
        fields["steps"] = _steps(steps)
    return fields


def schedule_confirmation(request: DispatchRequest) -> str | None:
    """Why a schedule from the form needs a confirmation (every one does), or ``None``."""
    if request.start_at is None:
        return None
    count = len(request.steps) if request.steps else 1
    return (
        f"a schedule of {count} step{'' if count == 1 else 's'} runs on the agent from "
        f"{request.start_at.strftime('%Y-%m-%d %H:%M:%S')} UTC"
    )


def with_line(error: str) -> str:
    """A planning refusal that names ``steps[i]``, with the form's line of that step."""
    found = re.search(r"steps\[(\d+)\]", error)
    return f"{error} (line {int(found.group(1)) + 1} of the steps)" if found else error


def offset_label(offset_s: float) -> str:
    """``+0 s``, ``+90 s``, ``+15 min``, ``+3 h``, ``+1 h 30 min``, ``+2 d 4 h``."""
    seconds = round(offset_s)
    if seconds < 120:
        return f"+{offset_s:g} s"
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days} d"] if days else []
    parts += [f"{hours} h"] if hours else []
    parts += [f"{minutes} min"] if minutes else []
    parts += [f"{secs} s"] if secs else []
    return "+" + " ".join(parts)


@dataclass(frozen=True)
class StepRow:
    offset: str
    at: datetime
    mw: float
    status: str
    applied_mw: float | None
    reason: str | None


@dataclass(frozen=True)
class TargetRow:
    asset_id: str
    name: str
    state: str
    steps: list[StepRow]


@dataclass(frozen=True)
class ScheduleView:
    """A scheduled dispatch as the console shows it."""

    dispatch: Dispatch
    start_at: datetime
    end_at: datetime | None
    targets: list[TargetRow]
    cancellable: bool

    @property
    def dispatch_id(self) -> str:
        return self.dispatch.dispatch_id


def _target_row(
    dispatch: Dispatch, start: datetime, target: DispatchTarget, names: dict[str, str]
) -> TargetRow:
    steps = target.steps
    if steps is None:  # before the split is recorded: the requested steps, pending
        from der_sdk.models import TargetStep

        steps = [TargetStep(offset_s=s.offset_s, mw=s.mw) for s in dispatch.steps or []]
    return TargetRow(
        asset_id=target.asset_id,
        name=names.get(target.asset_id, target.asset_id[:8]),
        state=target.state,
        steps=[
            StepRow(
                offset=offset_label(step.offset_s),
                at=start + timedelta(seconds=step.offset_s),
                mw=step.mw,
                status=step.status,
                applied_mw=step.applied_mw,
                reason=step.reason,
            )
            for step in steps
        ],
    )


def schedule_view(dispatch: Dispatch, names: dict[str, str]) -> ScheduleView:
    """``dispatch`` (which has a ``start_at``) with its steps per target."""
    assert dispatch.start_at is not None, "a schedule has a start"
    start = dispatch.start_at
    end = start + timedelta(seconds=dispatch.duration_s) if dispatch.duration_s else None
    return ScheduleView(
        dispatch=dispatch,
        start_at=start,
        end_at=end,
        targets=[_target_row(dispatch, start, t, names) for t in dispatch.targets],
        cancellable=is_open(dispatch),
    )


def names_of(inventory: Inventory) -> dict[str, str]:
    """Display names of assets and sites by id."""
    names = {a.asset_id: a.name for a in inventory.assets.values()}
    names.update({s.site_id: s.name for s in inventory.sites.values()})
    return names


@get("/console/schedules", **page("viewer"))
async def schedules_partial(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    asset_id: FromQuery[str | None] = None,
    site_id: FromQuery[str | None] = None,
) -> Template:
    """The newest scheduled dispatches (of an asset or site), with steps, states and, for
    operators, Cancel."""
    inventory = headend.inventory
    if asset_id and asset_id not in inventory.assets:
        raise NotFoundException(f"unknown asset {asset_id}")
    if site_id and site_id not in inventory.sites:
        raise NotFoundException(f"unknown site {site_id}")
    dispatches = await headend.storage.dispatch_history(
        asset_id=asset_id or None, site_id=site_id or None, limit=HISTORY_WINDOW
    )
    names = names_of(inventory)
    schedules = [schedule_view(d, names) for d in dispatches if d.start_at is not None]
    return render(
        request,
        headend,
        "partials/schedule_list.html",
        {"schedules": schedules[:SCHEDULE_LIMIT], "names": names, "limit": SCHEDULE_LIMIT},
    )


@post("/console/dispatch/{dispatch_id:str}/cancel", **page("operator"), status_code=200)
async def cancel_schedule(
    request: Request[Any, Any, Any], headend: NamedDependency[Headend], dispatch_id: FromPath[str]
) -> Template | Redirect:
    """Cancel a dispatch (operator) with ``confirm=yes``; without it, ask for the
    confirmation. Answers with the schedule's row (htmx) or goes back to the Dispatch page."""
    from der_sdk_headend.rest.dispatch import cancel_audited

    form = await request.form()
    names = names_of(headend.inventory)
    if str(form.get("confirm", "")).strip() != "yes":
        dispatch = await headend.storage.get_dispatch(dispatch_id)
        if dispatch is None:
            raise NotFoundException(f"unknown dispatch {dispatch_id}")
        return _row(request, headend, dispatch, names, asking=True)
    htmx = bool(request.headers.get("hx-request"))
    error = None
    try:
        cancelled = await cancel_audited(headend, request, dispatch_id, via="console")
    except CancelConflictError as exc:
        if not htmx:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        # htmx swaps only 2xx answers: the refusal is shown in the schedule's row
        error, cancelled = str(exc), await headend.storage.get_dispatch(dispatch_id)
    if cancelled is None:
        raise NotFoundException(f"unknown dispatch {dispatch_id}")
    if not htmx:
        return Redirect("/console/dispatch", status_code=303)
    return _row(request, headend, cancelled, names, error=error)


def _row(
    request: Request[Any, Any, Any],
    headend: Headend,
    dispatch: Dispatch,
    names: dict[str, str],
    *,
    asking: bool = False,
    error: str | None = None,
) -> Template:
    if dispatch.start_at is None:  # an immediate dispatch (a bad id in a forged post)
        raise NotFoundException(f"dispatch {dispatch.dispatch_id} is not a schedule")
    return render(
        request,
        headend,
        "partials/schedule_row.html",
        {"s": schedule_view(dispatch, names), "names": names, "asking": asking, "error": error},
    )


SCHEDULE_HANDLERS = [schedules_partial, cancel_schedule]
