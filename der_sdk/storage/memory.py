"""The in-memory storage backend (``memory://``): plain dicts and lists, for tests.

Records are deep-copied on the way in and out, so a caller that mutates a returned (or
saved) object sees the same behaviour as with a real database: nothing changes until it
is saved again.
"""

from __future__ import annotations

import copy
from bisect import bisect_left
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from datetime import UTC, datetime
from itertools import islice
from typing import Generic, TypeVar

import msgspec

from der_sdk.extensions import StorageBackendType
from der_sdk.models import (
    Alarm,
    AlarmSeverity,
    AlarmState,
    Dispatch,
    DispatchEvent,
    Event,
    Heartbeat,
    Session,
    TelemetrySample,
)
from der_sdk.plugins import hookimpl
from der_sdk.storage.contract import (
    EXPORT_PAGE_ROWS,
    AlarmUpdate,
    AlarmWrite,
    StorageBackend,
    TelemetryChanges,
    check_page_size,
    checked_alarm_update,
)

__all__ = ["MemoryStorage", "der_storage_backends"]

R = TypeVar("R")


def _utc(value: datetime) -> datetime:
    """``value`` in UTC; naive datetimes are refused (the contract stores aware UTC only)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"storage needs timezone-aware datetimes, got naive {value!r}")
    return value.astimezone(UTC)


def _copies(rows: Iterable[R], limit: int) -> list[R]:
    """Copies of the first ``limit`` of ``rows`` (none when ``limit`` is not positive)."""
    return [copy.deepcopy(row) for row in islice(rows, max(limit, 0))]


class _TimeSeries(Generic[R]):
    """Rows of one asset keyed by unique timestamp, kept sorted for half-open range scans."""

    def __init__(self) -> None:
        self.keys: list[datetime] = []
        self.rows: list[R] = []

    def add(self, ts: datetime, row: R) -> bool:
        """Insert ``row`` at ``ts`` unless that timestamp is taken; True when inserted."""
        index = bisect_left(self.keys, ts)
        if index < len(self.keys) and self.keys[index] == ts:
            return False
        self.keys.insert(index, ts)
        self.rows.insert(index, row)
        return True

    def newest_first(self, start: datetime | None, end: datetime | None) -> Iterable[R]:
        low = 0 if start is None else bisect_left(self.keys, _utc(start))
        high = len(self.keys) if end is None else bisect_left(self.keys, _utc(end))
        return reversed(self.rows[low:high])

    def latest(self) -> R | None:
        return self.rows[-1] if self.rows else None


class MemoryStorage(StorageBackend):
    """Everything in process memory; lost when the process ends. The test backend."""

    name = "memory"

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._telemetry: dict[str, _TimeSeries[TelemetrySample]] = {}
        # Every stored sample in the order it was stored: the storage order of
        # telemetry_changes (a cursor is an index into this list).
        self._stored: list[TelemetrySample] = []
        self._exporter_cursors: dict[str, str] = {}
        self._heartbeats: dict[str, _TimeSeries[Heartbeat]] = {}
        self._dispatches: dict[str, Dispatch] = {}
        self._dispatch_events: list[DispatchEvent] = []
        self._sessions: dict[str, Session] = {}
        self._events: list[Event] = []
        self._alarms: dict[str, Alarm] = {}
        self._live_alarms: dict[tuple[str, str], str] = {}  # (asset, code) → alarm id
        self._alarm_events: set[str] = set()

    @classmethod
    def from_url(cls, url: str) -> MemoryStorage:
        """A new, empty store; anything after ``memory://`` is ignored."""
        return cls()

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        self._clear()

    # ------------------------------------------------------------------ telemetry

    async def append_telemetry(self, samples: Sequence[TelemetrySample]) -> int:
        # Validate the whole batch first so a bad sample stores nothing (atomic batch).
        stored = [
            msgspec.structs.replace(copy.deepcopy(sample), ts=_utc(sample.ts)) for sample in samples
        ]
        added = 0
        for sample in stored:
            series = self._telemetry.setdefault(sample.asset_id, _TimeSeries())
            if series.add(sample.ts, sample):
                added += 1
                self._stored.append(sample)
        return added

    async def telemetry_history(
        self,
        asset_id: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[TelemetrySample]:
        series = self._telemetry.get(asset_id)
        if series is None:
            return []
        return _copies(series.newest_first(start, end), limit)

    async def latest_telemetry(self) -> dict[str, TelemetrySample]:
        latest: dict[str, TelemetrySample] = {}
        for asset_id, series in self._telemetry.items():
            sample = series.latest()
            if sample is not None:
                latest[asset_id] = copy.deepcopy(sample)
        return latest

    async def telemetry_pages(
        self,
        start: datetime,
        end: datetime,
        *,
        site_id: str | None = None,
        asset_id: str | None = None,
        page_size: int = EXPORT_PAGE_ROWS,
    ) -> AsyncIterator[list[TelemetrySample]]:
        check_page_size(page_size)
        low, high = _utc(start), _utc(end)
        after: tuple[datetime, str] | None = None
        while True:
            # Keyset paging, as a database would: each page is found afresh after the
            # last row of the one before, so appends meanwhile are fine.
            found = sorted(
                (sample.ts, sample.asset_id)
                for series in self._telemetry.values()
                for sample in series.newest_first(low, high)
                if (asset_id is None or sample.asset_id == asset_id)
                and (site_id is None or sample.site_id == site_id)
                and (after is None or (sample.ts, sample.asset_id) > after)
            )[:page_size]
            if not found:
                return
            page = [
                copy.deepcopy(self._telemetry[a].rows[bisect_left(self._telemetry[a].keys, ts)])
                for ts, a in found
            ]
            yield page
            if len(found) < page_size:
                return
            after = found[-1]

    async def telemetry_changes(self, after: str | None, limit: int) -> TelemetryChanges:
        first = 0 if after is None else int(after)
        found = _copies(self._stored[first : first + max(limit, 0)], limit)
        if not found:
            return TelemetryChanges([], after)
        return TelemetryChanges(found, str(first + len(found)))

    async def exporter_cursor(self, name: str) -> str | None:
        return self._exporter_cursors.get(name)

    async def save_exporter_cursor(self, name: str, cursor: str) -> None:
        self._exporter_cursors[name] = cursor

    # ------------------------------------------------------------------ dispatch

    async def save_dispatch(self, dispatch: Dispatch) -> None:
        self._dispatches[dispatch.dispatch_id] = msgspec.structs.replace(
            copy.deepcopy(dispatch),
            created_at=_utc(dispatch.created_at),
            updated_at=_utc(dispatch.updated_at),
        )

    async def get_dispatch(self, dispatch_id: str) -> Dispatch | None:
        return copy.deepcopy(self._dispatches.get(dispatch_id))

    async def dispatch_history(
        self,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        state: str | None = None,
        limit: int = 100,
    ) -> list[Dispatch]:
        def matches(dispatch: Dispatch) -> bool:
            if asset_id is not None and not (
                dispatch.asset_id == asset_id
                or any(target.asset_id == asset_id for target in dispatch.targets)
            ):
                return False
            if site_id is not None and dispatch.site_id != site_id:
                return False
            return state is None or dispatch.state == state

        found = sorted(
            filter(matches, self._dispatches.values()),
            key=lambda d: (d.created_at, d.dispatch_id),
            reverse=True,
        )
        return _copies(found, limit)

    async def record_dispatch_event(self, event: DispatchEvent) -> None:
        self._dispatch_events.append(
            msgspec.structs.replace(copy.deepcopy(event), ts=_utc(event.ts))
        )

    async def dispatch_events(self, dispatch_id: str) -> list[DispatchEvent]:
        found = [e for e in self._dispatch_events if e.dispatch_id == dispatch_id]
        found.sort(key=lambda e: e.ts)  # stable: equal times keep recording order
        return [copy.deepcopy(e) for e in found]

    # ------------------------------------------------------------------ presence

    async def open_session(self, session: Session) -> None:
        disconnected_at = session.disconnected_at
        self._sessions[session.session_id] = msgspec.structs.replace(
            copy.deepcopy(session),
            connected_at=_utc(session.connected_at),
            disconnected_at=None if disconnected_at is None else _utc(disconnected_at),
        )

    async def close_session(self, session_id: str, disconnected_at: datetime) -> None:
        session = self._sessions.get(session_id)
        if session is not None and session.disconnected_at is None:
            session.disconnected_at = _utc(disconnected_at)

    async def close_open_sessions(
        self, disconnected_at: datetime, headend_id: str | None = None
    ) -> int:
        when = _utc(disconnected_at)
        closed = 0
        for session in self._sessions.values():
            if session.disconnected_at is None and (
                headend_id is None or session.headend_id in (headend_id, None)
            ):
                session.disconnected_at = when
                closed += 1
        return closed

    async def recent_sessions(self, asset_id: str, limit: int = 5) -> list[Session]:
        found = sorted(
            (s for s in self._sessions.values() if s.asset_id == asset_id),
            key=lambda s: (s.connected_at, s.session_id),
            reverse=True,
        )
        return _copies(found, limit)

    async def append_heartbeats(self, heartbeats: Sequence[Heartbeat]) -> None:
        stored = [
            msgspec.structs.replace(copy.deepcopy(beat), ts=_utc(beat.ts)) for beat in heartbeats
        ]
        for beat in stored:
            self._heartbeats.setdefault(beat.asset_id, _TimeSeries()).add(beat.ts, beat)

    async def latest_heartbeat(self, asset_id: str) -> Heartbeat | None:
        series = self._heartbeats.get(asset_id)
        return None if series is None else copy.deepcopy(series.latest())

    async def heartbeat_history(
        self,
        asset_id: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[Heartbeat]:
        series = self._heartbeats.get(asset_id)
        if series is None:
            return []
        return _copies(series.newest_first(start, end), limit)

    # ------------------------------------------------------------------ events

    async def append_event(self, event: Event) -> None:
        self._events.append(msgspec.structs.replace(copy.deepcopy(event), ts=_utc(event.ts)))

    async def events(
        self,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        kind: str | None = None,
        exclude_kinds: Collection[str] = (),
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[Event]:
        low = _utc(start) if start is not None else None
        high = _utc(end) if end is not None else None

        def matching(event: Event) -> bool:
            return (
                (asset_id is None or event.asset_id == asset_id)
                and (site_id is None or event.site_id == site_id)
                and (kind is None or event.kind == kind)
                and event.kind not in exclude_kinds
                and (low is None or event.ts >= low)
                and (high is None or event.ts < high)
            )

        # Walk newest recorded first, then a stable sort: equal times list the later first.
        found = sorted(filter(matching, reversed(self._events)), key=lambda e: e.ts, reverse=True)
        return _copies(found, limit)

    # ------------------------------------------------------------------ alarms

    async def update_alarm(
        self,
        asset_id: str,
        code: str,
        update: AlarmUpdate,
        *,
        event_id: str | None = None,
    ) -> AlarmWrite | None:
        if event_id is not None and event_id in self._alarm_events:
            return None
        live_id = self._live_alarms.get((asset_id, code))
        live = self._alarms.get(live_id) if live_id is not None else None
        new = update(copy.deepcopy(live))
        checked_alarm_update(asset_id, code, new)
        if event_id is not None:
            self._alarm_events.add(event_id)
        if new is None:
            return None
        stored = _utc_alarm(new)
        self._alarms[stored.alarm_id] = stored
        self._live_alarms[(asset_id, code)] = stored.alarm_id
        return AlarmWrite(copy.deepcopy(live), copy.deepcopy(stored))

    async def acknowledge_alarm(
        self, alarm_id: str, acknowledged_at: datetime, acknowledged_by: str
    ) -> tuple[Alarm, bool] | None:
        alarm = self._alarms.get(alarm_id)
        if alarm is None:
            return None
        if alarm.acknowledged_at is not None:
            return copy.deepcopy(alarm), False
        at = _utc(acknowledged_at)
        alarm.acknowledged_at, alarm.acknowledged_by, alarm.updated_at = at, acknowledged_by, at
        return copy.deepcopy(alarm), True

    async def get_alarm(self, alarm_id: str) -> Alarm | None:
        return copy.deepcopy(self._alarms.get(alarm_id))

    async def alarms(
        self,
        *,
        state: AlarmState | None = None,
        severity: AlarmSeverity | None = None,
        site_id: str | None = None,
        asset_id: str | None = None,
        code: str | None = None,
        acknowledged: bool | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Alarm]:
        def matches(alarm: Alarm) -> bool:
            return (
                (state is None or alarm.state == state)
                and (severity is None or alarm.severity == severity)
                and (site_id is None or alarm.site_id == site_id)
                and (asset_id is None or alarm.asset_id == asset_id)
                and (code is None or alarm.code == code)
                and (acknowledged is None or (alarm.acknowledged_at is not None) == acknowledged)
            )

        found = sorted(
            filter(matches, self._alarms.values()),
            key=lambda a: (a.raised_at, a.alarm_id),
            reverse=True,
        )
        if after is not None:
            cursor = self._alarms.get(after)
            if cursor is None:
                return []
            key = (cursor.raised_at, cursor.alarm_id)
            found = [a for a in found if (a.raised_at, a.alarm_id) < key]
        return _copies(found, limit)

    async def active_alarm_counts(self) -> dict[AlarmSeverity, int]:
        counts: dict[AlarmSeverity, int] = {}
        for alarm in self._alarms.values():
            if alarm.state == "active":
                counts[alarm.severity] = counts.get(alarm.severity, 0) + 1
        return counts


def _utc_alarm(alarm: Alarm) -> Alarm:
    """A copy of ``alarm`` with every time in UTC (naive times refused)."""

    def utc(value: datetime | None) -> datetime | None:
        return None if value is None else _utc(value)

    return msgspec.structs.replace(
        copy.deepcopy(alarm),
        raised_at=_utc(alarm.raised_at),
        cleared_at=utc(alarm.cleared_at),
        acknowledged_at=utc(alarm.acknowledged_at),
        updated_at=utc(alarm.updated_at),
    )


@hookimpl
def der_storage_backends() -> list[StorageBackendType]:
    return [
        StorageBackendType(
            name="memory",
            schemes=("memory",),
            factory=MemoryStorage.from_url,
            description="In-process memory, lost at exit; for tests and demos (memory://).",
        )
    ]
