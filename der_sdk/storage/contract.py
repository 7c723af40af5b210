"""The storage contract every backend implements.

Conventions that hold for every backend (the conformance suite checks them):

* Times are aware UTC datetimes; backends return them aware and in UTC.
* Ranges are **half-open**: ``start`` is inclusive, ``end`` is exclusive. Either may be
  ``None`` (unbounded).
* History queries return **newest first**, at most ``limit`` rows.
* Telemetry is **idempotent**: the dedupe key is ``(asset_id, ts)``. Re-appending a sample
  with the same asset and timestamp stores nothing new.
* Methods are coroutines and never block the event loop.
* Alarms: one *live* alarm per ``(asset_id, code)``, changed only through
  :meth:`StorageBackend.update_alarm`, atomically, also across the processes of a
  :attr:`~StorageBackend.shared` backend; an agent event applied once is never applied
  again (its ``event_id`` is kept).
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from der_sdk.errors import DerSdkError
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

if TYPE_CHECKING:
    from der_sdk.plugins import Plugins

__all__ = [
    "ALARM_COLUMNS",
    "DEFAULT_DATABASE_URL",
    "EXPORT_PAGE_ROWS",
    "OLD_EVENTS_WINDOW",
    "TELEMETRY_COLUMNS",
    "AlarmUpdate",
    "AlarmWrite",
    "ExporterLease",
    "ExporterLeaseLostError",
    "StorageBackend",
    "TelemetryChanges",
    "alarm_conditions",
    "check_page_size",
    "checked_alarm_update",
    "close_sessions_left_open",
    "filtered_events",
    "open_storage",
]

log = logging.getLogger("der.storage")

DEFAULT_DATABASE_URL = "sqlite:///der-data/der.db"
"""The embedded default: SQLite in ``./der-data/der.db`` relative to the working directory."""

TELEMETRY_COLUMNS: tuple[str, ...] = (
    "asset_id",
    "site_id",
    "ts",
    "mw",
    "mw_setpoint",
    "online",
    "status",
    "fault_code",
    "seq",
    "quality",
    "quality_reason",
    "details",
)
"""The telemetry table's columns in SQL backends, in this order: one per
:class:`~der_sdk.models.TelemetrySample` field, with the same names."""

ALARM_COLUMNS = (
    "alarm_id, asset_id, site_id, code, severity, text, state, raised_at, cleared_at,"
    " acknowledged_at, acknowledged_by, raise_count, updated_at"
)
"""The alarm table's columns in SQL backends, for ``SELECT``: one per
:class:`~der_sdk.models.Alarm` field, with the same names, in field order."""


def alarm_conditions(
    placeholder: Callable[[int], str],
    *,
    state: str | None = None,
    severity: str | None = None,
    site_id: str | None = None,
    asset_id: str | None = None,
    code: str | None = None,
    acknowledged: bool | None = None,
    after: str | None = None,
) -> tuple[list[str], list[object]]:
    """The ``WHERE`` conditions and parameters of :meth:`StorageBackend.alarms` for a
    SQL backend over a table with :data:`ALARM_COLUMNS` named ``alarms``.

    :param placeholder: the parameter marker of the n-th parameter (1-based): ``?`` for
        SQLite, ``$n`` for PostgreSQL.
    """
    conditions: list[str] = []
    params: list[object] = []
    for column, value in (
        ("state", state),
        ("severity", severity),
        ("site_id", site_id),
        ("asset_id", asset_id),
        ("code", code),
    ):
        if value is not None:
            params.append(value)
            conditions.append(f"{column} = {placeholder(len(params))}")
    if acknowledged is not None:
        conditions.append(f"acknowledged_at IS {'NOT ' if acknowledged else ''}NULL")
    if after is not None:
        params.append(after)
        conditions.append(
            "(raised_at, alarm_id) < (SELECT raised_at, alarm_id FROM alarms"
            f" WHERE alarm_id = {placeholder(len(params))})"
        )
    return conditions, params


AlarmUpdate = Callable[[Alarm | None], Alarm | None]
"""What :meth:`StorageBackend.update_alarm` applies: given the live alarm of an
``(asset_id, code)`` (``None`` when there is none), the record to store, or ``None`` to
store nothing. A pure function of its argument: it may run on a storage thread."""


class AlarmWrite(NamedTuple):
    """An alarm change that was stored: the live alarm before (``None``: there was none)
    and the record stored."""

    before: Alarm | None
    after: Alarm


class TelemetryChanges(NamedTuple):
    """What :meth:`StorageBackend.telemetry_changes` read: samples in storage order and
    the cursor after the last of them (the ``after`` of the next call)."""

    samples: list[TelemetrySample]
    cursor: str | None
    """Opaque to callers; ``None`` only when nothing was ever read (no samples and no
    ``after`` given)."""


class ExporterLeaseLostError(DerSdkError):
    """An :class:`ExporterLease` was lost (its holder's connection to a shared storage
    broke): another process may own the exporter now, so its holder stops exporting."""


class ExporterLease:
    """Exclusive ownership of the continuous exporter ``name``, from
    :meth:`StorageBackend.exporter_lease` until :meth:`release` or until it is lost.

    While a process holds the lease of a name, no other process using the same storage
    gets it, so exactly one replica of a cluster exports under that name. The holder
    calls :meth:`check` before each batch and saves the batch's cursor through
    :meth:`save_cursor`; both raise :class:`ExporterLeaseLostError` once the lease is
    lost, and the holder then stops exporting and reads the cursor again when it holds
    the lease next.

    This base class is the lease of a backend one process owns (memory, SQLite): never
    lost, and :meth:`save_cursor` is :meth:`StorageBackend.save_exporter_cursor`. A
    :attr:`~StorageBackend.shared` backend subclasses it. Since 0.4.
    """

    def __init__(self, storage: StorageBackend, name: str) -> None:
        self.storage = storage
        self.name = name

    async def check(self) -> None:
        """Confirm the lease is still held (PostgreSQL: a query on the connection that
        holds its lock).

        :raises ExporterLeaseLostError: it is not; it stays lost.
        """

    async def save_cursor(self, cursor: str) -> None:
        """Save ``cursor`` as the exporter's position (as
        :meth:`StorageBackend.save_exporter_cursor`), only while the lease is held.

        :raises ExporterLeaseLostError: the lease is lost; the cursor was not saved by
            this call (whether an interrupted save reached storage is for the next
            holder to read).
        """
        await self.storage.save_exporter_cursor(self.name, cursor)

    async def release(self) -> None:
        """Give the lease up (another process may take it at once). Idempotent; never
        raises."""


EXPORT_PAGE_ROWS = 5_000
"""Default rows per page of :meth:`StorageBackend.telemetry_pages`."""


def check_page_size(page_size: int) -> None:
    """:raises ValueError: ``page_size`` of :meth:`StorageBackend.telemetry_pages` is not
    at least 1."""
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")


class StorageBackend(abc.ABC):
    """The async storage contract of the headend."""

    #: Short name shown in logs and ``/healthz`` (``memory``, ``sqlite``, ``postgresql``).
    name: str = "storage"

    #: How many ``append_telemetry`` calls may usefully run at once. The headend runs
    #: ``min(INGEST_WRITERS, this)`` telemetry writers; 1 (the default) for a backend with
    #: one connection, such as SQLite, where a second writer would only queue.
    concurrent_writes: int = 1

    #: Whether several headend processes may use this storage at once (the replicas of
    #: a cluster, docs/cluster.md): their writes are safe together and each sees the
    #: others'. ``False`` for an embedded database (memory, SQLite).
    shared: bool = False

    #: Whether writes are stored in the order they were called: a call made on the event
    #: loop while an earlier one is still running is stored after it (SQLite: every
    #: write is queued on the one connection's thread when it is called). The dispatcher
    #: then hands each record to storage at once instead of waiting for the one before
    #: it to be stored. ``False`` for a pool of connections (PostgreSQL).
    ordered_writes: bool = False

    # ------------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    async def open(self) -> None:
        """Called once at headend start: connect, create or migrate the schema."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Called once at shutdown; flushes anything pending."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Delete all stored data of this project (``RESET_DB``), keeping the schema."""

    async def healthy(self) -> bool:
        """Whether the backend can serve requests now (``/healthz``). Default: True."""
        return True

    # ------------------------------------------------------------------ telemetry

    @abc.abstractmethod
    async def append_telemetry(self, samples: Sequence[TelemetrySample]) -> int:
        """Store a batch of samples; called by ingest for every batch.

        Each sample is stored at most once (duplicates by ``(asset_id, ts)`` are skipped),
        and the batch counts as stored only when the call returns: ingest acknowledges
        the agents then. A backend may commit a long batch in parts (the SQLite backend
        does, so a dispatch's record need not wait for all of it); a call that raised may
        have stored part of its batch, and ingest retries the whole batch, which stores
        the rest.

        :return: how many samples were new (duplicates by ``(asset_id, ts)`` are skipped).
        """

    @abc.abstractmethod
    async def telemetry_history(
        self,
        asset_id: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[TelemetrySample]:
        """Samples of one asset with ``start <= ts < end``, newest first, at most ``limit``."""

    @abc.abstractmethod
    async def latest_telemetry(self) -> dict[str, TelemetrySample]:
        """The newest stored sample of every asset, by asset id (to warm caches at start)."""

    async def telemetry_pages(
        self,
        start: datetime,
        end: datetime,
        *,
        site_id: str | None = None,
        asset_id: str | None = None,
        page_size: int = EXPORT_PAGE_ROWS,
    ) -> AsyncIterator[list[TelemetrySample]]:
        """Every sample with ``start <= ts < end`` (of one site or asset when given), in
        pages of at most ``page_size``, oldest first: the range export
        (``der export``, ``GET /telemetry/export``) reads history through this, holding
        one page at a time.

        The built-in backends order by ``(ts, asset_id)`` and read with keyset paging
        (SQLite, memory) or a server-side cursor (PostgreSQL). This default, for a
        backend written before 0.4, reads the assets that :meth:`latest_telemetry` knows
        one after another through :meth:`telemetry_history` (each asset oldest first).
        Since 0.4.
        """
        check_page_size(page_size)
        latest = await self.latest_telemetry()
        assets = sorted(
            a
            for a, newest in latest.items()
            if asset_id in (None, a) and site_id in (None, newest.site_id)
        )
        for asset in assets:
            upper = end
            pages: list[list[TelemetrySample]] = []
            while True:
                found = await self.telemetry_history(asset, start, upper, limit=page_size)
                if not found:
                    break
                pages.append(found[::-1])
                upper = found[-1].ts
                if len(found) < page_size:
                    break
            for page in reversed(pages):
                kept = [s for s in page if site_id is None or s.site_id == site_id]
                if kept:
                    yield kept

    async def telemetry_changes(self, after: str | None, limit: int) -> TelemetryChanges:
        """Samples stored after the cursor ``after`` (``None``: from the first one
        stored), in storage order, at most ``limit``; the continuous exporters
        (``der_exporters``) read through this from their cursor.

        The order is the order samples became visible: a sample that becomes visible
        later never sorts before one already returned, so a reader that resumes from the
        returned cursor misses none and sees none twice. A backend where concurrent
        writers commit out of order holds samples back until every earlier writer has
        finished (PostgreSQL: the transaction snapshot's ``xmin``). Since 0.4.

        :raises NotImplementedError: the backend has no storage order (written before
            0.4); continuous exporters cannot run on it.
        """
        raise NotImplementedError(
            f"storage {self.name} ({type(self).__module__}) has no telemetry_changes(); "
            "continuous exporters need der-sdk 0.4 storage"
        )

    async def exporter_cursor(self, name: str) -> str | None:
        """The cursor exporter ``name`` stored last (:meth:`save_exporter_cursor`), or
        ``None``. Since 0.4.

        :raises NotImplementedError: as :meth:`telemetry_changes`.
        """
        raise NotImplementedError(
            f"storage {self.name} ({type(self).__module__}) keeps no exporter cursors; "
            "continuous exporters need der-sdk 0.4 storage"
        )

    async def save_exporter_cursor(self, name: str, cursor: str) -> None:
        """Store ``cursor`` as exporter ``name``'s position, durably, replacing the one
        before. Since 0.4.

        :raises NotImplementedError: as :meth:`telemetry_changes`.
        """
        raise NotImplementedError(
            f"storage {self.name} ({type(self).__module__}) keeps no exporter cursors; "
            "continuous exporters need der-sdk 0.4 storage"
        )

    async def exporter_lease(self, name: str) -> ExporterLease | None:
        """Try to take exclusive ownership of the continuous exporter ``name``: the
        :class:`ExporterLease` when this process now holds it, ``None`` when another
        process does (try again later). Never waits for the other holder.

        A :attr:`shared` backend grants a name to one process at a time (PostgreSQL: a
        session-level advisory lock on a connection of its own, held with the lease; the
        server releases it when that connection ends, which loses the lease). The
        default, for backends one process owns, always grants it. Since 0.4.
        """
        return ExporterLease(self, name)

    # ------------------------------------------------------------------ dispatch

    @abc.abstractmethod
    async def save_dispatch(self, dispatch: Dispatch) -> None:
        """Insert or replace a dispatch record (by ``dispatch_id``) with its targets."""

    @abc.abstractmethod
    async def get_dispatch(self, dispatch_id: str) -> Dispatch | None:
        """One dispatch record, or ``None``."""

    @abc.abstractmethod
    async def dispatch_history(
        self,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        state: str | None = None,
        limit: int = 100,
    ) -> list[Dispatch]:
        """Dispatches, newest ``created_at`` first, filtered by target and state.

        ``asset_id`` matches a per-asset dispatch to the asset or a site dispatch with a
        target for it; ``site_id`` matches the dispatch's ``site_id``.
        """

    @abc.abstractmethod
    async def record_dispatch_event(self, event: DispatchEvent) -> None:
        """Append one lifecycle state change of a dispatch."""

    async def record_dispatch(self, dispatch: Dispatch, event: DispatchEvent) -> None:
        """Save ``dispatch`` and append its lifecycle ``event`` together.

        The dispatcher records every state change through this. The default calls
        :meth:`save_dispatch`, then :meth:`record_dispatch_event`; a backend that can do
        both in one transaction (one round trip) should, since it is on the path of
        every dispatch.
        """
        await self.save_dispatch(dispatch)
        await self.record_dispatch_event(event)

    async def record_dispatches(
        self, records: Sequence[tuple[Dispatch, DispatchEvent]], events: Sequence[Event] = ()
    ) -> None:
        """:meth:`record_dispatch` for each of ``records``, in order, and append
        ``events`` (the audit records of those changes), all stored together.

        The dispatcher writes what several changes recorded at once (a new dispatch and
        its audit record; an acknowledgement that came while the previous change was
        being written) through this. The default makes one call per record and event; a
        backend that can write them all in one transaction (one round trip) should. A
        dispatch may appear more than once: the later record wins, every event is kept.
        """
        for dispatch, event in records:
            await self.record_dispatch(dispatch, event)
        for operator_event in events:
            await self.append_event(operator_event)

    def dispatch_lock(self, dispatch_id: str) -> AbstractAsyncContextManager[None]:
        """Hold ``dispatch_id`` against changes by other headend processes.

        A :attr:`shared` backend serialises the read, change and :meth:`record_dispatch`
        of one dispatch across every process that uses it (PostgreSQL: an advisory lock),
        so two replicas acknowledging targets of one site dispatch never overwrite each
        other's change. The default, for backends one process owns, holds nothing: the
        dispatcher's own lock serialises that process.
        """
        return contextlib.nullcontext()

    @abc.abstractmethod
    async def dispatch_events(self, dispatch_id: str) -> list[DispatchEvent]:
        """A dispatch's state changes, oldest first."""

    # ------------------------------------------------------------------ presence

    @abc.abstractmethod
    async def open_session(self, session: Session) -> None:
        """Record an asset's session at register time."""

    @abc.abstractmethod
    async def close_session(self, session_id: str, disconnected_at: datetime) -> None:
        """Set ``disconnected_at`` of an open session (no-op if unknown or closed)."""

    @abc.abstractmethod
    async def close_open_sessions(
        self, disconnected_at: datetime, headend_id: str | None = None
    ) -> int:
        """Close sessions left open by a previous run (called at headend start).

        :param disconnected_at: what the closed sessions get as ``disconnected_at``.
        :param headend_id: since 0.2. Given, close only the open sessions of that headend
            (``Session.headend_id``) and those with no headend id (written before headends
            had ids), and leave other headends' open sessions alone. ``None`` closes every
            open session.
        :return: how many sessions were closed.
        """

    @abc.abstractmethod
    async def recent_sessions(self, asset_id: str, limit: int = 5) -> list[Session]:
        """An asset's sessions, newest ``connected_at`` first."""

    @abc.abstractmethod
    async def append_heartbeats(self, heartbeats: Sequence[Heartbeat]) -> None:
        """Store heartbeats (one per served asset per agent heartbeat)."""

    @abc.abstractmethod
    async def latest_heartbeat(self, asset_id: str) -> Heartbeat | None:
        """The newest heartbeat of an asset, or ``None``."""

    @abc.abstractmethod
    async def heartbeat_history(
        self,
        asset_id: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[Heartbeat]:
        """Heartbeats of one asset with ``start <= ts < end``, newest first."""

    # ------------------------------------------------------------------ events

    @abc.abstractmethod
    async def append_event(self, event: Event) -> None:
        """Record an operator-visible event (refused registration, validation problem...)."""

    @abc.abstractmethod
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
        """Events, newest first (equal times: the later recorded first), optionally
        filtered: every given filter must hold. ``start`` is inclusive, ``end`` exclusive;
        ``exclude_kinds`` leaves out events of those kinds.

        ``site_id``, ``exclude_kinds``, ``start`` and ``end`` are new in der-sdk 0.2 (for
        ``GET /events``); the headend calls a backend without them through
        :func:`filtered_events`."""

    # ------------------------------------------------------------------ alarms

    @abc.abstractmethod
    async def update_alarm(
        self,
        asset_id: str,
        code: str,
        update: AlarmUpdate,
        *,
        event_id: str | None = None,
    ) -> AlarmWrite | None:
        """Change the live alarm of ``(asset_id, code)``, atomically: no other change of
        it (from this process or, for a :attr:`shared` backend, any other) runs between
        the read and the write.

        ``update`` is called once with the live alarm (``None`` when there is none) and
        returns the record to store or ``None``. A record with the live alarm's
        ``alarm_id`` replaces it; one with a new ``alarm_id`` becomes the live alarm, and
        the one before stays in the record as history.

        :param event_id: the agent event that caused the change. It is recorded as
            applied in the same transaction, also when ``update`` stores nothing; an
            ``event_id`` recorded before makes this a no-op (``update`` is not called).
        :return: what was stored, or ``None`` when nothing was. Since 0.3.
        """

    @abc.abstractmethod
    async def acknowledge_alarm(
        self, alarm_id: str, acknowledged_at: datetime, acknowledged_by: str
    ) -> tuple[Alarm, bool] | None:
        """Acknowledge an alarm (live or not) unless it is already acknowledged; also sets
        ``updated_at`` to ``acknowledged_at``.

        :return: the alarm after, and whether this call acknowledged it (``False``: it was
            acknowledged before, and keeps who and when); ``None`` for an unknown id.
            Since 0.3.
        """

    @abc.abstractmethod
    async def get_alarm(self, alarm_id: str) -> Alarm | None:
        """One alarm, or ``None``. Since 0.3."""

    @abc.abstractmethod
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
        """Alarms, newest ``raised_at`` first (then ``alarm_id`` descending), filtered.

        :param acknowledged: ``True`` keeps acknowledged alarms, ``False`` the others.
        :param after: an ``alarm_id``: list only what comes after it in this order (the
            next page). An unknown id lists nothing.
        Since 0.3.
        """

    @abc.abstractmethod
    async def active_alarm_counts(self) -> dict[AlarmSeverity, int]:
        """How many alarms are active, by severity (severities with none may be left
        out). Since 0.3."""


def checked_alarm_update(asset_id: str, code: str, new: Alarm | None) -> None:
    """Refuse what an :data:`AlarmUpdate` returned for ``(asset_id, code)`` when it is for
    another asset or code; every backend calls this before it stores the record.

    :raises ValueError: naming what differs.
    """
    if new is None:
        return
    if (new.asset_id, new.code) != (asset_id, code):
        raise ValueError(
            f"update_alarm({asset_id!r}, {code!r}): the update returned an alarm of asset "
            f"{new.asset_id!r}, code {new.code!r}"
        )


def open_storage(url: str, plugins: Plugins) -> StorageBackend:
    """Create (not open) the backend for ``url`` through the ``der_storage_backends`` hook.

    :raises der_sdk.errors.UnknownNameError: no installed backend handles the URL scheme.
    """
    return plugins.storage_for_url(url).factory(url)


async def close_sessions_left_open(
    storage: StorageBackend, disconnected_at: datetime, headend_id: str | None
) -> int:
    """Close the sessions that headend ``headend_id`` left open (and those with no headend
    id), or every open session when ``headend_id`` is ``None``, through
    :meth:`StorageBackend.close_open_sessions`; called at headend start.

    A backend written before ``close_open_sessions`` took ``headend_id`` keeps working: it
    is called without it, which closes every headend's open sessions, and a warning says
    so.
    """
    parameters = inspect.signature(storage.close_open_sessions).parameters
    takes_id = "headend_id" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    if headend_id is None:
        return await storage.close_open_sessions(disconnected_at)
    if takes_id:
        return await storage.close_open_sessions(disconnected_at, headend_id=headend_id)
    log.warning(
        "storage %s (%s) has a close_open_sessions without headend_id (der-sdk 0.1): "
        "closing every headend's open sessions, other headends' on the same storage "
        "included; upgrade the storage plugin",
        storage.name,
        type(storage).__module__,
    )
    return await storage.close_open_sessions(disconnected_at)


_EVENT_FILTERS_SINCE_0_2 = ("site_id", "exclude_kinds", "start", "end")
OLD_EVENTS_WINDOW = 10_000
"""How many of the newest events are searched on a backend without the 0.2 filters."""


async def filtered_events(
    storage: StorageBackend,
    *,
    asset_id: str | None = None,
    site_id: str | None = None,
    kind: str | None = None,
    exclude_kinds: Collection[str] = (),
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = 100,
) -> list[Event]:
    """:meth:`StorageBackend.events` with every filter, on any backend.

    A backend written before ``events`` took ``site_id``, ``exclude_kinds``, ``start``
    and ``end`` keeps working: the newest :data:`OLD_EVENTS_WINDOW` events of the asset
    and kind are fetched and the other filters applied here (older events are not
    found), and a warning says so.
    """
    parameters = inspect.signature(storage.events).parameters
    if all(name in parameters for name in _EVENT_FILTERS_SINCE_0_2) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        return await storage.events(
            asset_id=asset_id,
            site_id=site_id,
            kind=kind,
            exclude_kinds=exclude_kinds,
            start=start,
            end=end,
            limit=limit,
        )
    log.warning(
        "storage %s (%s) has an events() without site_id, exclude_kinds, start and end "
        "(der-sdk 0.1): searching the newest %d events only; upgrade the storage plugin",
        storage.name,
        type(storage).__module__,
        OLD_EVENTS_WINDOW,
    )
    window = await storage.events(asset_id=asset_id, kind=kind, limit=OLD_EVENTS_WINDOW)
    found = [
        e
        for e in window
        if (site_id is None or e.site_id == site_id)
        and e.kind not in exclude_kinds
        and (start is None or e.ts >= start)
        and (end is None or e.ts < end)
    ]
    return found[: max(limit, 0)]
