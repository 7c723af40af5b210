"""The dispatcher: turns a :class:`DispatchRequest` into a routed :class:`Dispatch` and
follows it to its outcome. It coordinates three parts, each in its own module:

* :mod:`~der_sdk_headend.dispatch.planning`: validation (with the time bounds), split and
  clamp, ``Idempotency-Key``;
* :mod:`~der_sdk_headend.dispatch.lifecycle`: the state machine, pure functions;
* :mod:`~der_sdk_headend.dispatch.router` (where an asset is served, how a command gets
  there) and :mod:`~der_sdk_headend.dispatch.delivery` (which commands each agent gets).

Rules (``docs/headend.md`` has the operator's version):

* ``asset_id`` wins over ``site_id``. A per-asset dispatch has one target, clamped to the
  static range of the asset's control kind (a MW of the wrong sign for an export or import
  limit is refused). A site dispatch is split over the site's inventory assets, each within
  its available range now (from the latest telemetry, ``latest``), by the request's
  ``policy``, else the site's ``split_policy``, else the configured one; what no asset can
  take is reported as ``unallocated_mw``. A site dispatch goes to its agent as one site
  setpoint (the agent splits it) only when split by the configured policy; one split by
  another policy goes out as per-asset setpoints, so the agent applies that policy's
  shares.
* Lifecycle, forward only: ``submitted`` (recorded, its agent offline) → ``sent`` (pushed
  down the stream) → ``acked`` (the agent recorded it in its journal) → one final state:
  ``applied``, ``rejected``, ``failed``, ``expired`` or ``superseded``. A change to an
  earlier or equal state is ignored. Every change is a timestamped :class:`DispatchEvent`.
* A newer dispatch supersedes the older *submitted* targets for the same assets.
* Expiry (``expires_at``, or ``ttl_s`` from creation): a submitted target whose expiry
  passes becomes ``expired`` and is never sent. A sent one carries the time left
  (``expires_in_ms``) and the agent refuses to apply it later, reporting ``expired``.
* Bounds: a request outside them is refused (``InvalidDispatchError``). An open record
  outside them (stored by a version without the bounds) is settled ``failed`` when the
  dispatcher loads it at start: its dates cannot be computed with.
* ``Idempotency-Key``: the key fixes the dispatch id, so a retried request returns the
  record it created; the same key with a different request is refused.
* Routing: see :mod:`~der_sdk_headend.dispatch.delivery`. Submitted targets are delivered
  when an agent serving them registers, unless the dispatch expired or its ``duration_s``
  has already run out (then they expire). Targets still ``sent`` (the stream ended before
  the agent answered) are sent again with the same command id; the agent's journal makes
  sure it applies each command at most once and reports the outcome it recorded. Each
  dispatch is delivered on its own: when building its commands fails, nothing of it is
  sent, its targets for that agent become ``failed`` with the reason (logged once, as it
  is no longer open), and the agent still gets every other command.
* A :class:`~der_sdk.models.SetpointAck` updates the targets (from its allocations, or
  its status for a per-asset command) and so the dispatch's state. A final status is
  answered with ``SetpointOutcomeAck`` once recorded, so the agent stops reporting it.
* A ``LocalDispatch`` (a command an edge service applied at the agent, e.g. a SCADA write
  to its OPC UA server) is recorded as a dispatch with source ``local``, already in its
  final state; nothing is routed. The agent applies commands in arrival order, so the
  last one to reach it, local or from here, is in force (``docs/opcua.md``).

Every state change is saved and recorded as a :class:`DispatchEvent`. Storage is the
record; the dispatcher keeps an in-memory index of the dispatches still open. One lock
serialises all changes; their records are queued under it and stored in that order by a
:class:`~der_sdk_headend.dispatch.records.RecordWriter` (several per transaction when
they come while one is being written), so an acknowledgement never overtakes the save of
the send it acknowledges. ``POST /dispatch`` returns once the new record is stored, and
an outcome is confirmed to its agent once its record is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from der_sdk.control import ControlModel
from der_sdk.errors import UnknownNameError
from der_sdk.inventory import Inventory
from der_sdk.models import (
    TERMINAL_DISPATCH_STATES,
    Dispatch,
    DispatchEvent,
    DispatchRequest,
    DispatchState,
    DispatchTarget,
    Event,
    LocalDispatchReport,
    SetpointAck,
    TelemetrySample,
    utc_now,
)
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import StorageBackend
from der_sdk.tasks import cancel_and_wait
from der_sdk_headend.dispatch import lifecycle, planning
from der_sdk_headend.dispatch.delivery import (
    Command,
    Delivery,
    cancel_command,
    plan_delivery,
    route_new,
    undelivered,
)
from der_sdk_headend.dispatch.lifecycle import derive_state
from der_sdk_headend.dispatch.planning import CancelConflictError
from der_sdk_headend.dispatch.planning import fmt_mw as _fmt
from der_sdk_headend.dispatch.records import RecordWriter, copy_dispatch
from der_sdk_headend.dispatch.router import AgentPeer, DispatchRouter

__all__ = ["Dispatcher"]

log = logging.getLogger("der.headend.dispatch")

_OPEN_STATES: tuple[DispatchState, ...] = ("submitted", "sent", "acked", "scheduled", "active")
_OPEN_LIMIT = 10_000
"""How many open dispatches of each open state are reloaded from storage at start."""


class Dispatcher:
    """Creates, routes and tracks dispatches; reaches agents through ``router``."""

    def __init__(
        self,
        inventory: Inventory,
        plugins: Plugins,
        storage: StorageBackend,
        router: DispatchRouter,
        policy_name: str,
    ) -> None:
        self._inventory = inventory
        self._plugins = plugins
        self._storage = storage
        self._router = router
        self._policy = plugins.split_policies.get(policy_name)
        self._controls: dict[str, ControlModel] = {t.name: t.control for t in plugins.asset_types}
        self.latest: Callable[[str], TelemetrySample | None] | None = None
        """The latest sample of an asset (ingest's cache), for the available ranges of a
        site split; ``None``: static limits only."""
        self._open: dict[str, Dispatch] = {}
        self._lock = asyncio.Lock()
        self._records = RecordWriter(storage)
        self._expiry_wake = asyncio.Event()
        self._expiry_task: asyncio.Task[None] | None = None
        self.on_record: Callable[[Dispatch], None] | None = None
        """Called with every dispatch record after it is stored (the console's live hub)."""
        self.record_listeners: list[Callable[[Dispatch], None]] = []
        """Called too with every dispatch record after it is stored (programs follow the
        dispatches they made). Cheap and synchronous: a listener queues its work."""

    @property
    def policy_name(self) -> str:
        return self._policy.name

    async def load_open(self) -> int:
        """Reload open dispatches from storage (at start, before agents connect)."""
        stored: list[Dispatch] = []
        for state in _OPEN_STATES:
            stored += await self._storage.dispatch_history(state=state, limit=_OPEN_LIMIT)
        self._open = {d.dispatch_id: d for d in sorted(stored, key=lambda d: d.created_at)}
        for dispatch in list(self._open.values()):
            why = planning.out_of_bounds(dispatch)
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
        task, self._expiry_task = self._expiry_task, None
        await cancel_and_wait([task])
        await self._records.close()

    @property
    def records(self) -> RecordWriter:
        """The writer of this dispatcher's records (its counters)."""
        return self._records

    def open_dispatches(self) -> list[Dispatch]:
        """Copies of the dispatches not in a final state, oldest first."""
        return [copy_dispatch(d) for d in self._open.values()]

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

    def preview(self, request: DispatchRequest) -> planning.DispatchPreview:
        """What ``request`` would produce, planned exactly as :meth:`submit` plans it
        (validated, split by the configured policy, clamped), but not stored, routed,
        sent, indexed or announced to plugins.

        :raises InvalidDispatchError: as :meth:`create`.
        :raises UnknownTargetError: the asset or site is not in the inventory.
        """
        now = utc_now()
        dispatch = self._plan(request, "preview", now)
        ranges = planning.available_ranges(
            dispatch, self._inventory, controls=self._controls, latest=self.latest, now=now
        )
        return planning.preview_of(dispatch, self._inventory, ranges)

    def _plan(self, request: DispatchRequest, source: str, now: datetime) -> Dispatch:
        return planning.plan(
            request,
            inventory=self._inventory,
            policy=self._policy,
            source=source,
            now=now,
            policies=self._plugins.split_policies,
            controls=self._controls,
            latest=self.latest,
        )

    def _route_new(self, dispatch: Dispatch) -> str:
        """Send what a new dispatch sends now (:func:`route_new`); the sentence saying so."""
        routed, route = route_new(
            dispatch,
            self._router,
            self._inventory,
            utc_now(),
            agent_splits=self.agent_splits(dispatch),
        )
        for peer, command in routed:
            self._push(peer, [command])
        return route

    def agent_splits(self, dispatch: Dispatch) -> bool:
        """Whether a site dispatch may go to its agent as one site setpoint: only when it
        was split by the configured policy (the agent's, in a consistent deployment)."""
        return dispatch.policy in (None, self._policy.name)

    async def _plan_request(
        self,
        request: DispatchRequest,
        source: str,
        idempotency_key: str | None,
        *,
        external_id: str | None = None,
        control_fingerprint: str | None = None,
    ) -> tuple[Dispatch, bool]:
        """The dispatch ``request`` makes (validated, split, clamped, with its idempotency
        fields, ``der_dispatch_validated`` fired), not yet recorded: ``(dispatch, True)``;
        or, for an ``idempotency_key`` seen before, its record: ``(record, False)``."""
        fingerprint = None
        if idempotency_key is not None:
            idempotency_key = planning.check_idempotency_key(idempotency_key)
            fingerprint = planning.fingerprint(request)
            async with self._lock:
                known = await self._stored(planning.idempotent_id(idempotency_key))
            if known is not None:
                return planning.replay(known, fingerprint), False
        dispatch = self._plan(request, source, utc_now())
        if idempotency_key is not None:
            dispatch.dispatch_id = planning.idempotent_id(idempotency_key)
            dispatch.idempotency_key = idempotency_key
            dispatch.request_fingerprint = fingerprint
        if external_id is not None:
            dispatch.external_id = external_id
            dispatch.request_fingerprint = control_fingerprint
        self._plugins.notify("der_dispatch_validated", dispatch=copy_dispatch(dispatch))
        return dispatch, True

    async def submit(
        self,
        request: DispatchRequest,
        source: str = "rest",
        *,
        idempotency_key: str | None = None,
        external_id: str | None = None,
        fingerprint: str | None = None,
        audit: Callable[[Dispatch], Event] | None = None,
    ) -> tuple[Dispatch, bool]:
        """:meth:`create`, also saying whether a new dispatch was made (``False``: the
        ``idempotency_key`` was seen before and its record is returned).

        The command goes to a live agent before the record is stored (the agent's
        journal, not this record, makes it safe); this returns once the record is stored.

        :param external_id: the upstream id of a program's dispatch, kept on the record.
        :param fingerprint: the program's fingerprint of that control, kept as the
            record's ``request_fingerprint`` (a program tells a repeat from a change).
        :param audit: makes the audit record of a new dispatch, stored in the same
            transaction as the dispatch (not called for a replayed key).
        """
        dispatch, new = await self._plan_request(
            request,
            source,
            idempotency_key,
            external_id=external_id,
            control_fingerprint=fingerprint,
        )
        if not new:
            return dispatch, False
        fingerprint = dispatch.request_fingerprint
        async with self._lock:
            if idempotency_key is not None:  # a concurrent request with the same key
                known = await self._stored(dispatch.dispatch_id)
                if known is not None:
                    return planning.replay(known, fingerprint), False
            await self._supersede_submitted(dispatch)
            route = self._route_new(dispatch)
            dispatch.state = derive_state(dispatch.targets)
            # Queued under the lock (so in order), stored after it: an ack that arrives
            # meanwhile is applied and written next, not kept waiting for the lock.
            stored = self._write_later(
                dispatch,
                f"created by {source}; {route}",
                events=() if audit is None else (audit(dispatch),),
            )
            self._index(dispatch)
            if dispatch.expires_at is not None:
                self._expiry_wake.set()
            snapshot = copy_dispatch(dispatch)
        await stored
        self._log_created(snapshot, route)
        return snapshot, True

    async def _supersede_submitted(self, newer: Dispatch) -> None:
        assets = {t.asset_id for t in newer.targets}
        for older in list(self._open.values()):
            await self._supersede_in(older, newer, assets)

    async def _supersede_in(self, older: Dispatch, newer: Dispatch, assets: set[str]) -> None:
        """Supersede the submitted targets of ``older`` for ``assets`` (those of ``newer``).

        A schedule is superseded here only when it would not start before ``newer``
        does; one that starts earlier and overlaps is delivered all the same, and its
        agent cuts it at ``newer``'s start (``docs/dispatch.md``, "Supersede"). Schedules
        that end before ``newer`` starts, or start after a ``newer`` schedule ends, are
        left alone.
        """
        if not lifecycle.overlaps(older, newer) or lifecycle.starts_before(older, newer):
            return
        waiting = [t for t in older.targets if t.state == "submitted" and t.asset_id in assets]
        replaced = lifecycle.move(
            older, waiting, "supersede", f"superseded by dispatch {newer.dispatch_id}"
        )
        if replaced:
            older.superseded_by = newer.dispatch_id
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

    # ------------------------------------------------------------------ delivery

    def _push(self, peer: AgentPeer, commands: Sequence[Command]) -> None:
        """Hand ``commands`` to the router and mark their targets ``sent``."""
        for command in commands:
            self._router.deliver(peer, command.setpoint)
            lifecycle.mark_sent(command.targets, command.setpoint.command_id)

    async def deliver_pending(self, peer: AgentPeer) -> int:
        """Send what ``peer`` serves and has not acknowledged (an agent registered).

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
                delivered += await self._deliver_to(peer, dispatch, now)
        return delivered

    async def _deliver_to(
        self, peer: AgentPeer, dispatch: Dispatch, now: datetime, occasion: str | None = None
    ) -> int:
        """Deliver to ``peer`` what it serves of ``dispatch`` (or expire it); 1 when
        something was sent. A dispatch whose commands cannot be built is settled
        ``failed`` for ``peer``'s targets. ``occasion`` ends the lifecycle event's text
        (default: ``on register of`` the agent)."""
        try:
            delivery = self._plan_delivery(peer, dispatch, now)
        except Exception as exc:  # one bad record must not lock the agent out
            why = f"its commands could not be built ({type(exc).__name__}: {exc})"
            log.error(
                "dispatch %s: %s for %s; settled failed, the agent gets its other commands",
                dispatch.dispatch_id,
                why,
                peer.describe(),
                exc_info=exc,
            )
            targets = [t for t in dispatch.targets if undelivered(t, peer)]
            await self._settle_undeliverable(dispatch, targets, why)
            return 0
        return await self._carry_out(
            peer, dispatch, delivery, occasion or f"on register of {peer.describe()}"
        )

    def _plan_delivery(self, peer: AgentPeer, dispatch: Dispatch, now: datetime) -> Delivery:
        """:func:`plan_delivery` for ``peer``; a replica of a cluster leaves out what it
        already pushed on that stream."""
        return plan_delivery(
            peer,
            dispatch,
            self._inventory,
            now,
            utc_now(),
            agent_splits=self.agent_splits(dispatch),
        )

    async def _carry_out(
        self, peer: AgentPeer, dispatch: Dispatch, delivery: Delivery, occasion: str
    ) -> int:
        """Send what :func:`plan_delivery` built and record it; how many were delivered."""
        delivered = 0
        if delivery.resend:
            self._push(peer, delivery.resend)
            await self._record_delivery(dispatch, f"{delivery.resend_how} {occasion}")
            delivered += 1
        if delivery.expire:
            lifecycle.move(dispatch, delivery.expire, "expire", delivery.expired_why)
            await self._record(
                dispatch, f"expired before its asset connected: {delivery.expired_why}"
            )
            self._index(dispatch)
            log.info("dispatch %s expired before delivery", dispatch.dispatch_id)
        elif delivery.deliver:
            self._push(peer, delivery.deliver)
            dispatch.state = derive_state(dispatch.targets)
            await self._record_delivery(dispatch, f"{delivery.deliver_how} {occasion}")
            delivered += 1
        return delivered

    async def _settle_undeliverable(
        self, dispatch: Dispatch, targets: Sequence[DispatchTarget], why: str
    ) -> None:
        """Settle ``targets`` (those not sent yet or to be sent again) as ``failed``.

        A target the agent already acknowledged keeps waiting for the outcome the agent
        reports from its journal.
        """
        lifecycle.fail_undelivered(dispatch, targets, why)
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

    async def _record_delivery(self, dispatch: Dispatch, what: str) -> None:
        await self._record(dispatch, what)
        self._index(dispatch)
        log.info("dispatch %s: %s", dispatch.dispatch_id, what)

    # ------------------------------------------------------------------ acknowledgements

    async def on_ack(self, peer: AgentPeer, ack: SetpointAck) -> None:
        """Apply an agent's acknowledgement to the dispatch it acknowledges.

        ``acked`` moves the command's targets to ``acked``. A final status settles them
        (forward only: a repeated or late report changes nothing) and, once recorded, is
        answered with ``SetpointOutcomeAck`` so the agent stops reporting it.
        """
        dispatch_id = ack.command_id.partition("/")[0]
        async with self._lock:
            dispatch = self._open.get(dispatch_id) or await self._stored(dispatch_id)
            stored = await self._apply_ack(peer, ack, dispatch)
        if stored is not None:
            await stored

    async def _apply_ack(
        self, peer: AgentPeer, ack: SetpointAck, dispatch: Dispatch | None
    ) -> Awaitable[None] | None:
        """Apply ``ack`` to ``dispatch`` (``None``: unknown) and queue its record; a
        final status is confirmed once its record (and every one before it) is stored.

        :return: what to await for the record to be stored (``None``: nothing to wait
            for); the caller awaits it after releasing the dispatcher's lock.
        """
        if ack.command_id.endswith("/cancel"):
            await self._on_cancel_ack(peer, ack, dispatch)
            return None
        if dispatch is None:
            log.warning(
                "acknowledgement from %s for unknown command %r ignored",
                peer.describe(),
                ack.command_id,
            )
            if ack.status not in lifecycle.PROGRESS:
                self._confirm(peer, ack)
            return None
        effect = lifecycle.apply_ack(dispatch, ack)
        if effect.changed and ack.superseded_by and dispatch.superseded_by is None:
            dispatch.superseded_by = ack.superseded_by.partition("/")[0]
        for asset_id in effect.strangers:
            log.warning(
                "acknowledgement of %s from %s names asset %s, which is not a "
                "target of the dispatch; ignored",
                ack.command_id,
                peer.describe(),
                asset_id,
            )
        if effect.changed:
            detail = f"{effect.status} by agent {peer.agent_id} (command {ack.command_id})"
            if ack.step is not None:
                detail = (
                    f"step {ack.step} {ack.status} by agent {peer.agent_id} "
                    f"(command {ack.command_id})"
                )
            if ack.status == "applied":
                detail += f", {_fmt(ack.applied_mw)} MW applied"
            if effect.reason:
                detail += f": {effect.reason}"
            if ack.ts is not None:
                detail += f"; at the agent {ack.ts.isoformat()}"
            stored = self._write_later(
                dispatch, detail, then=(lambda: self._confirm(peer, ack)) if effect.final else None
            )
            self._index(dispatch)
            log.info("dispatch %s: %s; now %s", dispatch.dispatch_id, detail, dispatch.state)
            return stored
        log.debug(
            "dispatch %s: %s from %s for command %s changes nothing (now %s)",
            dispatch.dispatch_id,
            ack.status,
            peer.describe(),
            ack.command_id,
            dispatch.state,
        )
        if effect.final:  # a repeated outcome: confirmed once the first one is stored
            return self._after_queued(lambda: self._confirm(peer, ack))
        return None

    def _confirm(self, peer: AgentPeer, ack: SetpointAck) -> None:
        """``SetpointOutcomeAck`` for ``ack`` (a router from before schedules takes no
        step, and never sees one)."""
        if ack.step is None:
            self._router.confirm_outcome(peer, ack.command_id)
        else:
            self._router.confirm_outcome(peer, ack.command_id, ack.step)

    async def _on_cancel_ack(
        self, peer: AgentPeer, ack: SetpointAck, dispatch: Dispatch | None
    ) -> None:
        """The agent's answer to a cancel command: recorded as an event of the dispatch
        (the schedule's own ``cancelled`` outcome comes as its final status)."""
        if ack.status in lifecycle.PROGRESS:
            return
        if dispatch is not None:
            dispatch_id = dispatch.dispatch_id
            reverted = ", ".join(
                f"{a.asset_id} {a.status} {_fmt(a.mw)} MW" for a in ack.allocations
            )
            detail = f"cancel {ack.status} by agent {peer.agent_id} (command {ack.command_id})"
            if reverted:
                detail += f": returned to default: {reverted}"
            if ack.reason:
                detail += f"; {ack.reason}"
            await self._storage.record_dispatch_event(
                DispatchEvent(
                    dispatch_id=dispatch_id, state=dispatch.state, ts=utc_now(), detail=detail
                )
            )
            log.info("dispatch %s: %s", dispatch_id, detail)
        self._router.confirm_outcome(peer, ack.command_id)

    # ------------------------------------------------------------------ cancel

    async def cancel(self, dispatch_id: str, by: str) -> Dispatch | None:
        """Stop a dispatch: its targets not sent yet become ``cancelled`` here; a
        schedule's targets on an agent get a cancel command (now when the agent is
        connected, else when it registers), and settle ``cancelled`` when the agent
        reports it.

        :return: a snapshot of the record; ``None``: no such dispatch.
        :raises CancelConflictError: the dispatch is final already (its state named), or
            is an immediate dispatch already sent (it cannot be called back).
        """
        async with self._lock:
            dispatch = self._open.get(dispatch_id) or await self._stored(dispatch_id)
            if dispatch is None:
                return None
            await self._cancel_in(dispatch, by, "the rest when their agent connects")
            self._index(dispatch)
            return copy_dispatch(dispatch)

    async def _cancel_in(self, dispatch: Dispatch, by: str, rest: str) -> list[DispatchTarget]:
        """:meth:`cancel` of ``dispatch`` (under the caller's locks): check, settle what
        was not sent, send the cancel to the agents of this headend's streams, record.
        ``rest`` says in the record what becomes of the targets whose agent is not here.

        :return: the targets an agent holds whose cancel was not sent from here.
        :raises CancelConflictError: as :meth:`cancel`.
        """
        dispatch_id = dispatch.dispatch_id
        if not lifecycle.is_open(dispatch):
            raise CancelConflictError(
                f"dispatch {dispatch_id} is {dispatch.state}: a final dispatch cannot be cancelled"
            )
        held = [
            t
            for t in dispatch.targets
            if t.state != "submitted" and t.state not in TERMINAL_DISPATCH_STATES
        ]
        if dispatch.start_at is None and held:
            raise CancelConflictError(
                f"dispatch {dispatch_id} is {dispatch.state}: it was sent to its agent and "
                "only a schedule can be cancelled there; send a new dispatch instead"
            )
        now = utc_now()
        dispatch.cancel_requested_at = dispatch.cancel_requested_at or now
        waiting = [t for t in dispatch.targets if t.state == "submitted"]
        lifecycle.move(dispatch, waiting, "cancel", f"cancelled by {by} before it was sent")
        for target in waiting:
            for step in target.steps or ():
                step.status = "cancelled"
        elsewhere: list[DispatchTarget] = []
        for target in held:
            peer = self._router.peer_for(target.asset_id)
            if peer is None:
                elsewhere.append(target)
            else:
                self._push(peer, [cancel_command(dispatch, target)])
        what = f"cancel requested by {by}"
        if waiting:
            what += f"; {len(waiting)} target(s) not sent yet cancelled"
        if held:
            sent = len(held) - len(elsewhere)
            what += f"; cancel sent to the agent for {sent} of {len(held)} target(s)" + (
                f", {rest}" if elsewhere else ""
            )
        await self._record(dispatch, what)
        log.info("dispatch %s: %s (now %s)", dispatch_id, what, dispatch.state)
        return elsewhere

    async def record_local(self, peer: AgentPeer, report: LocalDispatchReport) -> Dispatch | None:
        """Record a command the agent on ``peer``'s stream applied locally (``LocalDispatch``).

        The agent already validated, split, clamped and applied it: the record (source
        ``local``, final state, one lifecycle event) is for the dispatch history. Idempotent
        by ``command_id``, which becomes the dispatch id: an agent sends a report again until
        it is acknowledged. Allocations for assets the stream does not serve are left out.

        :return: a snapshot of the new record; ``None`` when the command was already
            recorded or names an asset the stream does not serve (logged).
        """
        async with self._lock:
            return await self._record_local(peer, report)

    async def _record_local(self, peer: AgentPeer, report: LocalDispatchReport) -> Dispatch | None:
        """:meth:`record_local`, under the dispatcher's lock."""
        if not report.command_id:
            log.warning("%s reported a local command without an id; ignored", peer.describe())
            return None
        if await self._stored(report.command_id) is not None:
            return None
        asset_id, site_id = report.asset_id, report.site_id
        if asset_id:
            with contextlib.suppress(UnknownNameError):
                asset_id = self._inventory.asset(asset_id).asset_id
            if not peer.serves(asset_id):
                log.warning(
                    "%s reported local command %s for asset %s, which it does not serve; "
                    "not recorded",
                    peer.describe(),
                    report.command_id,
                    asset_id,
                )
                return None
            site_id = peer.site_id
        elif site_id:
            with contextlib.suppress(UnknownNameError):
                site_id = self._inventory.site(site_id).site_id
        targets: list[DispatchTarget] = []
        for allocation in report.allocations:
            if not peer.serves(allocation.asset_id):
                log.warning(
                    "local command %s from %s names asset %s, which the stream does not "
                    "serve; left out",
                    report.command_id,
                    peer.describe(),
                    allocation.asset_id,
                )
                continue
            state = lifecycle.ack_state(allocation.status)
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
            state=derive_state(targets) if targets else lifecycle.ack_state(report.status),
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
            f"{dispatch.state} locally by agent {peer.agent_id} "
            f"(command {report.command_id}), {_fmt(applied)} MW applied"
        )
        if report.reason:
            detail += f": {report.reason}"
        await self._record(dispatch, detail)
        log.info("dispatch %s (local): %s", dispatch.dispatch_id, detail)
        return copy_dispatch(dispatch)

    async def on_stream_end(self, peer: AgentPeer) -> None:
        """A stream ended. Its sent and acked dispatches stay open: sent ones are sent
        again when an agent serving them registers, and the agent reports the outcome of
        acked ones from its journal."""
        count = sum(
            1
            for d in self._open.values()
            if any(t.state in ("sent", "acked") and peer.serves(t.asset_id) for t in d.targets)
        )
        if count:
            log.info(
                "%s ended with %d dispatch(es) not yet settled; they settle when it returns",
                peer.describe(),
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
                lifecycle.move(dispatch, waiting, "expire", why)
                await self._record(dispatch, why)
                self._index(dispatch)
                log.info("dispatch %s: %s (now %s)", dispatch.dispatch_id, why, dispatch.state)

    # ------------------------------------------------------------------ record

    async def _record(self, dispatch: Dispatch, detail: str) -> None:
        """Record a change of ``dispatch`` with ``detail`` and wait until it is stored."""
        await self._write_later(dispatch, detail)

    def _write_later(
        self,
        dispatch: Dispatch,
        detail: str,
        *,
        events: Sequence[Event] = (),
        then: Callable[[], None] | None = None,
    ) -> Awaitable[None]:
        """Queue the record of a change of ``dispatch`` (with ``detail``, and ``events``
        such as its audit record) behind every record queued before it; ``then`` runs
        once it is stored. Await the result (after releasing the lock) for it to be
        stored. Every change goes through here, so records are stored in order.

        A dispatcher whose storage is shared with other processes
        (:class:`~der_sdk_headend.cluster.dispatch.ClusterDispatcher`) writes at once
        instead, inside the storage's dispatch lock (see :meth:`_store`).
        """
        event = self._event(dispatch, detail)

        def stored(snapshot: Dispatch) -> None:
            self._announce(snapshot)
            if then is not None:
                then()

        return self._records.add(dispatch, event, events, stored)

    def _after_queued(self, then: Callable[[], None]) -> Awaitable[None] | None:
        """Run ``then`` once every record queued so far is stored."""
        return self._records.after_queued(then)

    async def _stored(self, dispatch_id: str) -> Dispatch | None:
        """The stored record of ``dispatch_id``, read once every queued record is stored
        (so a change queued but not yet written is not missed)."""
        await self._records.after_queued(lambda: None)
        return await self._storage.get_dispatch(dispatch_id)

    async def _store(
        self,
        dispatch: Dispatch,
        detail: str,
        events: Sequence[Event] = (),
        then: Callable[[], None] | None = None,
    ) -> None:
        """Write the record of a change of ``dispatch`` now, in one transaction."""
        await self._storage.record_dispatches([(dispatch, self._event(dispatch, detail))], events)
        self._announce(dispatch)
        if then is not None:
            then()

    @staticmethod
    def _event(dispatch: Dispatch, detail: str) -> DispatchEvent:
        """The lifecycle event of a change of ``dispatch`` now (its ``updated_at`` too)."""
        now = utc_now()
        dispatch.updated_at = now
        return DispatchEvent(
            dispatch_id=dispatch.dispatch_id, state=dispatch.state, ts=now, detail=detail
        )

    def _announce(self, dispatch: Dispatch) -> None:
        """Tell the listeners of a stored record."""
        if self.on_record is not None:
            self.on_record(dispatch)
        for listener in self.record_listeners:
            try:
                listener(dispatch)
            except Exception:
                log.exception("a dispatch record listener failed; the others were called")

    def _index(self, dispatch: Dispatch) -> None:
        if lifecycle.is_open(dispatch):
            self._open[dispatch.dispatch_id] = dispatch
        else:
            self._open.pop(dispatch.dispatch_id, None)

    def _log_created(self, dispatch: Dispatch, route: str) -> None:
        if not log.isEnabledFor(logging.INFO):  # the arguments cost more than the check
            return
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
