"""The headend's alarm book: agent condition events and acknowledgements in, stored
alarms and ``der_alarm_changed`` notifications out (docs/alarms.md).

Every change goes through :meth:`~der_sdk.storage.contract.StorageBackend.update_alarm`,
which is atomic per ``(asset, code)`` (across the replicas of a cluster too) and records
the agent event's id: an event the agent sends again until it is acknowledged, before or
after a restart of either side, changes an alarm once.

**Notifications are de-bounced** like the record: ``raised``, ``updated`` and
``acknowledged`` are told at once; ``cleared`` only once the alarm has stayed cleared for
the de-bounce time, and a re-raise within it tells nothing (the clear it follows was never
told). A condition flapping a hundred times a second is one ``raised`` and, when it
settles cleared, one ``cleared``. A clear still waiting when the headend stops is not told.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import datetime

from der_sdk.inventory import Inventory
from der_sdk.models import ALARM_SEVERITIES, Alarm, AlarmSeverity, Event, utc_now
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import StorageBackend
from der_sdk_headend.alarms.state import (
    CONDITION_CLEARED,
    CONDITION_RAISED,
    AlarmChangeKind,
    Condition,
    apply_condition,
    change_kind,
)

__all__ = ["DEFAULT_DEBOUNCE_S", "MAX_CODE_LENGTH", "AlarmBook"]

log = logging.getLogger("der.headend.alarms")

DEFAULT_DEBOUNCE_S = 10.0
"""``HEADEND_ALARM_DEBOUNCE_S``: a raise this soon after the clear re-activates the alarm."""
MAX_CODE_LENGTH = 100
"""The longest condition code kept as an alarm (longer ones are logged and left out)."""


class AlarmBook:
    """Applies conditions and acknowledgements to the stored alarms and tells plugins.

    :param debounce_s: the de-bounce window of records and notifications.
    """

    def __init__(
        self,
        storage: StorageBackend,
        plugins: Plugins,
        inventory: Inventory,
        *,
        debounce_s: float = DEFAULT_DEBOUNCE_S,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._storage = storage
        self._plugins = plugins
        self._inventory = inventory
        self.debounce_s = debounce_s
        self._clock = clock
        self._clears: dict[str, asyncio.TimerHandle] = {}  # alarm id → its told-later clear
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Forget clears not told yet; wait for notifications in flight."""
        for handle in self._clears.values():
            handle.cancel()
        self._clears.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ changes

    async def on_event(self, event: Event) -> None:
        """Apply a stored agent event if it is a condition (called by ingest before the
        event is stored and acknowledged; a storage error raises, and the event is tried
        again)."""
        if event.kind not in (CONDITION_RAISED, CONDITION_CLEARED):
            return
        condition = self._condition_of(event)
        if condition is None:
            return
        event_id = event.data.get("event_id")
        await self.apply(condition, event_id=event_id if isinstance(event_id, str) else None)

    async def apply(self, condition: Condition, *, event_id: str | None = None) -> Alarm | None:
        """Apply ``condition``; the alarm stored, or ``None`` when nothing changed (or
        ``event_id`` was applied before)."""
        now = self._clock()
        new_id = uuid.uuid4().hex

        def update(live: Alarm | None) -> Alarm | None:
            return apply_condition(
                live, condition, debounce_s=self.debounce_s, now=now, new_id=new_id
            )

        write = await self._storage.update_alarm(
            condition.asset_id, condition.code, update, event_id=event_id
        )
        if write is None:
            return None
        kind = change_kind(write.before, write.after)
        log.info(
            "alarm %s %s: asset %s, code %s, %s (raised %d times): %s",
            write.after.alarm_id,
            kind,
            write.after.asset_id,
            write.after.code,
            write.after.severity,
            write.after.raise_count,
            write.after.text,
        )
        self._changed(write.after, kind)
        return write.after

    async def acknowledge(self, alarm_id: str, by: str) -> tuple[Alarm, bool] | None:
        """Acknowledge alarm ``alarm_id`` as ``by``; the alarm and whether this call
        acknowledged it, or ``None`` for an unknown id."""
        result = await self._storage.acknowledge_alarm(alarm_id, self._clock(), by)
        if result is not None and result[1]:
            self._changed(result[0], "acknowledged")
        return result

    def _condition_of(self, event: Event) -> Condition | None:
        """The condition an agent event reports, or ``None`` (logged) when it names no
        served asset or its code or severity is not one."""
        code, severity = event.data.get("code"), event.data.get("severity")
        problem = None
        asset = self._inventory.assets.get(event.asset_id or "")
        if asset is None:
            problem = "it names no asset its agent serves"
        elif not isinstance(code, str) or not 0 < len(code) <= MAX_CODE_LENGTH:
            problem = f"data.code {code!r} is not a string of 1 to {MAX_CODE_LENGTH} characters"
        elif event.kind == CONDITION_RAISED and severity not in ALARM_SEVERITIES:
            problem = f"data.severity {severity!r} is not one of {', '.join(ALARM_SEVERITIES)}"
        if problem is not None or asset is None or not isinstance(code, str):
            log.warning(
                "%s event %s from agent %s: no alarm: %s",
                event.kind,
                event.data.get("event_id"),
                event.data.get("agent_id"),
                problem,
            )
            return None
        valid: AlarmSeverity = severity if severity in ALARM_SEVERITIES else "major"
        return Condition(
            asset_id=asset.asset_id,
            site_id=asset.site_id,
            code=code,
            active=event.kind == CONDITION_RAISED,
            at=event.ts,
            severity=valid,
            text="" if event.message in (event.kind, code) else event.message,
        )

    # ------------------------------------------------------------------ notifications

    def _changed(self, alarm: Alarm, kind: AlarmChangeKind) -> None:
        if kind == "cleared":
            self._tell_clear_later(alarm.alarm_id)
            return
        if kind == "reraised":
            handle = self._clears.pop(alarm.alarm_id, None)
            if handle is not None:  # the clear was never told: nothing changed for them
                handle.cancel()
                return
        self._plugins.notify("der_alarm_changed", alarm=alarm, change=kind)

    def _tell_clear_later(self, alarm_id: str) -> None:
        old = self._clears.pop(alarm_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._clears[alarm_id] = loop.call_later(self.debounce_s, self._clear_due, alarm_id)

    def _clear_due(self, alarm_id: str) -> None:
        self._clears.pop(alarm_id, None)
        task = asyncio.create_task(self._tell_clear(alarm_id), name=f"alarm-clear-{alarm_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tell_clear(self, alarm_id: str) -> None:
        try:
            alarm = await self._storage.get_alarm(alarm_id)
        except Exception as exc:
            log.warning("alarm %s: its clear is not told: %s", alarm_id, exc)
            return
        if alarm is not None and alarm.state == "cleared":
            self._plugins.notify("der_alarm_changed", alarm=alarm, change="cleared")
