"""A :class:`~der_sdk.extensions.ConditionReporter` that queues changes for someone to
take: the agent gives one to each adapter and drains it into its durable outbox; tests
give one to an adapter they build by hand and look at what it reported.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Final, Literal, get_args

import msgspec

from der_sdk.extensions import ConditionReporter, ConditionSeverity
from der_sdk.models import utc_now

__all__ = ["CONDITION_CLEARED", "CONDITION_RAISED", "ConditionChange", "ConditionQueue"]

CONDITION_RAISED: Final = "condition_raised"
"""The event kind of a condition that became active."""
CONDITION_CLEARED: Final = "condition_cleared"
"""The event kind of a condition that ended."""

_SEVERITIES = frozenset(get_args(ConditionSeverity))


class ConditionChange(msgspec.Struct, frozen=True, kw_only=True):
    """A condition raised or cleared, as the reporter queued it.

    ``severity`` of a clear is the severity the condition was raised with.
    """

    kind: Literal["condition_raised", "condition_cleared"]
    code: str
    severity: ConditionSeverity
    text: str
    ts: datetime

    @property
    def message(self) -> str:
        """The event's message: the text, else what happened to which code."""
        if self.text:
            return self.text
        return f"{self.code} {'raised' if self.kind == CONDITION_RAISED else 'cleared'}"


class ConditionQueue(ConditionReporter):
    """Keeps the active conditions and queues every change until :meth:`drain`.

    :param notify: called (synchronously) after each queued change, for a drainer to wake.
    :param clock: the time of each change.
    :raises ValueError: from :meth:`raise_condition` for an empty code or an unknown
        severity: a programming error of the adapter, named at the call.
    """

    def __init__(
        self,
        *,
        notify: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._notify = notify
        self._clock = clock
        self._active: dict[str, ConditionSeverity] = {}
        self._queued: list[ConditionChange] = []

    @property
    def active(self) -> dict[str, ConditionSeverity]:
        """The active conditions: code → severity, in the order they were raised."""
        return dict(self._active)

    def raise_condition(self, code: str, severity: ConditionSeverity, text: str) -> None:
        if not code:
            raise ValueError("raise_condition: code must be a non-empty string")
        if severity not in _SEVERITIES:
            raise ValueError(
                f"raise_condition({code!r}): severity must be one of "
                f"{', '.join(sorted(_SEVERITIES))}, got {severity!r}"
            )
        if code in self._active:
            return
        self._active[code] = severity
        self._queue(CONDITION_RAISED, code, severity, text)

    def clear_condition(self, code: str, text: str = "") -> None:
        severity = self._active.pop(code, None)
        if severity is None:
            return
        self._queue(CONDITION_CLEARED, code, severity, text)

    def drain(self) -> list[ConditionChange]:
        """The queued changes, oldest first; the queue is empty afterwards."""
        changes, self._queued = self._queued, []
        return changes

    def restore(self, changes: list[ConditionChange]) -> None:
        """Put back ``changes`` from :meth:`drain` that the drainer could not take after
        all (it was cancelled), ahead of anything queued since."""
        if changes:
            self._queued[:0] = changes
            if self._notify is not None:
                self._notify()

    def _queue(
        self,
        kind: Literal["condition_raised", "condition_cleared"],
        code: str,
        severity: ConditionSeverity,
        text: str,
    ) -> None:
        self._queued.append(
            ConditionChange(kind=kind, code=code, severity=severity, text=text, ts=self._clock())
        )
        if self._notify is not None:
            self._notify()
