"""What a program may do, as pure functions: the precedence rule between operators and
programs, and how a program's control becomes a dispatch request (docs/programs.md).

**Manual wins for its duration.** A manual dispatch (made by an operator: ``rest``,
``console``, or ``local`` at the agent) *with a duration* holds each asset it targets
from its start to its end. While it holds an asset:

* a program's dispatch whose time in force overlaps the hold, on an asset it holds, is
  not made: the program is told it is held back (``ProgramRefusedError``, kind ``held``)
  and reports "cannot comply" or "opt out" upstream;
* a manual dispatch made while a program's dispatch runs or waits on the same asset
  supersedes it by the ordinary rule (the newer command wins: the agent cuts a running
  schedule at the newer's start, the headend supersedes what it had not sent yet), and
  the program reports the ``superseded`` state upstream.

A manual dispatch without a duration is a one-off setpoint: it holds nothing, and the
next program step replaces it. Give ``duration_s`` to keep programs off an asset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta

import msgspec

from der_sdk.models import Dispatch, DispatchRequest, ScheduleStep
from der_sdk.programs import ProgramDispatch, ProgramRefusedError
from der_sdk_headend.dispatch.lifecycle import window

__all__ = [
    "MANUAL_SOURCES",
    "control_fingerprint",
    "manual_hold",
    "program_window",
    "to_request",
]

MANUAL_SOURCES: frozenset[str] = frozenset({"rest", "console", "local"})
"""The ``source`` of dispatches an operator made: REST, the console, or at the agent."""

_NOT_HOLDING: frozenset[str] = frozenset(
    {"rejected", "failed", "superseded", "expired", "cancelled", "completed"}
)
"""States of a manual dispatch that hold nothing (it ended, or never ran)."""


def manual_hold(
    candidates: Iterable[Dispatch],
    assets: set[str],
    start: datetime,
    end: datetime | None,
    now: datetime,
) -> Dispatch | None:
    """The manual dispatch that holds one of ``assets`` during ``[start, end)`` (``end``
    ``None``: open-ended), or ``None``.

    A hold is a manual dispatch with a duration, not ended or refused, whose window
    (:func:`~der_sdk_headend.dispatch.lifecycle.window`) ends after ``now`` and overlaps
    ``[start, end)``, with a target on one of ``assets`` that was not refused, failed,
    superseded or cancelled. The one ending last wins the tie.
    """
    holding: list[tuple[datetime, Dispatch]] = []
    for dispatch in candidates:
        if dispatch.source not in MANUAL_SOURCES or dispatch.duration_s is None:
            continue
        if dispatch.state in _NOT_HOLDING or dispatch.cancel_requested_at is not None:
            continue
        held_start, held_end = window(dispatch)
        if held_end is None or held_end <= now:
            continue
        overlaps = (end is None or held_start < end) and start < held_end
        if not overlaps:
            continue
        if any(t.asset_id in assets and t.state not in _NOT_HOLDING for t in dispatch.targets):
            holding.append((held_end, dispatch))
    if not holding:
        return None
    return max(holding, key=lambda pair: pair[0])[1]


def control_fingerprint(control: ProgramDispatch) -> str:
    """SHA-256 of a program's control as received: the same control received again (the
    next poll) has the same one, a changed control another."""
    return hashlib.sha256(msgspec.json.encode(control)).hexdigest()


def program_window(control: ProgramDispatch, now: datetime) -> tuple[datetime, datetime | None]:
    """When ``control`` is in force, by the headend's clock: from ``start_at`` (or now)
    for ``duration_s`` (``None``: open-ended)."""
    start = control.start_at if control.start_at is not None else now
    if control.duration_s is None:
        return start, None
    return start, start + timedelta(seconds=control.duration_s)


def to_request(control: ProgramDispatch, now: datetime) -> DispatchRequest:
    """The dispatch request for ``control``: always a schedule, so it can be cancelled on
    the agent when the control is cancelled upstream.

    A control in force already (``start_at`` ``None`` or past) starts now: its
    ``duration_s`` shortened by the time past, its steps from the one in force now.

    :raises ProgramRefusedError: ``invalid``: a ``start_at`` without a time zone, no MW
        and no steps, or a control whose duration has already run out.
    """
    if control.start_at is not None and control.start_at.tzinfo is None:
        raise ProgramRefusedError(
            "invalid", f"start_at {control.start_at.isoformat()} has no time zone"
        )
    if control.steps is None and control.mw is None:
        raise ProgramRefusedError("invalid", "the control has neither mw nor steps")
    start = control.start_at if control.start_at is not None else now
    late = max(0.0, (now - start).total_seconds())
    duration = control.duration_s
    if duration is not None and late > 0:
        duration -= late
        if duration <= 0:
            ended = start + timedelta(seconds=duration + late)
            raise ProgramRefusedError(
                "invalid",
                f"the control ended at {ended.isoformat()}, before the headend received it",
            )
    steps = control.steps
    if steps is not None and late > 0:
        ordered = sorted(steps, key=lambda s: s.offset_s)
        in_force = [s for s in ordered if s.offset_s <= late]
        upcoming = [s for s in ordered if s.offset_s > late]
        steps = [ScheduleStep(offset_s=0.0, mw=in_force[-1].mw)] if in_force else []
        steps += [ScheduleStep(offset_s=s.offset_s - late, mw=s.mw) for s in upcoming]
    start_at = max(start, now)
    return DispatchRequest(
        mw=None if steps is not None else control.mw,
        asset_id=control.asset_id,
        site_id=control.site_id if control.asset_id is None else None,
        duration_s=duration,
        start_at=start_at,
        steps=steps,
    )
