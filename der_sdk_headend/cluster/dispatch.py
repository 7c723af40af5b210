"""Dispatch in a cluster: any replica takes a dispatch, the replica holding the agent's
stream delivers it, and PostgreSQL is the record every replica reads.

How a dispatch reaches an agent on another replica (docs/cluster.md, "Dispatch"):

* ``POST /dispatch`` on replica A records the dispatch in PostgreSQL and pushes what A's
  own agents serve down their streams, as a lone headend does. For each target still
  ``submitted`` whose agent is on another replica (``locate``), A sends that replica a
  **nudge**: the bus command ``dispatch.deliver`` with the dispatch id. The bus carries
  nothing else of a dispatch.
* The replica nudged loads the dispatch from PostgreSQL and delivers it to its own
  streams, by the rules of a lone headend's delivery on register.
* A nudge that fails (no such replica, a timeout, the bus down) is logged and left to
  **reconciliation**: every replica reads the open dispatches from PostgreSQL every
  ``HEADEND_BUS_DISPATCH_RECONCILE_S`` seconds (at once when the bus comes back), delivers
  what its agents serve and has not yet pushed on their current streams, and expires
  submitted targets whose expiry passed (any replica may; it is idempotent). An agent that
  registers gets its undelivered commands at once, wherever they were created.
* Every change to a dispatch is a read-modify-write of the stored record under
  :meth:`~der_sdk.storage.contract.StorageBackend.dispatch_lock` (a PostgreSQL advisory
  lock), with a fresh read inside it: two replicas acknowledging targets of one site
  dispatch, or one expiring it while another delivers it, never overwrite each other.
* A target ``sent`` by a replica that died stays ``sent``; the replica the agent moves to
  sends it again with the same command id, and the agent's journal applies it at most
  once and reports what it recorded. A target sent on a stream this replica holds is not
  sent again on that stream: the replica remembers the command ids it pushed per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import datetime
from typing import Any

from der_sdk.bus.contract import BusError
from der_sdk.inventory import Inventory
from der_sdk.models import (
    Dispatch,
    DispatchRequest,
    DispatchTarget,
    Event,
    LocalDispatchReport,
    SetpointAck,
    utc_now,
)
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import StorageBackend
from der_sdk.tasks import cancel_and_wait
from der_sdk_headend.cluster.core import Cluster
from der_sdk_headend.dispatch import lifecycle, planning
from der_sdk_headend.dispatch.delivery import (
    SCHEDULE_HELD_STATES,
    Command,
    Delivery,
    cancel_command_id,
)
from der_sdk_headend.dispatch.dispatcher import Dispatcher
from der_sdk_headend.dispatch.lifecycle import derive_state
from der_sdk_headend.dispatch.records import copy_dispatch
from der_sdk_headend.dispatch.router import AgentPeer, DispatchRouter

__all__ = [
    "DEFAULT_RECONCILE_S",
    "NUDGE_KIND",
    "ClusterDispatcher",
    "Locate",
]

log = logging.getLogger("der.headend.dispatch")

NUDGE_KIND = "dispatch.deliver"
"""The cluster command asking a replica to deliver a dispatch; its body is the id."""
NUDGE_TIMEOUT_S = 2.0
"""How long a nudge waits for the replica to take it before reconciliation is left to."""
DEFAULT_RECONCILE_S = 2.0
"""Seconds between reconciliation passes (``HEADEND_BUS_DISPATCH_RECONCILE_S``)."""
BUS_WATCH_S = 0.25
"""How often the reconciliation loop looks whether the bus came back."""
OPEN_LIMIT = 10_000
"""How many open dispatches of each open state one read from storage returns."""

_DELIVERABLE: tuple[str, ...] = ("submitted", "sent")
"""The dispatch states with targets to deliver (any target submitted or sent makes the
dispatch one of these, see :func:`~der_sdk_headend.dispatch.lifecycle.derive_state`)."""
_DELIVERABLE_RECORDS: tuple[str, ...] = (*_DELIVERABLE, "scheduled", "active")
"""The record states that may hold such targets: a schedule is ``scheduled`` while its
targets are submitted or sent (docs/dispatch.md), and ``scheduled`` or ``active`` while
an agent holds a target whose cancel was asked for."""

Locate = Callable[[str], "str | None"]
"""Asset id → the bus name of the replica holding the stream that serves it, or ``None``
when no replica does (the agent is offline) or it is not known."""


class ClusterDispatcher(Dispatcher):
    """The dispatcher of a replica: PostgreSQL is the record, this replica pushes only to
    the streams it holds, and other replicas are nudged over the bus.

    :param router: this replica's router (its own streams).
    :param cluster: this replica's bus connection; the ``dispatch.deliver`` command is
        registered on it here, so build this before ``cluster.serve()``.
    :param locate: where an asset's agent is (cluster presence); ``None``, or an asset it
        does not know, leaves delivery to the holder's reconciliation. May be set later
        through :attr:`locate`.
    :param reconcile_s: seconds between reconciliation passes.
    """

    def __init__(
        self,
        inventory: Inventory,
        plugins: Plugins,
        storage: StorageBackend,
        router: DispatchRouter,
        policy_name: str,
        *,
        cluster: Cluster,
        locate: Locate | None = None,
        reconcile_s: float = DEFAULT_RECONCILE_S,
    ) -> None:
        super().__init__(inventory, plugins, storage, router, policy_name)
        if not reconcile_s > 0:
            raise ValueError(f"reconcile_s must be more than 0, got {reconcile_s}")
        self._cluster = cluster
        self.locate: Locate | None = locate
        """Where an asset's agent is: the replica's bus name, or ``None``."""
        self.reconcile_s = reconcile_s
        self._pushed: dict[AgentPeer, set[str]] = {}
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self.nudges_sent = 0
        """Nudges another replica took."""
        self.nudges_failed = 0
        """Nudges that failed (left to reconciliation)."""
        self.reconciled = 0
        """Dispatches reconciliation delivered or sent again here."""
        cluster.on_command(NUDGE_KIND, self._on_nudge)

    # ------------------------------------------------------------------ lifecycle

    async def load_open(self) -> int:
        """Settle open dispatches stored out of bounds; count the open ones. Nothing is
        kept in memory: every replica reads them from storage when it needs them."""
        stored = await self._open_stored()
        for dispatch in stored:
            if planning.out_of_bounds(dispatch) is None:
                continue
            async with self._lock, self._storage.dispatch_lock(dispatch.dispatch_id):
                fresh = await self._storage.get_dispatch(dispatch.dispatch_id)
                if fresh is None or not lifecycle.is_open(fresh):
                    continue
                why = planning.out_of_bounds(fresh)
                if why is not None:
                    log.warning("dispatch %s: %s; settled failed", fresh.dispatch_id, why)
                    await self._settle_undeliverable(fresh, fresh.targets, why)
        return len(stored)

    def start(self) -> None:
        """Start reconciliation and the worker that serves nudges."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(
                self._reconcile_loop(), name="headend-dispatch-reconcile"
            )
        if self._worker_task is None:
            self._worker_task = asyncio.create_task(
                self._nudge_worker(), name="headend-dispatch-nudges"
            )

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, self._worker_task, *self._tasks) if t is not None]
        self._loop_task = self._worker_task = None
        await cancel_and_wait(tasks)
        await super().close()

    def wake(self) -> None:
        """Run a reconciliation pass now."""
        self._wake.set()

    # ------------------------------------------------------------------ cancel

    async def cancel(self, dispatch_id: str, by: str) -> Dispatch | None:
        """:meth:`Dispatcher.cancel` on the stored record, under the dispatch's lock: the
        cancel goes to this replica's streams at once, and the replicas holding the
        other agents are nudged to send it; an agent on no replica gets it when it
        registers, and a nudge that is lost is made good by reconciliation."""
        async with self._lock, self._storage.dispatch_lock(dispatch_id):
            dispatch = await self._storage.get_dispatch(dispatch_id)
            if dispatch is None:
                return None
            elsewhere = await self._cancel_in(
                dispatch,
                by,
                "the rest by the replicas holding their agents, or when their agent connects",
            )
            snapshot = copy_dispatch(dispatch)
        for replica in self._replicas_of(t.asset_id for t in elsewhere):
            self._spawn(self._send_nudge(replica, dispatch_id), f"nudge-{replica}")
        return snapshot

    # ------------------------------------------------------------------ create

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
        # The new dispatch's lock first, then each older one's in turn: only a create
        # holds two, always in that order, so replicas never wait on each other in a ring.
        async with self._lock, self._storage.dispatch_lock(dispatch.dispatch_id):
            if idempotency_key is not None:  # a concurrent request with the same key
                known = await self._storage.get_dispatch(dispatch.dispatch_id)
                if known is not None:
                    return planning.replay(known, fingerprint), False
            await self._supersede_stored(dispatch)
            route = self._route_new(dispatch)
            dispatch.state = derive_state(dispatch.targets)
            remote = self._remote_replicas(dispatch)
            if remote:
                route = _route_with_remote(dispatch, route, remote)
            await self._store(
                dispatch,
                f"created by {source} on replica {self._cluster.replica}; {route}",
                events=() if audit is None else (audit(dispatch),),
            )
            self._log_created(dispatch, route)
            snapshot = copy_dispatch(dispatch)
        for replica in remote:  # after the record, so the replica reads it
            self._spawn(self._send_nudge(replica, dispatch.dispatch_id), f"nudge-{replica}")
        if dispatch.expires_at is not None:
            self._wake.set()  # the next pass expires it on time
        return snapshot, True

    async def _supersede_stored(self, newer: Dispatch) -> None:
        """Supersede the stored submitted targets for the assets of ``newer``, each
        older dispatch under its lock. Every target of a dispatch is of its site, so
        the site's submitted dispatches are all there is to look at."""
        assets = {t.asset_id for t in newer.targets}
        candidates = await self._storage.dispatch_history(
            site_id=newer.site_id, state="submitted", limit=OPEN_LIMIT
        )
        for older in sorted(candidates, key=lambda d: d.created_at):
            if older.dispatch_id == newer.dispatch_id or not any(
                t.state == "submitted" and t.asset_id in assets for t in older.targets
            ):
                continue
            async with self._storage.dispatch_lock(older.dispatch_id):
                fresh = await self._storage.get_dispatch(older.dispatch_id)
                if fresh is not None:
                    await self._supersede_in(fresh, newer, assets)

    def _remote_replicas(self, dispatch: Dispatch) -> dict[str, list[str]]:
        """Replica → the submitted targets' assets whose agents it holds (not this one)."""
        submitted = (t.asset_id for t in dispatch.targets if t.state == "submitted")
        return self._replicas_of(submitted)

    def _replicas_of(self, assets: Iterable[str]) -> dict[str, list[str]]:
        """Replica → which of ``assets`` it holds the agents of (other replicas only)."""
        locate = self.locate
        remote: dict[str, list[str]] = {}
        if locate is None:
            return remote
        for asset_id in assets:
            try:
                replica = locate(asset_id)
            except Exception:
                log.exception("locating the agent of asset %s failed", asset_id)
                continue
            if replica is not None and replica != self._cluster.replica:
                remote.setdefault(replica, []).append(asset_id)
        return remote

    # ------------------------------------------------------------------ nudges

    async def _send_nudge(self, replica: str, dispatch_id: str) -> None:
        try:
            await self._cluster.send(
                replica, NUDGE_KIND, dispatch_id.encode(), timeout_s=NUDGE_TIMEOUT_S
            )
        except Exception as exc:
            self.nudges_failed += 1
            level = logging.WARNING if isinstance(exc, BusError) else logging.ERROR
            log.log(
                level,
                "dispatch %s: asking replica %s to deliver it failed (%s: %s); it is "
                "delivered by reconciliation (every %g s) once its agent is on a replica",
                dispatch_id,
                replica,
                type(exc).__name__,
                exc,
                self.reconcile_s,
            )
            return
        self.nudges_sent += 1

    async def _on_nudge(self, body: bytes) -> bytes:
        """Another replica asks this one to deliver a dispatch: queue it and answer."""
        dispatch_id = body.decode()
        if not dispatch_id:
            raise ValueError("dispatch.deliver needs a dispatch id")
        if dispatch_id not in self._queued:
            self._queued.add(dispatch_id)
            self._queue.put_nowait(dispatch_id)
        return b""

    async def _nudge_worker(self) -> None:
        while True:
            dispatch_id = await self._queue.get()
            self._queued.discard(dispatch_id)
            try:
                await self._settle(dispatch_id, "at the request of another replica, to")
            except Exception:
                log.exception(
                    "dispatch %s: delivering it on request of another replica failed; "
                    "reconciliation tries again",
                    dispatch_id,
                )

    # ------------------------------------------------------------------ delivery

    def _push(self, peer: AgentPeer, commands: Sequence[Command]) -> None:
        super()._push(peer, commands)
        pushed = self._pushed.setdefault(peer, set())
        pushed.update(c.setpoint.command_id for c in commands)

    def _plan_delivery(self, peer: AgentPeer, dispatch: Dispatch, now: datetime) -> Delivery:
        delivery = super()._plan_delivery(peer, dispatch, now)
        pushed = self._pushed.get(peer)
        if delivery.resend and pushed:
            resend = [c for c in delivery.resend if c.setpoint.command_id not in pushed]
            if len(resend) != len(delivery.resend):
                delivery.resend = resend
                count = len({c.setpoint.command_id for c in resend})
                delivery.resend_how = f"{count} unacknowledged command(s) sent again"
        return delivery

    async def deliver_pending(self, peer: AgentPeer) -> int:
        """Deliver what ``peer`` (an agent that registered here) serves, from every open
        dispatch in storage, wherever it was created."""
        delivered = 0
        for dispatch in await self._open_stored(site_id=peer.site_id):
            if any(_to_deliver(dispatch, t) and peer.serves(t.asset_id) for t in dispatch.targets):
                delivered += await self._settle(dispatch.dispatch_id, "on register of")
        return delivered

    async def _settle(self, dispatch_id: str, occasion: str) -> int:
        """Under the dispatch's lock, from a fresh read: expire its submitted targets if
        its expiry passed, and deliver to this replica's streams what they serve and
        were not sent on them. ``occasion`` and the agent end the lifecycle event's text
        (``on register of`` agent ...). :return: 1 when something was sent."""
        async with self._lock, self._storage.dispatch_lock(dispatch_id):
            dispatch = await self._storage.get_dispatch(dispatch_id)
            if dispatch is None or not lifecycle.is_open(dispatch):
                return 0
            now = utc_now()
            await self._expire_due(dispatch, now)
            delivered = 0
            for peer in self._local_peers(dispatch):
                where = f"{occasion} {peer.describe()} on replica {self._cluster.replica}"
                delivered += await self._deliver_to(peer, dispatch, now, where)
            return 1 if delivered else 0

    def _local_peers(self, dispatch: Dispatch) -> list[AgentPeer]:
        """This replica's streams with something of ``dispatch`` to send, in target order."""
        peers: list[AgentPeer] = []
        for target in dispatch.targets:
            if not _to_deliver(dispatch, target):
                continue
            peer = self._router.peer_for(target.asset_id)
            if peer is None or peer in peers:
                continue
            if _cancelling(dispatch):
                command_id = cancel_command_id(dispatch, target)
            else:
                command_id = target.command_id or dispatch.dispatch_id
            if target.state == "submitted" or command_id not in self._pushed.get(peer, ()):
                peers.append(peer)
        return peers

    async def _expire_due(self, dispatch: Dispatch, now: datetime) -> None:
        if dispatch.expires_at is None or dispatch.expires_at > now:
            return
        waiting = [t for t in dispatch.targets if t.state == "submitted"]
        if not waiting:
            return
        why = f"expired at {dispatch.expires_at.isoformat()} before it could be sent"
        lifecycle.move(dispatch, waiting, "expire", why)
        await self._record(dispatch, why)
        log.info("dispatch %s: %s (now %s)", dispatch.dispatch_id, why, dispatch.state)

    # ------------------------------------------------------------------ reconciliation

    async def reconcile(self) -> float | None:
        """One pass: deliver or expire, from storage, what this replica should.

        :return: seconds until the earliest expiry of a submitted target left waiting
            (``None``: none), so the next pass expires it on time.
        """
        now = utc_now()
        next_expiry: datetime | None = None
        for dispatch in await self._open_stored():
            if self._has_work(dispatch, now):
                try:
                    settled = await self._settle(dispatch.dispatch_id, "by reconciliation, to")
                    self.reconciled += settled
                except Exception:
                    log.exception(
                        "dispatch %s: reconciling it failed; trying again next pass",
                        dispatch.dispatch_id,
                    )
                continue
            expires_at = dispatch.expires_at
            if expires_at is not None and any(t.state == "submitted" for t in dispatch.targets):
                next_expiry = expires_at if next_expiry is None else min(next_expiry, expires_at)
        if next_expiry is None:
            return None
        return max(0.0, (next_expiry - utc_now()).total_seconds())

    def _has_work(self, dispatch: Dispatch, now: datetime) -> bool:
        """Whether :meth:`_settle` would change ``dispatch`` here (read before locking)."""
        submitted = any(t.state == "submitted" for t in dispatch.targets)
        if submitted and dispatch.expires_at is not None and dispatch.expires_at <= now:
            return True
        return bool(self._local_peers(dispatch))

    async def _reconcile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        connected = self._cluster.connected
        failing = False
        while True:
            was_connected, connected = connected, self._cluster.connected
            if self._wake.is_set() or loop.time() >= due or (connected and not was_connected):
                self._wake.clear()
                next_expiry_s: float | None = None
                try:
                    next_expiry_s = await self.reconcile()
                    if failing:
                        log.info("dispatch reconciliation works again")
                        failing = False
                except Exception as exc:
                    if not failing:
                        log.warning(
                            "dispatch reconciliation failed (%s: %s); retrying every %g s",
                            type(exc).__name__,
                            exc,
                            self.reconcile_s,
                        )
                        failing = True
                due = loop.time() + self.reconcile_s
                if next_expiry_s is not None:
                    due = min(due, loop.time() + next_expiry_s + 0.001)
            wait = max(0.0, min(BUS_WATCH_S, due - loop.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    # ------------------------------------------------------------------ acknowledgements

    async def on_ack(self, peer: AgentPeer, ack: SetpointAck) -> None:
        """Apply an acknowledgement to the stored record, under the dispatch's lock."""
        dispatch_id = ack.command_id.partition("/")[0]
        async with self._lock, self._storage.dispatch_lock(dispatch_id):
            dispatch = await self._storage.get_dispatch(dispatch_id)
            stored = await self._apply_ack(peer, ack, dispatch)
            if stored is not None:
                await stored  # inside the dispatch's lock: other replicas read it next
        if ack.status != "acked":
            pushed = self._pushed.get(peer)
            if pushed is not None:
                pushed.discard(ack.command_id)

    async def record_local(self, peer: AgentPeer, report: LocalDispatchReport) -> Dispatch | None:
        if not report.command_id:
            return await super().record_local(peer, report)
        async with self._lock, self._storage.dispatch_lock(report.command_id):
            return await self._record_local(peer, report)

    async def on_stream_end(self, peer: AgentPeer) -> None:
        """Forget what was pushed on the stream: a new one gets it all again."""
        self._pushed.pop(peer, None)

    # ------------------------------------------------------------------ record

    def _write_later(
        self,
        dispatch: Dispatch,
        detail: str,
        *,
        events: Sequence[Event] = (),
        then: Callable[[], None] | None = None,
    ) -> Awaitable[None]:
        """Write at once (when awaited), in the caller's storage dispatch lock: another
        replica may read the record as soon as the lock is released."""
        return self._store(dispatch, detail, events, then)

    def _index(self, dispatch: Dispatch) -> None:
        """Nothing: storage is the only record (no copy that other replicas change)."""

    async def _open_stored(self, site_id: str | None = None) -> list[Dispatch]:
        """The stored dispatches with targets to deliver, oldest first."""
        stored: list[Dispatch] = []
        for state in _DELIVERABLE_RECORDS:
            stored += await self._storage.dispatch_history(
                site_id=site_id, state=state, limit=OPEN_LIMIT
            )
        return sorted(stored, key=lambda d: d.created_at)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work, name=f"headend-dispatch-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _route_with_remote(dispatch: Dispatch, route: str, remote: dict[str, list[str]]) -> str:
    """The route sentence of a new dispatch, naming the replicas that deliver it."""
    where = "; ".join(f"replica {r}: {', '.join(assets)}" for r, assets in remote.items())
    if dispatch.asset_id is not None:
        return f"asset {dispatch.asset_id} is on another replica, kept submitted for it ({where})"
    return f"{route}; on other replicas, asked to deliver ({where})"


def _cancelling(dispatch: Dispatch) -> bool:
    """A schedule whose cancel was asked for: its held targets get cancel commands."""
    return dispatch.cancel_requested_at is not None and dispatch.start_at is not None


def _to_deliver(dispatch: Dispatch, target: DispatchTarget) -> bool:
    """Whether ``target`` has a command for its agent: submitted or unacknowledged, or a
    schedule target its agent may hold once a cancel was asked for."""
    if _cancelling(dispatch):
        return target.state in SCHEDULE_HELD_STATES
    return target.state in _DELIVERABLE
