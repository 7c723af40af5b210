"""The dispatcher: turns a :class:`DispatchRequest` into a routed :class:`Dispatch`.

Rules (``docs/headend.md`` has the operator's version):

* ``asset_id`` wins over ``site_id``. A per-asset dispatch has one target, clamped to the
  asset's ``[min_mw, max_mw]``. A site dispatch is split over the site's inventory assets
  by the configured split policy; what no asset can take is reported as
  ``unallocated_mw``.
* A newer dispatch supersedes the older *pending* targets for the same assets.
* Routing: a per-asset target whose asset is live gets a ``Setpoint`` on that stream.
  A site dispatch whose assets are all served by one live stream gets one site
  ``Setpoint`` (the agent splits); otherwise each live target gets its own per-asset
  ``Setpoint`` (``command_id = "<dispatch_id>/<asset_id>"``) and the rest stay pending.
* Pending targets are delivered when an agent serving them registers, unless the
  dispatch's ``duration_s`` has already run out (then they expire).
* ``SetpointAck`` updates the targets (from its allocations, or its status for a
  per-asset command) and so the dispatch's state.
* A ``LocalDispatch`` (a command an edge service applied at the agent, e.g. a SCADA write
  to its OPC UA server) is recorded as a dispatch with source ``local``, already in its
  final state; nothing is routed. The agent applies commands in arrival order, so the
  last one to reach it, local or from here, is in force (``docs/opcua.md``).

Every state change is saved and recorded as a :class:`DispatchEvent`. Storage is the
record; the dispatcher keeps an in-memory index of the dispatches still open. One lock
serialises all changes, so an acknowledgement never races the save of the send it
acknowledges.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.inventory import Inventory
from der_sdk.models import (
    TERMINAL_DISPATCH_STATES,
    Asset,
    Dispatch,
    DispatchEvent,
    DispatchRequest,
    DispatchState,
    DispatchTarget,
    utc_now,
)
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import StorageBackend
from der_sdk.wire import codec, pb
from der_sdk_headend.observers import notify
from der_sdk_headend.presence import AgentStream, Presence

__all__ = [
    "DispatchError",
    "Dispatcher",
    "InvalidDispatchError",
    "UnknownTargetError",
    "derive_state",
]

log = logging.getLogger("der.headend.dispatch")

_ACK_STATES: frozenset[str] = frozenset({"applied", "rejected", "failed"})
_FINAL_ORDER: tuple[DispatchState, ...] = ("failed", "rejected", "superseded", "expired")
_OPEN_LIMIT = 10_000
"""How many pending dispatches are reloaded from storage at start."""


class DispatchError(DerSdkError):
    """A dispatch request was refused; the message says why."""


class InvalidDispatchError(DispatchError):
    """The request is malformed (REST: 400)."""


class UnknownTargetError(DispatchError):
    """The asset or site is not in the inventory (REST: 404)."""


def derive_state(targets: Sequence[DispatchTarget]) -> DispatchState:
    """A dispatch's state from its targets.

    Any pending → ``pending``; else any sent → ``sent``; else all applied → ``applied``;
    else the first of failed, rejected, superseded, expired that is present.
    """
    states = {t.state for t in targets}
    if "pending" in states:
        return "pending"
    if "sent" in states:
        return "sent"
    if states == {"applied"}:
        return "applied"
    for state in _FINAL_ORDER:
        if state in states:
            return state
    return "failed"


def _fmt(mw: float) -> str:
    return f"{mw:g}"


class Dispatcher:
    """Creates, routes and tracks dispatches."""

    def __init__(
        self,
        inventory: Inventory,
        plugins: Plugins,
        storage: StorageBackend,
        presence: Presence,
        policy_name: str,
    ) -> None:
        self._inventory = inventory
        self._plugins = plugins
        self._storage = storage
        self._presence = presence
        self._policy = plugins.split_policies.get(policy_name)
        self._open: dict[str, Dispatch] = {}
        self._lock = asyncio.Lock()

    @property
    def policy_name(self) -> str:
        return self._policy.name

    def open_dispatches(self) -> list[Dispatch]:
        """Copies of the dispatches still open (pending or awaiting acknowledgement)."""
        return [copy.deepcopy(d) for d in self._open.values()]

    async def load_open(self) -> int:
        """Reload pending dispatches from storage (at start, before agents connect)."""
        stored = await self._storage.dispatch_history(state="pending", limit=_OPEN_LIMIT)
        self._open = {d.dispatch_id: d for d in sorted(stored, key=lambda d: d.created_at)}
        return len(self._open)

    # ------------------------------------------------------------------ create

    async def create(self, request: DispatchRequest, source: str = "rest") -> Dispatch:
        """Validate, split and clamp ``request``, route it, and record it.

        :return: a snapshot of the new dispatch record.
        :raises InvalidDispatchError: no target, a non-finite ``mw`` or a bad
            ``duration_s``.
        :raises UnknownTargetError: the asset or site is not in the inventory.
        """
        dispatch = self._build(request, source)
        notify(self._plugins, "der_dispatch_validated", dispatch=copy.deepcopy(dispatch))
        async with self._lock:
            await self._supersede_pending(dispatch)
            route = self._route_new(dispatch)
            dispatch.state = derive_state(dispatch.targets)
            await self._record(dispatch, f"created by {source}; {route}")
            self._index(dispatch)
            self._log_created(dispatch, route)
            return copy.deepcopy(dispatch)

    def _build(self, request: DispatchRequest, source: str) -> Dispatch:
        if not math.isfinite(request.mw):
            raise InvalidDispatchError(f"mw must be a finite number of MW, got {request.mw}")
        if request.duration_s is not None and not (
            math.isfinite(request.duration_s) and request.duration_s > 0
        ):
            raise InvalidDispatchError(
                f"duration_s must be a positive number of seconds, got {request.duration_s}"
            )
        now = utc_now()
        dispatch = Dispatch(
            dispatch_id=str(uuid.uuid4()),
            mw=request.mw,
            state="pending",
            created_at=now,
            updated_at=now,
            duration_s=request.duration_s,
            source=source,
        )
        if request.asset_id:
            asset = self._asset(request.asset_id)
            if request.site_id and request.site_id != asset.site_id:
                log.info(
                    "dispatch for asset %s also names site %s; asset_id wins",
                    asset.asset_id,
                    request.site_id,
                )
            target = asset.clamp(request.mw)
            reason = None
            if target != request.mw:
                reason = f"clamped to [{_fmt(asset.min_mw)}, {_fmt(asset.max_mw)}]"
            dispatch.asset_id = asset.asset_id
            dispatch.site_id = asset.site_id
            dispatch.targets = [DispatchTarget(asset_id=asset.asset_id, mw=target, reason=reason)]
            dispatch.reason = reason
            return dispatch
        if request.site_id:
            site_id = self._site_id(request.site_id)
            assets = self._inventory.assets_for_site(site_id)
            if not assets:
                raise InvalidDispatchError(f"site {site_id} has no assets in the inventory")
            try:
                split = self._policy.split(request.mw, assets)
            except ValueError as exc:
                raise InvalidDispatchError(f"site {site_id}: {exc}") from exc
            dispatch.site_id = site_id
            dispatch.policy = self._policy.name
            dispatch.targets = [
                DispatchTarget(asset_id=asset_id, mw=mw) for asset_id, mw in split.shares.items()
            ]
            dispatch.unallocated_mw = split.unallocated_mw
            if split.unallocated_mw:
                dispatch.reason = (
                    f"{_fmt(split.unallocated_mw)} MW could not be placed within the limits "
                    f"of site {site_id}'s assets"
                )
            return dispatch
        raise InvalidDispatchError("give asset_id or site_id: the dispatch has no target")

    def _asset(self, asset_id: str) -> Asset:
        try:
            return self._inventory.asset(asset_id)
        except UnknownNameError:
            raise UnknownTargetError(f"unknown asset {asset_id}") from None

    def _site_id(self, site_id: str) -> str:
        try:
            return self._inventory.site(site_id).site_id
        except UnknownNameError:
            raise UnknownTargetError(f"unknown site {site_id}") from None

    async def _supersede_pending(self, newer: Dispatch) -> None:
        assets = {t.asset_id for t in newer.targets}
        for older in list(self._open.values()):
            replaced = [t for t in older.targets if t.state == "pending" and t.asset_id in assets]
            if not replaced:
                continue
            for target in replaced:
                target.state = "superseded"
                target.reason = f"superseded by dispatch {newer.dispatch_id}"
            older.state = derive_state(older.targets)
            names = ", ".join(t.asset_id for t in replaced)
            await self._record(
                older, f"pending targets for {names} superseded by dispatch {newer.dispatch_id}"
            )
            self._index(older)
            log.info(
                "dispatch %s: pending targets for %s superseded by %s (now %s)",
                older.dispatch_id,
                names,
                newer.dispatch_id,
                older.state,
            )

    # ------------------------------------------------------------------ routing

    def _route_new(self, dispatch: Dispatch) -> str:
        """Send what can be sent now; return a sentence saying what happened."""
        if dispatch.asset_id is not None:
            target = dispatch.targets[0]
            stream = self._presence.stream_for(target.asset_id)
            if stream is None:
                return f"asset {target.asset_id} offline, kept pending"
            self._send_to_asset(stream, target, dispatch.dispatch_id, dispatch.duration_s)
            return f"sent to {stream.describe()}"

        assert dispatch.site_id is not None
        site_assets = [a.asset_id for a in self._inventory.assets_for_site(dispatch.site_id)]
        streams = {self._presence.stream_for(a) for a in site_assets}
        if len(streams) == 1:
            (stream,) = streams
            if stream is not None:
                self._send_to_site(stream, dispatch, dispatch.duration_s)
                return f"one site setpoint sent to {stream.describe()}"
        sent: list[str] = []
        for target in dispatch.targets:
            stream = self._presence.stream_for(target.asset_id)
            if stream is not None:
                command_id = f"{dispatch.dispatch_id}/{target.asset_id}"
                self._send_to_asset(stream, target, command_id, dispatch.duration_s)
                sent.append(target.asset_id)
        pending = len(dispatch.targets) - len(sent)
        return f"per-asset setpoints sent to {len(sent)} live asset(s), {pending} kept pending"

    def _send_to_asset(
        self,
        stream: AgentStream,
        target: DispatchTarget,
        command_id: str,
        duration_s: float | None,
    ) -> None:
        stream.send(
            codec.headend_setpoint(
                command_id, target.mw, asset_id=target.asset_id, duration_s=duration_s
            )
        )
        target.state = "sent"

    def _send_to_site(
        self, stream: AgentStream, dispatch: Dispatch, duration_s: float | None
    ) -> None:
        stream.send(
            codec.headend_setpoint(
                dispatch.dispatch_id, dispatch.mw, site_id=dispatch.site_id, duration_s=duration_s
            )
        )
        for target in dispatch.targets:
            target.state = "sent"

    async def deliver_pending(self, stream: AgentStream) -> int:
        """Send the pending targets ``stream`` serves (called when an agent registers).

        :return: how many dispatches were delivered.
        """
        delivered = 0
        async with self._lock:
            now = utc_now()
            for dispatch in sorted(self._open.values(), key=lambda d: d.created_at):
                waiting = [
                    t
                    for t in dispatch.targets
                    if t.state == "pending" and stream.serves(t.asset_id)
                ]
                if not waiting:
                    continue
                remaining = _remaining_s(dispatch, now)
                if remaining is not None and remaining <= 0:
                    for target in waiting:
                        target.state = "expired"
                        target.reason = (
                            f"its duration of {_fmt(dispatch.duration_s or 0)} s ran out"
                        )
                    dispatch.state = derive_state(dispatch.targets)
                    await self._record(dispatch, "expired before its asset connected")
                    self._index(dispatch)
                    log.info("dispatch %s expired before delivery", dispatch.dispatch_id)
                    continue
                how = self._deliver(stream, dispatch, waiting, remaining)
                dispatch.state = derive_state(dispatch.targets)
                await self._record(dispatch, f"{how} on register of {stream.describe()}")
                self._index(dispatch)
                log.info(
                    "dispatch %s: %s on register of %s",
                    dispatch.dispatch_id,
                    how,
                    stream.describe(),
                )
                delivered += 1
        return delivered

    def _deliver(
        self,
        stream: AgentStream,
        dispatch: Dispatch,
        waiting: list[DispatchTarget],
        duration_s: float | None,
    ) -> str:
        if dispatch.asset_id is None and dispatch.site_id is not None:
            site_assets = self._inventory.assets_for_site(dispatch.site_id)
            whole_site = all(stream.serves(a.asset_id) for a in site_assets) and all(
                t.state == "pending" for t in dispatch.targets
            )
            if whole_site:
                self._send_to_site(stream, dispatch, duration_s)
                return "pending site setpoint delivered"
            for target in waiting:
                command_id = f"{dispatch.dispatch_id}/{target.asset_id}"
                self._send_to_asset(stream, target, command_id, duration_s)
            return f"pending setpoints for {len(waiting)} asset(s) delivered"
        for target in waiting:
            self._send_to_asset(stream, target, dispatch.dispatch_id, duration_s)
        return "pending setpoint delivered"

    # ------------------------------------------------------------------ acknowledgements

    async def on_ack(self, stream: AgentStream, ack: pb.SetpointAck) -> None:
        """Apply an agent's ``SetpointAck`` to the dispatch it acknowledges."""
        dispatch_id, _, asset_part = ack.command_id.partition("/")
        async with self._lock:
            dispatch = self._open.get(dispatch_id) or await self._storage.get_dispatch(dispatch_id)
            if dispatch is None:
                log.warning(
                    "acknowledgement from %s for unknown command %r ignored",
                    stream.describe(),
                    ack.command_id,
                )
                return
            status = _ack_state(ack.status)
            reason = ack.reason if ack.HasField("reason") else None
            if ack.status not in _ACK_STATES:
                reason = reason or f"the agent reported an unknown status {ack.status!r}"
            allocations = codec.allocations_from_pb(ack)
            if allocations:
                for allocation in allocations:
                    target = _target(dispatch, allocation.asset_id)
                    if target is None:
                        log.warning(
                            "acknowledgement of %s from %s names asset %s, which is not a "
                            "target of the dispatch; ignored",
                            ack.command_id,
                            stream.describe(),
                            allocation.asset_id,
                        )
                        continue
                    state = _ack_state(allocation.status)
                    _settle(target, state, allocation.mw, allocation.reason or reason)
            else:
                if asset_part:
                    targets = [t for t in [_target(dispatch, asset_part)] if t is not None]
                elif dispatch.asset_id is not None:
                    targets = [t for t in [_target(dispatch, dispatch.asset_id)] if t is not None]
                else:
                    targets = [t for t in dispatch.targets if t.state == "sent"]
                single = len(targets) == 1
                for target in targets:
                    _settle(target, status, ack.applied_mw if single else None, reason)
            dispatch.state = derive_state(dispatch.targets)
            if reason and status != "applied":
                dispatch.reason = reason
            detail = f"{status} by agent {stream.agent_id} (command {ack.command_id})"
            if status == "applied":
                detail += f", {_fmt(ack.applied_mw)} MW applied"
            if reason:
                detail += f": {reason}"
            await self._record(dispatch, detail)
            self._index(dispatch)
            log.info("dispatch %s: %s; now %s", dispatch.dispatch_id, detail, dispatch.state)

    async def record_local(
        self, stream: AgentStream, report: codec.LocalDispatchReport
    ) -> Dispatch | None:
        """Record a command the agent on ``stream`` applied locally (``LocalDispatch``).

        The agent already validated, split, clamped and applied it: the record (source
        ``local``, final state, one lifecycle event) is for the dispatch history. Idempotent
        by ``command_id``, which becomes the dispatch id: an agent sends a report again until
        it is acknowledged. Allocations for assets the stream does not serve are left out.

        :return: a snapshot of the new record; ``None`` when the command was already
            recorded or names an asset the stream does not serve (logged).
        """
        async with self._lock:
            if not report.command_id:
                log.warning("%s reported a local command without an id; ignored", stream.describe())
                return None
            if await self._storage.get_dispatch(report.command_id) is not None:
                return None
            asset_id, site_id = report.asset_id, report.site_id
            if asset_id:
                with contextlib.suppress(UnknownNameError):
                    asset_id = self._inventory.asset(asset_id).asset_id
                if not stream.serves(asset_id):
                    log.warning(
                        "%s reported local command %s for asset %s, which it does not serve; "
                        "not recorded",
                        stream.describe(),
                        report.command_id,
                        asset_id,
                    )
                    return None
                site_id = stream.site_id
            elif site_id:
                with contextlib.suppress(UnknownNameError):
                    site_id = self._inventory.site(site_id).site_id
            targets: list[DispatchTarget] = []
            for allocation in report.allocations:
                if not stream.serves(allocation.asset_id):
                    log.warning(
                        "local command %s from %s names asset %s, which the stream does not "
                        "serve; left out",
                        report.command_id,
                        stream.describe(),
                        allocation.asset_id,
                    )
                    continue
                state = _ack_state(allocation.status)
                targets.append(
                    DispatchTarget(
                        asset_id=allocation.asset_id,
                        mw=allocation.mw,
                        state=state,
                        applied_mw=allocation.mw if state == "applied" else None,
                        reason=allocation.reason,
                    )
                )
            now = utc_now()
            dispatch = Dispatch(
                dispatch_id=report.command_id,
                mw=report.mw,
                state=derive_state(targets) if targets else _ack_state(report.status),
                created_at=min(report.ts, now),  # an agent clock ahead of ours
                updated_at=now,
                asset_id=asset_id,
                site_id=site_id,
                duration_s=report.duration_s,
                targets=targets,
                unallocated_mw=report.unallocated_mw,
                policy=report.policy,
                source="local",
                reason=report.reason,
            )
            applied = math.fsum(t.mw for t in targets if t.state == "applied")
            detail = (
                f"{dispatch.state} locally by agent {stream.agent_id} "
                f"(command {report.command_id}), {_fmt(applied)} MW applied"
            )
            if report.reason:
                detail += f": {report.reason}"
            await self._record(dispatch, detail)
            log.info("dispatch %s (local): %s", dispatch.dispatch_id, detail)
            return copy.deepcopy(dispatch)

    async def on_stream_end(self, stream: AgentStream) -> None:
        """Forget sent dispatches that can no longer be acknowledged on a live stream.

        They stay ``sent`` in storage (the agent may have applied them); a late
        acknowledgement is still matched through storage.
        """
        async with self._lock:
            for dispatch in list(self._open.values()):
                if any(t.state == "pending" for t in dispatch.targets):
                    continue
                live = any(
                    t.state == "sent" and self._presence.stream_for(t.asset_id) is not None
                    for t in dispatch.targets
                )
                if not live:
                    del self._open[dispatch.dispatch_id]

    # ------------------------------------------------------------------ record

    async def _record(self, dispatch: Dispatch, detail: str) -> None:
        now = utc_now()
        dispatch.updated_at = now
        await self._storage.save_dispatch(dispatch)
        await self._storage.record_dispatch_event(
            DispatchEvent(
                dispatch_id=dispatch.dispatch_id, state=dispatch.state, ts=now, detail=detail
            )
        )

    def _index(self, dispatch: Dispatch) -> None:
        if dispatch.state in TERMINAL_DISPATCH_STATES:
            self._open.pop(dispatch.dispatch_id, None)
        else:
            self._open[dispatch.dispatch_id] = dispatch

    def _log_created(self, dispatch: Dispatch, route: str) -> None:
        if dispatch.asset_id is not None:
            asset = self._inventory.assets[dispatch.asset_id]
            target = dispatch.targets[0]
            log.info(
                "dispatch %s: asset %s (%s) target %s MW (requested %s, limits [%s, %s]%s); "
                "%s; state %s",
                dispatch.dispatch_id,
                asset.asset_id,
                asset.name,
                _fmt(target.mw),
                _fmt(dispatch.mw),
                _fmt(asset.min_mw),
                _fmt(asset.max_mw),
                ", clamped" if target.reason else "",
                route,
                dispatch.state,
            )
            return
        shares = ", ".join(f"{t.asset_id}={_fmt(t.mw)}" for t in dispatch.targets)
        log.info(
            "dispatch %s: site %s %s MW split by %s into [%s], unallocated %s MW; %s; state %s",
            dispatch.dispatch_id,
            dispatch.site_id,
            _fmt(dispatch.mw),
            dispatch.policy,
            shares,
            _fmt(dispatch.unallocated_mw),
            route,
            dispatch.state,
        )


def _remaining_s(dispatch: Dispatch, now: datetime) -> float | None:
    if dispatch.duration_s is None:
        return None
    ends = dispatch.created_at + timedelta(seconds=dispatch.duration_s)
    return (ends - now).total_seconds()


def _ack_state(status: str) -> DispatchState:
    if status in _ACK_STATES:
        return status  # type: ignore[return-value]
    return "failed"


def _target(dispatch: Dispatch, asset_id: str) -> DispatchTarget | None:
    for target in dispatch.targets:
        if target.asset_id == asset_id:
            return target
    return None


def _settle(
    target: DispatchTarget, state: DispatchState, applied_mw: float | None, reason: str | None
) -> None:
    if target.state in ("superseded", "expired"):
        return
    target.state = state
    target.applied_mw = applied_mw if state == "applied" else None
    if reason is not None:
        target.reason = reason
