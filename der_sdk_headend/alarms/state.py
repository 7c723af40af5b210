"""The rules of an alarm's life, as pure functions (docs/alarms.md).

One live alarm per ``(asset_id, code)``:

* a **raise** with no live alarm opens one (``raised``); while it is active, a raise
  changes nothing unless it brings another severity or text (``updated``); after it
  cleared, a raise within the **de-bounce** window (``raised`` time minus ``cleared_at``
  at most ``debounce_s``) makes the same alarm active again and counts ``raise_count``
  up (``reraised``), a later raise opens a new alarm;
* a **clear** of an active alarm sets ``cleared_at`` (``cleared``); otherwise it changes
  nothing.

An acknowledgement survives a re-raise within the window: it is the same alarm.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import msgspec

from der_sdk.models import Alarm, AlarmSeverity

__all__ = [
    "COMMS_LOSS",
    "CONDITION_CLEARED",
    "CONDITION_RAISED",
    "AlarmChangeKind",
    "Condition",
    "apply_condition",
    "change_kind",
]

CONDITION_RAISED = "condition_raised"
"""The agent event kind of a device condition that became active."""
CONDITION_CLEARED = "condition_cleared"
"""The agent event kind of a device condition that ended."""
COMMS_LOSS = "comms_loss"
"""The code of the alarm the headend raises itself for an asset whose agent is away."""

AlarmChangeKind = Literal["raised", "reraised", "updated", "cleared", "acknowledged"]
"""What happened to an alarm, as ``der_alarm_changed`` reports it."""


@dataclass(frozen=True, slots=True)
class Condition:
    """A condition of an asset raised (``active``) or cleared, at ``at``."""

    asset_id: str
    site_id: str
    code: str
    active: bool
    at: datetime
    severity: AlarmSeverity = "major"
    text: str = ""


def apply_condition(
    live: Alarm | None,
    condition: Condition,
    *,
    debounce_s: float,
    now: datetime,
    new_id: str,
) -> Alarm | None:
    """The alarm to store after ``condition`` given the ``live`` one, or ``None`` when
    nothing changes. ``new_id`` names an alarm this opens; ``now`` is ``updated_at``."""
    if not condition.active:
        if live is None or live.state != "active":
            return None
        return msgspec.structs.replace(
            live, state="cleared", cleared_at=condition.at, updated_at=now
        )
    text = condition.text or default_text(condition)
    if live is not None and live.state == "active":
        if (live.severity, live.text) == (condition.severity, text):
            return None
        return msgspec.structs.replace(live, severity=condition.severity, text=text, updated_at=now)
    if (
        live is not None
        and live.cleared_at is not None
        and condition.at - live.cleared_at <= timedelta(seconds=debounce_s)
    ):
        return msgspec.structs.replace(
            live,
            state="active",
            cleared_at=None,
            severity=condition.severity,
            text=text,
            raise_count=live.raise_count + 1,
            updated_at=now,
        )
    return Alarm(
        alarm_id=new_id,
        asset_id=condition.asset_id,
        site_id=condition.site_id,
        code=condition.code,
        severity=condition.severity,
        text=text,
        state="active",
        raised_at=condition.at,
        raise_count=1,
        updated_at=now,
    )


def default_text(condition: Condition) -> str:
    """The text of a condition raised without one."""
    return f"{condition.code} raised"


def change_kind(before: Alarm | None, after: Alarm) -> AlarmChangeKind:
    """What a stored change did, from the live alarm before and the record after."""
    if before is None or before.alarm_id != after.alarm_id:
        return "raised"
    if before.state == "active" and after.state == "cleared":
        return "cleared"
    if before.state == "cleared" and after.state == "active":
        return "reraised"
    return "updated"
