"""The dispatcher: turns a :class:`DispatchRequest` into a routed :class:`Dispatch`.

Rules (``docs/headend.md`` has the operator's version):

* ``asset_id`` wins over ``site_id``. A per-asset dispatch has one target, clamped to the
  asset's ``[min_mw, max_mw]``. A site dispatch is split over the site's inventory assets
  by the configured split policy; what no asset can take is reported as
  ``unallocated_mw``.
* Lifecycle, forward only: ``submitted`` (recorded, its agent offline) → ``sent`` (pushed
  down the stream) → ``acked`` (the agent recorded it in its journal) → one final state:
  ``applied``, ``rejected``, ``failed``, ``expired`` or ``superseded``. A change to an
  earlier or equal state is ignored. Every change is a timestamped :class:`DispatchEvent`.
* A newer dispatch supersedes the older *submitted* targets for the same assets.
* Expiry (``expires_at``, or ``ttl_s`` from creation): a submitted target whose expiry
  passes becomes ``expired`` and is never sent. A sent one carries the time left
  (``expires_in_ms``) and the agent refuses to apply it later, reporting ``expired``.
* Bounds: ``duration_s`` and ``ttl_s`` are more than 0 and at most
  :data:`~der_sdk.models.DISPATCH_HORIZON_S` (one year); ``expires_at`` is after now and
  at most that long after it. A request outside them is refused (``InvalidDispatchError``).
  An open record outside them (stored by a version without the bounds) is settled
  ``failed`` when the dispatcher loads it at start: its dates cannot be computed with.
* ``Idempotency-Key``: the key fixes the dispatch id, so a retried request returns the
  record it created; the same key with a different request is refused.
* Routing: a per-asset target whose asset is live gets a ``Setpoint`` on that stream.
  A site dispatch whose assets are all served by one live stream gets one site
  ``Setpoint`` (the agent splits); otherwise each live target gets its own per-asset
  ``Setpoint`` (``command_id = "<dispatch_id>/<asset_id>"``) and the rest stay submitted.
* Submitted targets are delivered when an agent serving them registers, unless the
  dispatch expired or its ``duration_s`` has already run out (then they expire). Targets
  still ``sent`` (the stream ended before the agent answered) are sent again with the same
  command id; the agent's journal makes sure it applies each command at most once and
  reports the outcome it recorded. Each dispatch is delivered on its own: when building
  its commands fails, nothing of it is sent, its targets for that agent become ``failed``
  with the reason (logged once, as it is no longer open), and the agent still gets every
  other command.
* ``SetpointAck`` updates the targets (from its allocations, or its status for a
  per-asset command) and so the dispatch's state. A final status is answered with
  ``SetpointOutcomeAck`` once recorded, so the agent stops reporting it.
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
import hashlib
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec

from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.inventory import Inventory
from der_sdk.models import (
    DISPATCH_HORIZON_S,
    DISPATCH_STATE_RANK,
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
    "IDEMPOTENCY_NAMESPACE",
    "DispatchError",
    "Dispatcher",
    "IdempotencyConflictError",
    "InvalidDispatchError",
    "UnknownTargetError",
    "derive_state",
]

log = logging.getLogger("der.headend.dispatch")

_ACK_STATES: frozenset[str] = frozenset({"applied", "rejected", "failed", "expired"})
_FINAL_ORDER: tuple[DispatchState, ...] = ("failed", "rejected", "superseded", "expired")
_OPEN_STATES: tuple[DispatchState, ...] = ("submitted", "sent", "acked")
_OPEN_LIMIT = 10_000
"""How many open dispatches of each open state are reloaded from storage at start."""
_HORIZON = timedelta(seconds=DISPATCH_HORIZON_S)
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1c9a52-63b1-4c1e-9f5e-2d7f0b3f4a10")
"""Dispatch ids of idempotent requests are ``uuid5(IDEMPOTENCY_NAMESPACE, key)``."""
_fingerprint_encode = msgspec.json.Encoder(order="sorted").encode


class DispatchError(DerSdkError):
    """A dispatch request was refused; the message says why."""


class InvalidDispatchError(DispatchError):
    """The request is malformed (REST: 400)."""


class UnknownTargetError(DispatchError):
    """The asset or site is not in the inventory (REST: 404)."""


class IdempotencyConflictError(DispatchError):
    """The ``Idempotency-Key`` was used before for a different request (REST: 409)."""


def derive_state(targets: Sequence[DispatchTarget]) -> DispatchState:
    """A dispatch's state from its targets.

    Any submitted → ``submitted``; else any sent → ``sent``; else any acked → ``acked``;
    else all applied → ``applied``; else the first of failed, rejected, superseded,
    expired that is present.
    """
    states = {t.state for t in targets}
    for open_state in _OPEN_STATES:
        if open_state in states:
            return open_state
    if states == {"applied"}:
        return "applied"
    for state in _FINAL_ORDER:
        if state in states:
            return state
    return "failed"


def _fmt(mw: float) -> str:
    return f"{mw:g}"


@dataclass(slots=True)
class _Command:
    """One ``Setpoint`` built for a stream, and the targets it carries."""

    message: pb.HeadendMessage
    command_id: str
    targets: list[DispatchTarget]


@dataclass(slots=True)
class _Delivery:
    """What registering a stream does to one open dispatch, worked out before anything
    is sent, so a dispatch whose commands cannot be built sends nothing."""

    resend: list[_Command] = field(default_factory=list)
    resend_how: str = ""
    deliver: list[_Command] = field(default_factory=list)
    deliver_how: str = ""
    expire: list[DispatchTarget] = field(default_factory=list)
    expired_why: str = ""


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
        self._expiry_wake = asyncio.Event()
        self._expiry_task: asyncio.Task[None] | None = None

    @property
    def policy_name(self) -> str:
        return self._policy.name

    def open_dispatches(self) -> list[Dispatch]:
        """Copies of the dispatches still open (submitted or awaiting the agent)."""
        return [copy.deepcopy(d) for d in self._open.values()]

    async def load_open(self) -> int:
        """Reload open dispatches from storage (at start, before agents connect)."""
        stored: list[Dispatch] = []
        for state in _OPEN_STATES:
            stored += await self._storage.dispatch_history(state=state, limit=_OPEN_LIMIT)
        self._open = {d.dispatch_id: d for d in sorted(stored, key=lambda d: d.created_at)}
        for dispatch in list(self._open.values()):
            why = _out_of_bounds(dispatch)
            if why is not None:
                log.warning("dispatch %s: %s; settled failed", dispatch.dispatch_id, why)
                await self._settle_undeliverable(dispatch, dispatch.targets, why)
        return len(self._open)

    def start(self) -> None:
        """Start the task that expires submitted dispatches on time."""
        if self._expiry_task is None:
            self._expiry_task = asyncio.create_task(
                self._expiry_loop(), name="headend-dispatch-expiry"
            )

    async def close(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
            self._expiry_task = None

    # ------------------------------------------------------------------ create

    async def create(
        self,
        request: DispatchRequest,
        source: str = "rest",
        *,
        idempotency_key: str | None = None,
    ) -> Dispatch:
        """Validate, split and clamp ``request``, route it, and record it.

        :return: a snapshot of the new dispatch record (or, for a repeated
            ``idempotency_key``, of the record the first request created).
        :raises InvalidDispatchError: no target, a non-finite ``mw``, a bad
            ``duration_s``, ``ttl_s`` or ``expires_at``.
        :raises UnknownTargetError: the asset or site is not in the inventory.
        :raises IdempotencyConflictError: the key was used for a different request.
        """
        dispatch, _ = await self.submit(request, source, idempotency_key=idempotency_key)
        return dispatch

    async def submit(
        self,
        request: DispatchRequest,
        source: str = "rest",
        *,
        idempotency_key: str | None = None,
    ) -> tuple[Dispatch, bool]:
        """:meth:`create`, also saying whether a new dispatch was made (``False``: the
        ``idempotency_key`` was seen before and its record is returned)."""
        fingerprint = None
        if idempotency_key is not None:
            idempotency_key = _check_key(idempotency_key)
            fingerprint = hashlib.sha256(_fingerprint_encode(request)).hexdigest()
            async with self._lock:
                known = await self._storage.get_dispatch(_idempotent_id(idempotency_key))
            if known is not None:
                return self._replay(known, fingerprint), False
        dispatch = self._build(request, source)
        if idempotency_key is not None:
            dispatch.dispatch_id = _idempotent_id(idempotency_key)
            dispatch.idempotency_key = idempotency_key
            dispatch.request_fingerprint = fingerprint
        notify(self._plugins, "der_dispatch_validated", dispatch=copy.deepcopy(dispatch))
        async with self._lock:
            if idempotency_key is not None:  # a concurrent request with the same key
                known = await self._storage.get_dispatch(dispatch.dispatch_id)
                if known is not None:
                    return self._replay(known, fingerprint), False
            await self._supersede_submitted(dispatch)
            route = self._route_new(dispatch)
            dispatch.state = derive_state(dispatch.targets)
            await self._record(dispatch, f"created by {source}; {route}")
            self._index(dispatch)
            self._log_created(dispatch, route)
            if dispatch.expires_at is not None:
                self._expiry_wake.set()
            return copy.deepcopy(dispatch), True

    @staticmethod
    def _replay(known: Dispatch, fingerprint: str | None) -> Dispatch:
        if known.request_fingerprint != fingerprint:
            raise IdempotencyConflictError(
                f"Idempotency-Key {known.idempotency_key!r} was already used for dispatch "
                f"{known.dispatch_id} with a different request; use a new key for a new "
                "dispatch"
            )
        log.info(
            "dispatch %s: repeated request with Idempotency-Key %r; returning the record",
            known.dispatch_id,
            known.idempotency_key,
        )
        return known

    def _build(self, request: DispatchRequest, source: str) -> Dispatch:
        if not math.isfinite(request.mw):
            raise InvalidDispatchError(f"mw must be a finite number of MW, got {request.mw}")
        _check_span("duration_s", request.duration_s)
        now = utc_now()
        dispatch = Dispatch(
            dispatch_id=str(uuid.uuid4()),
            mw=request.mw,
            state="submitted",
            created_at=now,
            updated_at=now,
            duration_s=request.duration_s,
            source=source,
            expires_at=_expiry(request, now),
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

    async def _supersede_submitted(self, newer: Dispatch) -> None:
        assets = {t.asset_id for t in newer.targets}
        for older in list(self._open.values()):
            replaced = [t for t in older.targets if t.state == "submitted" and t.asset_id in assets]
            if not replaced:
                continue
            for target in replaced:
                target.state = "superseded"
                target.reason = f"superseded by dispatch {newer.dispatch_id}"
            older.state = derive_state(older.targets)
            names = ", ".join(t.asset_id for t in replaced)
            await self._record(
                older,
                f"submitted targets for {names} superseded by dispatch {newer.dispatch_id}",
            )
            self._index(older)
            log.info(
                "dispatch %s: submitted targets for %s superseded by %s (now %s)",
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
                return f"asset {target.asset_id} offline, kept submitted"
            _push(
                stream,
                [_asset_command(dispatch, target, dispatch.dispatch_id, dispatch.duration_s)],
            )
            return f"sent to {stream.describe()}"

        assert dispatch.site_id is not None
        site_assets = [a.asset_id for a in self._inventory.assets_for_site(dispatch.site_id)]
        streams = {self._presence.stream_for(a) for a in site_assets}
        if len(streams) == 1:
            (stream,) = streams
            if stream is not None:
                _push(stream, [_site_command(dispatch, dispatch.duration_s)])
                return f"one site setpoint sent to {stream.describe()}"
        routed: list[tuple[AgentStream, _Command]] = []
        for target in dispatch.targets:
            stream = self._presence.stream_for(target.asset_id)
            if stream is not None:
                command_id = f"{dispatch.dispatch_id}/{target.asset_id}"
                routed.append(
                    (stream, _asset_command(dispatch, target, command_id, dispatch.duration_s))
                )
        for stream, command in routed:
            _push(stream, [command])
        waiting = len(dispatch.targets) - len(routed)
        return f"per-asset setpoints sent to {len(routed)} live asset(s), {waiting} kept submitted"

    async def deliver_pending(self, stream: AgentStream) -> int:
        """Send what ``stream`` serves and has not acknowledged (an agent registered).

        Submitted targets are delivered (or expire); targets still ``sent`` from an
        earlier stream are sent again with their command id, for the agent to apply at
        most once and report. Each dispatch on its own: one whose commands cannot be
        built is settled ``failed`` and the others are delivered all the same.

        :return: how many dispatches were delivered or sent again.
        """
        delivered = 0
        async with self._lock:
            now = utc_now()
            for dispatch in sorted(self._open.values(), key=lambda d: d.created_at):
                try:
                    delivery = self._plan_delivery(stream, dispatch, now)
                except Exception as exc:  # one bad record must not lock the agent out
                    why = f"its commands could not be built ({type(exc).__name__}: {exc})"
                    log.error(
                        "dispatch %s: %s for %s; settled failed, the agent gets its other commands",
                        dispatch.dispatch_id,
                        why,
                        stream.describe(),
                        exc_info=exc,
                    )
                    targets = [t for t in dispatch.targets if _undelivered(t, stream)]
                    await self._settle_undeliverable(dispatch, targets, why)
                    continue
                delivered += await self._carry_out(stream, dispatch, delivery)
        return delivered

    def _plan_delivery(self, stream: AgentStream, dispatch: Dispatch, now: datetime) -> _Delivery:
        """The commands ``stream`` gets for ``dispatch``, built but not sent yet."""
        delivery = _Delivery()
        again = [t for t in dispatch.targets if t.state == "sent" and stream.serves(t.asset_id)]
        if again:
            delivery.resend_how, delivery.resend = self._resend(
                dispatch, again, _remaining_s(dispatch, now)
            )
        waiting = [
            t for t in dispatch.targets if t.state == "submitted" and stream.serves(t.asset_id)
        ]
        if not waiting:
            return delivery
        why = _expired_because(dispatch, now)
        if why is not None:
            delivery.expire, delivery.expired_why = waiting, why
            return delivery
        delivery.deliver_how, delivery.deliver = self._deliver(
            stream, dispatch, waiting, _remaining_s(dispatch, now)
        )
        return delivery

    async def _carry_out(self, stream: AgentStream, dispatch: Dispatch, delivery: _Delivery) -> int:
        """Send what :meth:`_plan_delivery` built and record it; how many were delivered."""
        delivered = 0
        if delivery.resend:
            _push(stream, delivery.resend)
            await self._record_delivery(stream, dispatch, delivery.resend_how)
            delivered += 1
        if delivery.expire:
            for target in delivery.expire:
                target.state = "expired"
                target.reason = delivery.expired_why
            dispatch.state = derive_state(dispatch.targets)
            await self._record(
                dispatch, f"expired before its asset connected: {delivery.expired_why}"
            )
            self._index(dispatch)
            log.info("dispatch %s expired before delivery", dispatch.dispatch_id)
        elif delivery.deliver:
            _push(stream, delivery.deliver)
            dispatch.state = derive_state(dispatch.targets)
            await self._record_delivery(stream, dispatch, delivery.deliver_how)
            delivered += 1
        return delivered

    async def _settle_undeliverable(
        self, dispatch: Dispatch, targets: Sequence[DispatchTarget], why: str
    ) -> None:
        """Settle ``targets`` (those not sent yet or to be sent again) as ``failed``.

        A target the agent already acknowledged keeps waiting for the outcome the agent
        reports from its journal.
        """
        for target in targets:
            if target.state in ("submitted", "sent"):
                target.state = "failed"
                target.reason = why
        dispatch.state = derive_state(dispatch.targets)
        dispatch.reason = why
        try:
            await self._record(dispatch, f"not delivered: {why}")
        except Exception as exc:  # storage keeps it open until a later start
            log.error(
                "dispatch %s: saving its failure failed: %s: %s",
                dispatch.dispatch_id,
                type(exc).__name__,
                exc,
            )
        self._index(dispatch)

    async def _record_delivery(self, stream: AgentStream, dispatch: Dispatch, how: str) -> None:
        await self._record(dispatch, f"{how} on register of {stream.describe()}")
        self._index(dispatch)
        log.info("dispatch %s: %s on register of %s", dispatch.dispatch_id, how, stream.describe())

    def _deliver(
        self,
        stream: AgentStream,
        dispatch: Dispatch,
        waiting: list[DispatchTarget],
        duration_s: float | None,
    ) -> tuple[str, list[_Command]]:
        if dispatch.asset_id is None and dispatch.site_id is not None:
            site_assets = self._inventory.assets_for_site(dispatch.site_id)
            whole_site = all(stream.serves(a.asset_id) for a in site_assets) and all(
                t.state == "submitted" for t in dispatch.targets
            )
            if whole_site:
                return "submitted site setpoint delivered", [_site_command(dispatch, duration_s)]
            commands = [
                _asset_command(dispatch, t, f"{dispatch.dispatch_id}/{t.asset_id}", duration_s)
                for t in waiting
            ]
            return f"submitted setpoints for {len(waiting)} asset(s) delivered", commands
        commands = [_asset_command(dispatch, t, dispatch.dispatch_id, duration_s) for t in waiting]
        return "submitted setpoint delivered", commands

    @staticmethod
    def _resend(
        dispatch: Dispatch, targets: list[DispatchTarget], duration_s: float | None
    ) -> tuple[str, list[_Command]]:
        """Unacknowledged commands, to send again unchanged (same command ids)."""
        groups: dict[str, list[DispatchTarget]] = {}
        for target in targets:
            groups.setdefault(target.command_id or dispatch.dispatch_id, []).append(target)
        commands: list[_Command] = []
        for command_id, group in groups.items():
            if command_id == dispatch.dispatch_id and dispatch.asset_id is None:
                commands.append(_site_command(dispatch, duration_s))
            else:
                commands += [_asset_command(dispatch, t, command_id, duration_s) for t in group]
        return f"{len(groups)} unacknowledged command(s) sent again", commands

    # ------------------------------------------------------------------ acknowledgements

    async def on_ack(self, stream: AgentStream, ack: pb.SetpointAck) -> None:
        """Apply an agent's ``SetpointAck`` to the dispatch it acknowledges.

        ``acked`` moves the command's targets to ``acked``. A final status settles them
        (forward only: a repeated or late report changes nothing) and, once recorded, is
        answered with ``SetpointOutcomeAck`` so the agent stops reporting it.
        """
        dispatch_id, _, asset_part = ack.command_id.partition("/")
        final = ack.status != "acked"
        async with self._lock:
            dispatch = self._open.get(dispatch_id) or await self._storage.get_dispatch(dispatch_id)
            if dispatch is None:
                log.warning(
                    "acknowledgement from %s for unknown command %r ignored",
                    stream.describe(),
                    ack.command_id,
                )
                if final:
                    stream.send(codec.headend_outcome_ack(ack.command_id))
                return
            before = [t.state for t in dispatch.targets]
            status: DispatchState = _ack_state(ack.status) if final else "acked"
            reason = ack.reason if ack.HasField("reason") else None
            if final and ack.status not in _ACK_STATES:
                reason = reason or f"the agent reported an unknown status {ack.status!r}"
            allocations = codec.allocations_from_pb(ack) if final else []
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
                targets = self._command_targets(dispatch, ack.command_id, asset_part)
                single = len(targets) == 1
                for target in targets:
                    _settle(target, status, ack.applied_mw if single else None, reason)
            changed = [t.state for t in dispatch.targets] != before
            if changed:
                dispatch.state = derive_state(dispatch.targets)
                if final and reason and status != "applied":
                    dispatch.reason = reason
                detail = f"{status} by agent {stream.agent_id} (command {ack.command_id})"
                if status == "applied":
                    detail += f", {_fmt(ack.applied_mw)} MW applied"
                if reason:
                    detail += f": {reason}"
                if ack.ts_us > 0:
                    detail += f"; at the agent {codec.datetime_from_us(ack.ts_us).isoformat()}"
                await self._record(dispatch, detail)
                self._index(dispatch)
                log.info("dispatch %s: %s; now %s", dispatch.dispatch_id, detail, dispatch.state)
            else:
                log.debug(
                    "dispatch %s: %s from %s for command %s changes nothing (now %s)",
                    dispatch.dispatch_id,
                    ack.status,
                    stream.describe(),
                    ack.command_id,
                    dispatch.state,
                )
            if final:
                stream.send(codec.headend_outcome_ack(ack.command_id))

    @staticmethod
    def _command_targets(
        dispatch: Dispatch, command_id: str, asset_part: str
    ) -> list[DispatchTarget]:
        carried = [t for t in dispatch.targets if t.command_id == command_id]
        if carried:
            return carried
        if asset_part:
            return [t for t in [_target(dispatch, asset_part)] if t is not None]
        if dispatch.asset_id is not None:
            return [t for t in [_target(dispatch, dispatch.asset_id)] if t is not None]
        return [t for t in dispatch.targets if t.state in ("sent", "acked")]

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
        """A stream ended. Its sent and acked dispatches stay open: sent ones are sent
        again when an agent serving them registers, and the agent reports the outcome of
        acked ones from its journal."""
        count = sum(
            1
            for d in self._open.values()
            if any(t.state in ("sent", "acked") and stream.serves(t.asset_id) for t in d.targets)
        )
        if count:
            log.info(
                "%s ended with %d dispatch(es) not yet settled; they settle when it returns",
                stream.describe(),
                count,
            )

    # ------------------------------------------------------------------ expiry

    async def _expiry_loop(self) -> None:
        while True:
            self._expiry_wake.clear()
            now = utc_now()
            due = [
                d
                for d in self._open.values()
                if d.expires_at is not None and any(t.state == "submitted" for t in d.targets)
            ]
            expired = [d for d in due if d.expires_at is not None and d.expires_at <= now]
            if expired:
                try:
                    await self._expire(expired)
                except Exception:
                    log.exception("expiring dispatches failed; retrying in 1 s")
                    await asyncio.sleep(1.0)
                continue
            upcoming = [d.expires_at for d in due if d.expires_at is not None]
            wait = min(upcoming) - now if upcoming else None
            try:
                async with asyncio.timeout(
                    wait.total_seconds() + 0.001 if wait is not None else None
                ):
                    await self._expiry_wake.wait()
            except TimeoutError:
                pass

    async def _expire(self, dispatches: list[Dispatch]) -> None:
        async with self._lock:
            now = utc_now()
            for dispatch in dispatches:
                waiting = [t for t in dispatch.targets if t.state == "submitted"]
                if not waiting or dispatch.expires_at is None or dispatch.expires_at > now:
                    continue
                why = f"expired at {dispatch.expires_at.isoformat()} before it could be sent"
                for target in waiting:
                    target.state = "expired"
                    target.reason = why
                dispatch.state = derive_state(dispatch.targets)
                await self._record(dispatch, why)
                self._index(dispatch)
                log.info("dispatch %s: %s (now %s)", dispatch.dispatch_id, why, dispatch.state)

    # ------------------------------------------------------------------ record

    async def _record(self, dispatch: Dispatch, detail: str) -> None:
        now = utc_now()
        dispatch.updated_at = now
        await self._storage.record_dispatch(
            dispatch,
            DispatchEvent(
                dispatch_id=dispatch.dispatch_id, state=dispatch.state, ts=now, detail=detail
            ),
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


def _check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > 255 or not key.isprintable():
        raise InvalidDispatchError(
            "header Idempotency-Key must be 1 to 255 printable characters (a UUID is a good key)"
        )
    return key


def _idempotent_id(key: str) -> str:
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, key))


def _span_problem(name: str, seconds: float | None) -> str | None:
    """Why ``seconds`` (``duration_s`` or ``ttl_s``) is out of bounds, or ``None``."""
    if seconds is None or (math.isfinite(seconds) and 0 < seconds <= DISPATCH_HORIZON_S):
        return None
    return (
        f"{name} must be more than 0 and at most {DISPATCH_HORIZON_S} seconds (one year), "
        f"got {seconds:g}"
    )


def _check_span(name: str, seconds: float | None) -> None:
    problem = _span_problem(name, seconds)
    if problem is not None:
        raise InvalidDispatchError(problem)


def _beyond_horizon(expires_at: datetime, since: datetime) -> str | None:
    """Why ``expires_at`` is too far after ``since``, or ``None``.

    Subtracting aware datetimes is exact at any UTC offset; converting ``expires_at`` to
    UTC first would overflow for a time such as 9999-12-31T23:59:59-12:00.
    """
    if expires_at - since <= _HORIZON:
        return None
    return (
        f"expires_at {expires_at.isoformat()} is more than {DISPATCH_HORIZON_S} seconds "
        f"(one year) after {since.isoformat()}; the latest allowed is "
        f"{(since + _HORIZON).isoformat()}"
    )


def _expiry(request: DispatchRequest, now: datetime) -> datetime | None:
    if request.expires_at is not None and request.ttl_s is not None:
        raise InvalidDispatchError("give expires_at or ttl_s, not both")
    if request.ttl_s is not None:
        _check_span("ttl_s", request.ttl_s)
        return now + timedelta(seconds=request.ttl_s)
    if request.expires_at is not None:
        if request.expires_at.tzinfo is None:
            raise InvalidDispatchError(
                "expires_at needs a time zone, e.g. 2026-01-01T12:00:00Z or +01:00"
            )
        if request.expires_at <= now:
            raise InvalidDispatchError(
                f"expires_at {request.expires_at.isoformat()} is already in the past "
                f"(headend time {now.isoformat()})"
            )
        problem = _beyond_horizon(request.expires_at, now)
        if problem is not None:
            raise InvalidDispatchError(problem)
        return now + (request.expires_at - now)  # the same instant, in UTC
    return None


def _out_of_bounds(dispatch: Dispatch) -> str | None:
    """Why a stored dispatch reaches beyond :data:`DISPATCH_HORIZON_S`, or ``None``.

    Versions before the bounds stored such records; their dates overflow.
    """
    problem = _span_problem("duration_s", dispatch.duration_s)
    if problem is None and dispatch.expires_at is not None:
        problem = _beyond_horizon(dispatch.expires_at, dispatch.created_at)
    if problem is None:
        return None
    return f"stored out of bounds: {problem}"


def _undelivered(target: DispatchTarget, stream: AgentStream) -> bool:
    """Whether registering ``stream`` would send ``target`` (first time or again)."""
    return target.state in ("submitted", "sent") and stream.serves(target.asset_id)


def _asset_command(
    dispatch: Dispatch, target: DispatchTarget, command_id: str, duration_s: float | None
) -> _Command:
    message = codec.headend_setpoint(
        command_id,
        target.mw,
        asset_id=target.asset_id,
        duration_s=duration_s,
        expires_in_ms=_expires_in_ms(dispatch),
        expires_at=dispatch.expires_at,
    )
    return _Command(message, command_id, [target])


def _site_command(dispatch: Dispatch, duration_s: float | None) -> _Command:
    message = codec.headend_setpoint(
        dispatch.dispatch_id,
        dispatch.mw,
        site_id=dispatch.site_id,
        duration_s=duration_s,
        expires_in_ms=_expires_in_ms(dispatch),
        expires_at=dispatch.expires_at,
    )
    return _Command(message, dispatch.dispatch_id, list(dispatch.targets))


def _push(stream: AgentStream, commands: Sequence[_Command]) -> None:
    """Queue ``commands`` on ``stream`` and mark their targets ``sent``."""
    for command in commands:
        stream.send(command.message)
        for target in command.targets:
            target.state = "sent"
            target.command_id = command.command_id


def _expires_in_ms(dispatch: Dispatch) -> int | None:
    if dispatch.expires_at is None:
        return None
    return math.floor((dispatch.expires_at - utc_now()).total_seconds() * 1000)


def _expired_because(dispatch: Dispatch, now: datetime) -> str | None:
    if dispatch.expires_at is not None and dispatch.expires_at <= now:
        return f"it expired at {dispatch.expires_at.isoformat()} before its asset connected"
    remaining = _remaining_s(dispatch, now)
    if remaining is not None and remaining <= 0:
        return f"its duration of {_fmt(dispatch.duration_s or 0)} s ran out"
    return None


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
    """Move ``target`` to ``state``, forward only."""
    if DISPATCH_STATE_RANK[state] <= DISPATCH_STATE_RANK[target.state]:
        return
    target.state = state
    if state == "acked":
        return
    target.applied_mw = applied_mw if state == "applied" else None
    if reason is not None:
        target.reason = reason
