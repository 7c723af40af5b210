"""The precedence rule and the shaping of a program's control, as pure functions
(der_sdk_headend.programs.precedence): manual wins for its duration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from der_sdk.models import Dispatch, DispatchTarget, ScheduleStep
from der_sdk.programs import ProgramDispatch, ProgramRefusedError
from der_sdk_headend.programs.precedence import (
    control_fingerprint,
    manual_hold,
    to_request,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
A, B = "asset-a", "asset-b"


def _manual(
    source: str = "rest",
    duration_s: float | None = 600,
    state: str = "applied",
    created: datetime = NOW,
    asset: str = A,
) -> Dispatch:
    return Dispatch(
        dispatch_id=f"{source}-{duration_s}-{state}",
        mw=1.0,
        state=state,  # type: ignore[arg-type]
        created_at=created,
        updated_at=created,
        asset_id=asset,
        duration_s=duration_s,
        source=source,
        targets=[DispatchTarget(asset_id=asset, mw=1.0, state=state)],  # type: ignore[arg-type]
    )


def _window(start_in_s: float, length_s: float | None) -> tuple[datetime, datetime | None]:
    start = NOW + timedelta(seconds=start_in_s)
    return start, None if length_s is None else start + timedelta(seconds=length_s)


@pytest.mark.parametrize("source", ["rest", "console", "local"])
def test_a_manual_dispatch_with_a_duration_holds_its_asset_while_it_lasts(source: str) -> None:
    manual = _manual(source)
    assert manual_hold([manual], {A}, *_window(60, 60), NOW) is manual
    assert manual_hold([manual], {A}, *_window(599, None), NOW) is manual
    assert manual_hold([manual], {A}, *_window(600, 60), NOW) is None, "after it ends"
    assert manual_hold([manual], {B}, *_window(60, 60), NOW) is None, "another asset"


@pytest.mark.parametrize(
    "manual",
    [
        _manual(duration_s=None),
        _manual(source="program:other"),
        _manual(state="cancelled"),
        _manual(state="superseded"),
        _manual(state="rejected"),
        _manual(created=NOW - timedelta(seconds=700)),
    ],
    ids=["no duration", "a program", "cancelled", "superseded", "rejected", "over"],
)
def test_these_hold_nothing(manual: Dispatch) -> None:
    assert manual_hold([manual], {A}, *_window(0, 60), NOW) is None


def test_a_control_in_the_future_is_a_schedule_as_given() -> None:
    control = ProgramDispatch(
        external_id="e", site_id="s", mw=2.0, start_at=NOW + timedelta(minutes=5), duration_s=60
    )
    request = to_request(control, NOW)
    assert (request.site_id, request.mw, request.duration_s) == ("s", 2.0, 60)
    assert request.start_at == NOW + timedelta(minutes=5) and request.steps is None


def test_a_control_in_force_already_starts_now_from_the_step_in_force() -> None:
    control = ProgramDispatch(
        external_id="e",
        asset_id="a",
        start_at=NOW - timedelta(seconds=90),
        duration_s=300,
        steps=[
            ScheduleStep(offset_s=0, mw=1.0),
            ScheduleStep(offset_s=60, mw=2.0),
            ScheduleStep(offset_s=120, mw=3.0),
        ],
    )
    request = to_request(control, NOW)
    assert request.start_at == NOW and request.duration_s == 210
    assert request.steps == [ScheduleStep(offset_s=0, mw=2.0), ScheduleStep(offset_s=30, mw=3.0)]
    assert (
        to_request(msgspec_replace(control, start_at=None, steps=None, mw=1.0), NOW).start_at == NOW
    )


@pytest.mark.parametrize(
    ("control", "why"),
    [
        (ProgramDispatch(external_id="e", asset_id="a"), "neither mw nor steps"),
        (
            ProgramDispatch(external_id="e", asset_id="a", mw=1, start_at=datetime(2026, 12, 7)),
            "has no time zone",
        ),
        (
            ProgramDispatch(
                external_id="e",
                asset_id="a",
                mw=1,
                start_at=NOW - timedelta(hours=2),
                duration_s=60,
            ),
            r"ended at 2026-12-07T10:01:00\+00:00",
        ),
    ],
)
def test_a_control_that_cannot_be_a_schedule_is_refused(control: ProgramDispatch, why: str) -> None:
    with pytest.raises(ProgramRefusedError, match=why) as caught:
        to_request(control, NOW)
    assert caught.value.kind == "invalid"


def test_the_fingerprint_tells_a_repeat_from_a_change() -> None:
    control = ProgramDispatch(external_id="e", asset_id="a", mw=1.0, start_at=NOW)
    assert control_fingerprint(control) == control_fingerprint(
        ProgramDispatch(external_id="e", asset_id="a", mw=1.0, start_at=NOW)
    )
    assert control_fingerprint(control) != control_fingerprint(msgspec_replace(control, mw=1.1))


def msgspec_replace(control: ProgramDispatch, **changes: object) -> ProgramDispatch:
    return msgspec.structs.replace(control, **changes)
