"""The dispatch lifecycle as pure functions: no storage, no clock, no streams.

A target moves forward only::

    submitted ──send──▶ sent ──ack──▶ acked ──outcome──▶ applied | rejected | failed | expired
        │                 │
        ├──expire──▶ expired (its expiry passed before it was sent)
        ├──supersede──▶ superseded (a newer dispatch for its asset)
        └──undeliverable──▶ failed (its commands could not be built; also from sent)

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
    Dispatch,
    DispatchState,
    DispatchTarget,
    SetpointAck,
)

__all__ = [
    "OUTCOMES",
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
    "remaining_s",
    "target_of",
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
]

OUTCOMES: frozenset[str] = frozenset({"applied", "rejected", "failed", "expired"})
"""The final statuses an agent reports."""

_OPEN: tuple[DispatchState, ...] = ("submitted", "sent", "acked")
_FINAL_ORDER: tuple[DispatchState, ...] = ("failed", "rejected", "superseded", "expired")
_NOT_SENT: frozenset[DispatchState] = frozenset({"submitted"})
_UNACKED: frozenset[DispatchState] = frozenset({"submitted", "sent"})
_OPEN_SET: frozenset[DispatchState] = frozenset(_OPEN)

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
    """
    states = {t.state for t in targets}
    for open_state in _OPEN:
        if open_state in states:
            return open_state
    if states == {"applied"}:
        return "applied"
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
    event: Literal["expire", "supersede", "undeliverable"],
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
    if state == "acked":
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
    final = ack.status != "acked"
    status: DispatchState = ack_state(ack.status) if final else "acked"
    reason = ack.reason
    if final and ack.status not in OUTCOMES:
        reason = reason or f"the agent reported an unknown status {ack.status!r}"
    effect = AckEffect(final=final, status=status, reason=reason)
    before = [t.state for t in dispatch.targets]
    if final and ack.allocations:
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
    ends = dispatch.created_at + timedelta(seconds=dispatch.duration_s)
    return (ends - now).total_seconds()


def expires_in_ms(dispatch: Dispatch, now: datetime) -> int | None:
    """Milliseconds until the dispatch expires (``None``: no expiry)."""
    if dispatch.expires_at is None:
        return None
    return math.floor((dispatch.expires_at - now).total_seconds() * 1000)


def expired_because(dispatch: Dispatch, now: datetime) -> str | None:
    """Why the submitted targets of ``dispatch`` may no longer be sent at ``now``
    (its expiry passed or its duration ran out), or ``None``."""
    if dispatch.expires_at is not None and dispatch.expires_at <= now:
        return f"it expired at {dispatch.expires_at.isoformat()} before its asset connected"
    remaining = remaining_s(dispatch, now)
    if remaining is not None and remaining <= 0:
        return f"its duration of {dispatch.duration_s or 0:g} s ran out"
    return None
