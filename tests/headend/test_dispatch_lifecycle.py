"""The dispatch lifecycle's pure functions: every state against every event, the state a
dispatch derives from its targets, and acknowledgements applied to targets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import get_args

import pytest

from der_sdk.models import (
    DISPATCH_STATE_RANK,
    Allocation,
    Dispatch,
    DispatchState,
    DispatchTarget,
    SetpointAck,
)
from der_sdk_headend.dispatch import lifecycle
from der_sdk_headend.dispatch.lifecycle import LifecycleEvent, next_state

STATES: tuple[DispatchState, ...] = get_args(DispatchState)
EVENTS: tuple[LifecycleEvent, ...] = get_args(LifecycleEvent)
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

LEGAL: dict[tuple[DispatchState, LifecycleEvent], DispatchState] = {
    ("submitted", "send"): "sent",
    ("sent", "send"): "sent",  # sent again after the stream ended unanswered
    ("submitted", "ack"): "acked",
    ("sent", "ack"): "acked",
    **{(s, o): o for s in ("submitted", "sent", "acked") for o in lifecycle.OUTCOMES},  # type: ignore[misc]
    ("submitted", "expire"): "expired",
    ("submitted", "supersede"): "superseded",
    ("submitted", "undeliverable"): "failed",
    ("sent", "undeliverable"): "failed",
    # schedules: the agent holds it, runs a step, ends it; the headend cancels one unsent
    **{(s, "scheduled"): "scheduled" for s in ("submitted", "sent", "acked")},  # type: ignore[misc]
    **{(s, "active"): "active" for s in ("submitted", "sent", "acked", "scheduled")},  # type: ignore[misc]
    **{(s, o): o for s in ("scheduled", "active") for o in lifecycle.OUTCOMES},  # type: ignore[misc]
    ("submitted", "cancel"): "cancelled",
}
"""Every move the lifecycle makes; every other (state, event) pair is ignored."""


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_each_state_moves_on_its_legal_events_and_ignores_the_rest(
    state: DispatchState, event: LifecycleEvent
) -> None:
    assert next_state(state, event) == LEGAL.get((state, event))


def test_moves_only_go_forward_and_final_states_never_move() -> None:
    for (state, _), to in LEGAL.items():
        assert DISPATCH_STATE_RANK[to] >= DISPATCH_STATE_RANK[state]
    for state in (
        "applied",
        "rejected",
        "failed",
        "superseded",
        "expired",
        "completed",
        "cancelled",
    ):
        assert all(next_state(state, e) is None for e in EVENTS), state  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("states", "derived"),
    [
        (["submitted", "applied"], "submitted"),
        (["sent", "acked", "failed"], "sent"),
        (["acked", "applied"], "acked"),
        (["applied", "applied"], "applied"),
        (["applied", "expired", "rejected"], "rejected"),
        (["superseded", "failed"], "failed"),
        (["expired", "superseded"], "superseded"),
        (["expired"], "expired"),
        ([], "failed"),
    ],
)
def test_a_dispatch_state_follows_its_targets(
    states: list[DispatchState], derived: DispatchState
) -> None:
    targets = [DispatchTarget(asset_id=f"a{i}", mw=1.0, state=s) for i, s in enumerate(states)]
    assert lifecycle.derive_state(targets) == derived


def _dispatch(*states: DispatchState, asset: bool = False) -> Dispatch:
    targets = [DispatchTarget(asset_id=f"a{i}", mw=1.0, state=s) for i, s in enumerate(states)]
    return Dispatch(
        dispatch_id="d1",
        mw=float(len(targets)),
        state=lifecycle.derive_state(targets),
        created_at=NOW,
        updated_at=NOW,
        asset_id="a0" if asset else None,
        site_id=None if asset else "s1",
        targets=targets,
    )


def test_sending_marks_targets_sent_with_their_command_and_never_moves_one_back() -> None:
    dispatch = _dispatch("submitted", "sent", "applied")
    lifecycle.mark_sent(dispatch.targets, "d1")
    assert [t.state for t in dispatch.targets] == ["sent", "sent", "applied"]
    assert [t.command_id for t in dispatch.targets] == ["d1", "d1", None]


@pytest.mark.parametrize(
    ("event", "after"),
    [
        ("expire", ["expired", "sent", "acked"]),
        ("supersede", ["superseded", "sent", "acked"]),
        ("undeliverable", ["failed", "failed", "acked"]),
    ],
)
def test_headend_events_move_only_the_targets_they_apply_to(
    event: LifecycleEvent, after: list[DispatchState]
) -> None:
    dispatch = _dispatch("submitted", "sent", "acked")
    moved = lifecycle.move(dispatch, dispatch.targets, event, "why")  # type: ignore[arg-type]
    assert [t.state for t in dispatch.targets] == after
    assert [t.reason for t in moved] == ["why"] * len(moved)
    assert dispatch.targets[2].reason is None
    assert dispatch.state == lifecycle.derive_state(dispatch.targets)


def test_an_undeliverable_dispatch_keeps_the_reason() -> None:
    dispatch = _dispatch("submitted")
    lifecycle.fail_undelivered(dispatch, dispatch.targets, "its commands could not be built")
    assert (dispatch.state, dispatch.reason) == ("failed", "its commands could not be built")


def test_acked_then_applied_for_a_per_asset_command() -> None:
    dispatch = _dispatch("sent", asset=True)
    effect = lifecycle.apply_ack(dispatch, SetpointAck(command_id="d1", status="acked"))
    assert (effect.final, effect.changed, dispatch.state) == (False, True, "acked")
    effect = lifecycle.apply_ack(
        dispatch, SetpointAck(command_id="d1", status="applied", applied_mw=0.8)
    )
    assert (effect.final, effect.changed, dispatch.state) == (True, True, "applied")
    assert dispatch.targets[0].applied_mw == 0.8


def test_a_repeated_or_late_report_changes_nothing() -> None:
    dispatch = _dispatch("applied", asset=True)
    dispatch.targets[0].applied_mw = 1.0
    for status in ("acked", "applied", "failed"):
        effect = lifecycle.apply_ack(dispatch, SetpointAck(command_id="d1", status=status))
        assert not effect.changed, status
    assert (dispatch.state, dispatch.targets[0].applied_mw) == ("applied", 1.0)


def test_a_site_outcome_settles_each_target_from_its_allocation() -> None:
    dispatch = _dispatch("acked", "acked")
    ack = SetpointAck(
        command_id="d1",
        status="applied",
        allocations=(
            Allocation(asset_id="a0", mw=0.5),
            Allocation(asset_id="a1", mw=0.0, status="rejected", reason="offline"),
            Allocation(asset_id="not-a-target", mw=1.0),
        ),
    )
    effect = lifecycle.apply_ack(dispatch, ack)
    assert effect.strangers == ["not-a-target"]
    assert [(t.state, t.applied_mw, t.reason) for t in dispatch.targets] == [
        ("applied", 0.5, None),
        ("rejected", None, "offline"),
    ]
    assert dispatch.state == "rejected"


def test_an_unknown_status_is_a_failure_that_says_so() -> None:
    dispatch = _dispatch("sent", asset=True)
    effect = lifecycle.apply_ack(dispatch, SetpointAck(command_id="d1", status="exploded"))
    assert (effect.status, dispatch.state) == ("failed", "failed")
    assert dispatch.reason == "the agent reported an unknown status 'exploded'"


def test_a_per_asset_command_of_a_site_dispatch_moves_only_its_target() -> None:
    dispatch = _dispatch("sent", "sent")
    dispatch.targets[1].command_id = "d1/a1"
    lifecycle.apply_ack(dispatch, SetpointAck(command_id="d1/a1", status="applied", applied_mw=1))
    assert [t.state for t in dispatch.targets] == ["sent", "applied"]
    assert dispatch.targets[1].applied_mw == 1


def test_expiry_and_duration_are_reckoned_from_the_time_given() -> None:
    dispatch = _dispatch("submitted", asset=True)
    dispatch.duration_s = 60.0
    dispatch.expires_at = NOW + timedelta(seconds=30)
    assert lifecycle.remaining_s(dispatch, NOW + timedelta(seconds=10)) == 50.0
    assert lifecycle.expires_in_ms(dispatch, NOW + timedelta(seconds=10)) == 20_000
    assert lifecycle.expired_because(dispatch, NOW) is None
    assert "expired at" in (lifecycle.expired_because(dispatch, NOW + timedelta(seconds=30)) or "")
    dispatch.expires_at = None
    assert lifecycle.expired_because(dispatch, NOW + timedelta(seconds=60)) == (
        "its duration of 60 s ran out"
    )
