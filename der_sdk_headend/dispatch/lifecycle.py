"""The dispatch lifecycle as pure functions: no storage, no clock, no streams.

A target moves forward only::

    submitted ──send──▶ sent ──ack──▶ acked ──outcome──▶ applied | rejected | failed | expired
        │                 │
        ├──expire──▶ expired (its expiry passed before it was sent)
        ├──supersede──▶ superseded (a newer dispatch for its asset)
        └──undeliverable──▶ failed (its commands could not be built; also from sent)

A schedule's target (it has ``steps``) adds, from the agent's reports::

    submitted ─send─▶ sent ─scheduled─▶ scheduled ─a step ran─▶ active
        ──▶ completed | cancelled | superseded | rejected | failed

and the headend's own ``cancel`` of a target not sent yet. The dispatch of a schedule is
``scheduled`` until one of its targets is ``active`` (then ``active``), and
``completed`` once every target completed.

:func:`next_state` is the whole table; every other function here applies it to targets
and derives the dispatch's state from theirs. Callers pass the time (``now``) in; they
save and log what changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from der_sdk.models import (
    TERMINAL_DISPATCH_STATES,
    Allocation,
    Dispatch,
    DispatchState,
    DispatchTarget,
    SetpointAck,
)

__all__ = [
    "OUTCOMES",
    "PROGRESS",
    "AckEffect",
    "LifecycleEvent",
    "ack_state",
    "apply_ack",
    "derive_state",
    "expired_because",
    "expires_in_ms",
    "fail_undelivered",
    "is_open",
    "mark_sent",
    "move",
    "next_state",
    "overlaps",
    "remaining_s",
    "starts_before",
    "target_of",
    "window",
]

LifecycleEvent = Literal[
    "send",  # the headend queued a command carrying the target (first time or again)
    "ack",  # the agent recorded the command in its journal
    "applied",  # the agent's final outcomes
    "rejected",
    "failed",
    "expired",
    "expire",  # the headend: the expiry passed before the target could be sent
    "supersede",  # the headend: a newer dispatch for the asset, before this one was sent
    "undeliverable",  # the headend: the target's commands cannot be built
    "scheduled",  # the agent holds the schedule in its journal
    "active",  # the agent ran a step of the schedule
    "completed",  # the agent's final outcomes of a schedule
    "cancelled",
    "superseded",
    "cancel",  # the headend: cancelled before it was sent
]

OUTCOMES: frozenset[str] = frozenset(
    {"applied", "rejected", "failed", "expired", "completed", "cancelled", "superseded"}
)
"""The final statuses an agent reports."""

_OPEN: tuple[DispatchState, ...] = ("submitted", "sent", "acked", "scheduled", "active")
_FINAL_ORDER: tuple[DispatchState, ...] = (
    "failed",
    "rejected",
    "cancelled",
    "superseded",
    "expired",
    "completed",
)
_NOT_SENT: frozenset[DispatchState] = frozenset({"submitted"})
_UNACKED: frozenset[DispatchState] = frozenset({"submitted", "sent"})
_OPEN_SET: frozenset[DispatchState] = frozenset(_OPEN)
_SCHEDULE_ENDS: frozenset[DispatchState] = frozenset({"completed", "cancelled", "superseded"})
"""A schedule's final statuses: its allocations (the return to default) are not its state."""
_WAITING: frozenset[DispatchState] = frozenset({"submitted", "sent", "acked", "scheduled"})
PROGRESS: frozenset[str] = frozenset({"acked", "scheduled", "active"})
"""The statuses an agent reports on the way, before a final one (never confirmed)."""

_MOVES: dict[LifecycleEvent, tuple[frozenset[DispatchState], DispatchState]] = {
    "send": (_UNACKED, "sent"),
    "ack": (_UNACKED, "acked"),
    "applied": (_OPEN_SET, "applied"),
    "rejected": (_OPEN_SET, "rejected"),
    "failed": (_OPEN_SET, "failed"),
    "expired": (_OPEN_SET, "expired"),
    "expire": (_NOT_SENT, "expired"),
    "supersede": (_NOT_SENT, "superseded"),
    "undeliverable": (_UNACKED, "failed"),
    "scheduled": (_UNACKED | {"acked"}, "scheduled"),
    "active": (_WAITING, "active"),
    "completed": (_OPEN_SET, "completed"),
    "cancelled": (_OPEN_SET, "cancelled"),
    "superseded": (_OPEN_SET, "superseded"),
    "cancel": (_NOT_SENT, "cancelled"),
}
"""Event → (the states it applies to, the state it leads to). Anything else is ignored."""


def next_state(state: DispatchState, event: LifecycleEvent) -> DispatchState | None:
    """The state a target in ``state`` moves to on ``event``; ``None``: it is ignored
    (a repeated or late report, or an event that does not apply to that state)."""
    applies_to, to = _MOVES[event]
    return to if state in applies_to else None


def derive_state(targets: Sequence[DispatchTarget]) -> DispatchState:
    """A dispatch's state from its targets.

    Any submitted → ``submitted``; else any sent → ``sent``; else any acked → ``acked``;
    else all applied → ``applied``; else the first of failed, rejected, superseded,
    expired that is present.

    A schedule (its targets have steps): any active → ``active``; else any open →
    ``scheduled``; else all completed → ``completed``; else the first of failed,
    rejected, cancelled, superseded, expired that is present.
    """
    states = {t.state for t in targets}
    if any(t.steps for t in targets):
        if "active" in states:
            return "active"
        if states & _OPEN_SET:
            return "scheduled"
    for open_state in _OPEN:
        if open_state in states:
            return open_state
    if states == {"applied"}:
        return "applied"
    if states == {"completed"}:
        return "completed"
    for state in _FINAL_ORDER:
        if state in states:
            return state
    return "failed"


def is_open(dispatch: Dispatch) -> bool:
    """Whether ``dispatch`` still waits for something (not in a final state)."""
    return dispatch.state not in TERMINAL_DISPATCH_STATES


def ack_state(status: str) -> DispatchState:
    """The state an agent's final ``status`` stands for; an unknown status is ``failed``."""
    if status in OUTCOMES:
        return status  # type: ignore[return-value]
    return "failed"


def target_of(dispatch: Dispatch, asset_id: str) -> DispatchTarget | None:
    for target in dispatch.targets:
        if target.asset_id == asset_id:
            return target
    return None


# ----------------------------------------------------------------------------- moves


def mark_sent(targets: Iterable[DispatchTarget], command_id: str) -> None:
    """``targets`` went out in the command ``command_id`` (first time or again)."""
    for target in targets:
        if next_state(target.state, "send") is not None:
            target.state = "sent"
            target.command_id = command_id


def move(
    dispatch: Dispatch,
    targets: Iterable[DispatchTarget],
    event: Literal["expire", "supersede", "undeliverable", "cancel"],
    reason: str,
) -> list[DispatchTarget]:
    """Apply a headend-side ``event`` to ``targets`` with ``reason``, then the dispatch's
    state. :return: the targets that moved."""
    moved: list[DispatchTarget] = []
    for target in targets:
        to = next_state(target.state, event)
        if to is not None:
            target.state = to
            target.reason = reason
            moved.append(target)
    dispatch.state = derive_state(dispatch.targets)
    return moved


def fail_undelivered(dispatch: Dispatch, targets: Iterable[DispatchTarget], reason: str) -> None:
    """Settle ``targets`` not sent yet or to be sent again as ``failed`` with ``reason``
    (also the dispatch's reason). A target the agent acknowledged keeps waiting for the
    outcome the agent reports from its journal."""
    move(dispatch, targets, "undeliverable", reason)
    dispatch.reason = reason


def _report(
    target: DispatchTarget, state: DispatchState, applied_mw: float | None, reason: str | None
) -> None:
    """An agent reported ``state`` (``acked`` or a final one) for ``target``."""
    event: LifecycleEvent = "ack" if state == "acked" else state  # type: ignore[assignment]
    if next_state(target.state, event) is None:
        return
    target.state = state
    if state in PROGRESS:
        return
    if target.steps and state != "applied":
        if state != "completed":  # what did not run will not
            for step in target.steps:
                if step.status == "pending":
                    step.status = state
        if reason is not None:
            target.reason = reason
        return
    target.applied_mw = applied_mw if state == "applied" else None
    if reason is not None:
        target.reason = reason


@dataclass(slots=True)
class AckEffect:
    """What an agent's :class:`SetpointAck` did to a dispatch."""

    final: bool
    """The ack carries a final status (the agent waits for ``SetpointOutcomeAck``)."""
    status: DispatchState
    """The state it reports (``acked``, or the final state its status stands for)."""
    reason: str | None
    changed: bool = False
    """Some target moved; the dispatch's state and, for a failure, its reason are new."""
    strangers: list[str] = field(default_factory=list)
    """Assets in its allocations that are not targets of the dispatch (ignored)."""


def apply_ack(dispatch: Dispatch, ack: SetpointAck) -> AckEffect:
    """Apply ``ack`` to the targets of ``dispatch``, forward only.

    A final status with allocations settles each allocated target from its allocation; a
    final status without them (a per-asset command) or ``acked`` moves the targets the
    command carried (``applied_mw`` only when it carried one).
    """
    if ack.step is not None:
        return _apply_step(dispatch, ack)
    final = ack.status not in PROGRESS
    status: DispatchState = ack_state(ack.status) if final else ack.status  # type: ignore[assignment]
    reason = ack.reason
    if final and ack.status not in OUTCOMES:
        reason = reason or f"the agent reported an unknown status {ack.status!r}"
    effect = AckEffect(final=final, status=status, reason=reason)
    before = [t.state for t in dispatch.targets]
    if final and ack.allocations and status not in _SCHEDULE_ENDS:
        for allocation in ack.allocations:
            target = target_of(dispatch, allocation.asset_id)
            if target is None:
                effect.strangers.append(allocation.asset_id)
                continue
            _report(
                target, ack_state(allocation.status), allocation.mw, allocation.reason or reason
            )
    else:
        targets = _command_targets(dispatch, ack.command_id)
        single = len(targets) == 1
        for target in targets:
            _report(target, status, ack.applied_mw if single else None, reason)
    effect.changed = [t.state for t in dispatch.targets] != before
    if effect.changed:
        dispatch.state = derive_state(dispatch.targets)
        if final and reason and status != "applied":
            dispatch.reason = reason
    return effect


def _apply_step(dispatch: Dispatch, ack: SetpointAck) -> AckEffect:
    """A report of one step of a schedule: each allocated asset's step gets its status
    (forward only: a step reported before keeps its report), and a target whose step
    ran becomes ``active``."""
    assert ack.step is not None
    index = ack.step
    effect = AckEffect(final=True, status="active", reason=ack.reason)
    before = _step_states(dispatch)
    reports: list[tuple[DispatchTarget | None, Allocation | None]]
    if ack.allocations:
        reports = [(target_of(dispatch, a.asset_id), a) for a in ack.allocations]
    else:
        reports = [(t, None) for t in _command_targets(dispatch, ack.command_id)]
    for target, allocation in reports:
        if target is None:
            assert allocation is not None
            effect.strangers.append(allocation.asset_id)
            continue
        if target.steps is None or index >= len(target.steps):
            continue
        step = target.steps[index]
        if step.status != "pending":
            continue
        status = allocation.status if allocation is not None else ack.status
        step.status = status
        step.at = ack.ts
        step.reason = (allocation.reason if allocation is not None else None) or ack.reason
        if status == "applied":
            step.applied_mw = allocation.mw if allocation is not None else ack.applied_mw
        if next_state(target.state, "active") is not None:
            target.state = "active"
    effect.changed = _step_states(dispatch) != before
    if effect.changed:
        dispatch.state = derive_state(dispatch.targets)
    return effect


def _step_states(dispatch: Dispatch) -> list[tuple[str, list[str]]]:
    return [(t.state, [s.status for s in t.steps or ()]) for t in dispatch.targets]


def _command_targets(dispatch: Dispatch, command_id: str) -> list[DispatchTarget]:
    """The targets the command ``command_id`` carried."""
    carried = [t for t in dispatch.targets if t.command_id == command_id]
    if carried:
        return carried
    _, _, asset_part = command_id.partition("/")
    if asset_part:
        return [t for t in [target_of(dispatch, asset_part)] if t is not None]
    if dispatch.asset_id is not None:
        return [t for t in [target_of(dispatch, dispatch.asset_id)] if t is not None]
    return [t for t in dispatch.targets if t.state in ("sent", "acked")]


# ----------------------------------------------------------------------------- time


def remaining_s(dispatch: Dispatch, now: datetime) -> float | None:
    """Seconds of ``duration_s`` left at ``now`` (``None``: no duration)."""
    if dispatch.duration_s is None:
        return None
    ends = (dispatch.start_at or dispatch.created_at) + timedelta(seconds=dispatch.duration_s)
    return (ends - now).total_seconds()


def expires_in_ms(dispatch: Dispatch, now: datetime) -> int | None:
    """Milliseconds until the dispatch expires (``None``: no expiry)."""
    if dispatch.expires_at is None:
        return None
    return math.floor((dispatch.expires_at - now).total_seconds() * 1000)


def window(dispatch: Dispatch) -> tuple[datetime, datetime | None]:
    """When ``dispatch`` is in force: from its start (``start_at``, or when it was made)
    to its end (``None``: until something replaces it)."""
    start = dispatch.start_at or dispatch.created_at
    if dispatch.duration_s is None:
        return start, None
    return start, start + timedelta(seconds=dispatch.duration_s)


def overlaps(older: Dispatch, newer: Dispatch) -> bool:
    """Whether the times ``older`` and ``newer`` are in force overlap."""
    older_start, older_end = window(older)
    newer_start, newer_end = window(newer)
    return (older_end is None or newer_start < older_end) and (
        newer_end is None or older_start < newer_end
    )


def starts_before(older: Dispatch, newer: Dispatch) -> bool:
    """Whether ``newer`` is a schedule and ``older`` starts before it (``older`` then runs
    until ``newer`` starts: the agent cuts it there)."""
    return newer.start_at is not None and window(older)[0] < window(newer)[0]


def expired_because(dispatch: Dispatch, now: datetime) -> str | None:
    """Why the submitted targets of ``dispatch`` may no longer be sent at ``now``
    (its expiry passed or its duration ran out), or ``None``."""
    if dispatch.expires_at is not None and dispatch.expires_at <= now:
        return f"it expired at {dispatch.expires_at.isoformat()} before its asset connected"
    if dispatch.start_at is not None and dispatch.duration_s is None:
        return None  # a schedule without an end: its last step is in force for good
    remaining = remaining_s(dispatch, now)
    if remaining is not None and remaining <= 0:
        return f"its duration of {dispatch.duration_s or 0:g} s ran out"
    return None
