"""Comms loss: an alarm for each asset of an agent whose stream ended and did not come
back within a grace time (``HEADEND_COMMS_LOSS_ALARM_S``, default 30 s), cleared when an
agent serves the asset again (docs/alarms.md).

Raises and clears run in turn on one task of the watch, so a storm of thousands of
agents lost or back at once takes one storage connection. A raise checks, before and
after it is stored, whether an agent registered the asset again after it was lost (an
open session in storage, newer than the loss): the agent's own clear may have run just
before the raise (on another replica, or here between the check and the write), and then
the raise clears what it raised.

The watch listens to :class:`~der_sdk_headend.presence.Presence`: a stream that ends
starts one timer for the assets it served; when it fires, every asset that no agent
serves by then (on this headend, or in a cluster on any replica: ``connected``) gets a
``comms_loss`` alarm (severity ``major``) raised at the moment the stream ended. A stream
that registers cancels its assets' timers and clears their ``comms_loss``. At start, once
the grace time is over, each asset whose newest session ended at least the grace time
before gets one too (the headend may have stopped while its agent was away).

In a cluster the replica whose stream ended starts a timer, and raising is
idempotent in storage (:meth:`~der_sdk.storage.contract.StorageBackend.update_alarm`), so
replicas that check at start raise one alarm between them, not one each. Every replica
also starts the grace time for agents that leave the cluster's view from another replica
(their entry deleted or expired, or their replica died or stopped:
:meth:`CommsLossWatch.lost_elsewhere`), so a replica that dies or stops does not take the
alarm with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime, timedelta
from typing import Any

from der_sdk.inventory import Inventory
from der_sdk.models import Alarm, utc_now
from der_sdk.storage.contract import StorageBackend
from der_sdk_headend.alarms.book import AlarmBook
from der_sdk_headend.alarms.state import COMMS_LOSS, Condition
from der_sdk_headend.presence import AgentStream, Presence

__all__ = ["DEFAULT_COMMS_LOSS_S", "LOAD_PAGE", "RETRY_S", "CommsLossWatch"]

log = logging.getLogger("der.headend.alarms")

DEFAULT_COMMS_LOSS_S = 30.0
"""``HEADEND_COMMS_LOSS_ALARM_S``: how long an agent may stay away before its assets'
``comms_loss`` alarms are raised."""

RETRY_S = 1.0
"""Wait before raising or clearing ``comms_loss`` alarms again when storage failed."""
LOAD_PAGE = 1000
"""Alarms read per query when the active ``comms_loss`` alarms are loaded at start."""


class CommsLossWatch:
    """Raises and clears ``comms_loss`` alarms from presence (module docstring).

    :param connected: whether an agent serves the asset now (anywhere in a cluster).
    """

    def __init__(
        self,
        book: AlarmBook,
        presence: Presence,
        inventory: Inventory,
        storage: StorageBackend,
        *,
        grace_s: float = DEFAULT_COMMS_LOSS_S,
        connected: Callable[[str], bool] | None = None,
    ) -> None:
        self._book = book
        self._presence = presence
        self._inventory = inventory
        self._storage = storage
        self.grace_s = grace_s
        self._connected = connected or (lambda asset_id: presence.stream_for(asset_id) is not None)
        self._served: dict[str, tuple[str, ...]] = {}  # stream id → the assets it served
        self._timers: dict[str, asyncio.TimerHandle] = {}  # asset id → its pending check
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._returned: dict[str, set[str]] = {}  # site id → assets back, to clear
        self._overdue: dict[str, tuple[datetime, str]] = {}  # asset → (lost at, who), to raise
        self._wake = asyncio.Event()
        self._lost: set[str] | None = None
        """The assets with an active ``comms_loss``, when this process alone changes
        alarms (storage not shared): a registering agent then clears only those, with no
        storage round trip for the others. ``None``: unknown, every one is cleared."""

    async def start(self) -> None:
        """Listen to presence, and check every asset that had a session before once the
        grace time is over (a headend that starts does not know who was away)."""
        if not self._storage.shared:
            self._lost = await self._active_losses()
        self._presence.add_listener(self._on_attach, self._on_detach)
        self._spawn(self._check_at_start())
        self._spawn(self._work())

    async def _active_losses(self, site_id: str | None = None) -> set[str]:
        """The assets with an active ``comms_loss`` (of site ``site_id``, or all)."""
        lost: set[str] = set()
        after = None
        while True:
            page = await self._storage.alarms(
                code=COMMS_LOSS, state="active", site_id=site_id, after=after, limit=LOAD_PAGE
            )
            lost.update(alarm.asset_id for alarm in page)
            if len(page) < LOAD_PAGE:
                return lost
            after = page[-1].alarm_id

    async def close(self) -> None:
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ presence

    def _on_attach(self, stream: AgentStream) -> None:
        assets = tuple(stream.asset_ids)
        self._served[stream.stream_id] = assets
        for asset_id in assets:
            handle = self._timers.pop(asset_id, None)
            if handle is not None:
                handle.cancel()
            self._overdue.pop(asset_id, None)
        if self._closed or not assets:
            return
        if self._lost is not None:
            assets = tuple(a for a in assets if a in self._lost)
        if assets:
            self._returned.setdefault(stream.site_id, set()).update(assets)
            self._wake.set()

    def _on_detach(self, stream: AgentStream) -> None:
        assets = self._served.pop(stream.stream_id, ())
        if self._closed or not assets:
            return
        lost_at = stream.last_seen
        loop = asyncio.get_running_loop()
        for asset_id in assets:
            old = self._timers.pop(asset_id, None)
            if old is not None:
                old.cancel()
            self._timers[asset_id] = loop.call_later(
                self.grace_s, self._due, asset_id, lost_at, stream.agent_id
            )

    def lost_elsewhere(self, agents: Iterable[tuple[str, Iterable[str]]]) -> None:
        """Agents another replica held left the cluster's view (their stream ended there,
        or that replica died or stopped): start their grace time here too, since that
        replica's timers may die with it. An agent back anywhere by then raises nothing;
        every replica does this, and raising is idempotent in storage."""
        if self._closed:
            return
        lost_at = utc_now()
        loop = asyncio.get_running_loop()
        for agent_id, asset_ids in agents:
            for asset_id in asset_ids:
                if asset_id in self._timers:
                    continue
                self._timers[asset_id] = loop.call_later(
                    self.grace_s, self._due, asset_id, lost_at, agent_id
                )

    def _due(self, asset_id: str, lost_at: datetime, agent_id: str) -> None:
        self._timers.pop(asset_id, None)
        if not self._closed:
            self._overdue[asset_id] = (lost_at, f"agent {agent_id}")
            self._wake.set()

    # ------------------------------------------------------------------ alarms

    async def _check_at_start(self) -> None:
        """Raise for the assets whose newest session ended at least the grace time ago
        (one that ended later is some stream's timer's, here or on another replica; an
        open one is an agent's that is connected, or a dead replica's that is closed
        soon)."""
        await asyncio.sleep(self.grace_s)
        grace = timedelta(seconds=self.grace_s)
        for asset_id in self._inventory.assets:
            if self._connected(asset_id) or asset_id in self._timers:
                continue
            sessions = await self._storage.recent_sessions(asset_id, limit=1)
            ended = sessions[0].disconnected_at if sessions else None
            if ended is not None and utc_now() - ended >= grace:
                self._overdue.setdefault(asset_id, (ended, "its agent"))
                self._wake.set()

    async def _raise(self, asset_id: str, lost_at: datetime, who: str) -> None:
        if self._connected(asset_id) or await self._back(asset_id, lost_at) is not None:
            return
        if self._lost is not None:  # before the write: a clear may follow at once
            self._lost.add(asset_id)
        text = f"{who} lost its link to the headend and was not back within {self.grace_s:g} s"
        alarm = await self._apply(asset_id, True, lost_at, text)
        # An agent may have registered (on another replica, or here) between the checks
        # and the raise, and found nothing to clear. Its session was stored before it
        # cleared, and its clear and this raise are serialised by storage: a session seen
        # now means the raise came last, so clear what it raised.
        if alarm is not None and (back := await self._back(asset_id, lost_at)) is not None:
            await self._clear([asset_id], back)

    async def _back(self, asset_id: str, lost_at: datetime) -> datetime | None:
        """When an agent registered the asset again after ``lost_at``, by its open
        session in storage (shared by a cluster's replicas), or ``None``."""
        sessions = await self._storage.recent_sessions(asset_id, limit=1)
        if sessions and sessions[0].disconnected_at is None:
            connected_at = sessions[0].connected_at
            if connected_at >= lost_at:
                return connected_at
        return None

    async def _work(self) -> None:
        """Raise for the assets whose grace time is over and clear for those whose agents
        registered, in turn on this one task: a storm of thousands of agents lost or back
        at once takes one storage connection, not one per asset. Clears go a site at a
        time; on a shared storage one read per site finds what to clear (a raise that
        lands after it clears itself: :meth:`_raise`). What fails is tried again."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._returned or self._overdue:
                try:
                    await self._work_once()
                except Exception as exc:
                    log.error(
                        "comms_loss alarms not updated: %s: %s; retrying in %g s",
                        type(exc).__name__,
                        exc,
                        RETRY_S,
                    )
                    await asyncio.sleep(RETRY_S)

    async def _work_once(self) -> None:
        if self._returned:
            site_id, assets = self._returned.popitem()
            try:
                if self._lost is None:
                    active = await self._active_losses(site_id)
                    assets = {a for a in assets if a in active}
                await self._clear(sorted(assets), utc_now())
            except BaseException:
                self._returned.setdefault(site_id, set()).update(assets)
                raise
        if self._overdue:
            asset_id, (lost_at, who) = next(iter(self._overdue.items()))
            await self._raise(asset_id, lost_at, who)
            if self._overdue.get(asset_id) == (lost_at, who):
                del self._overdue[asset_id]

    async def _clear(self, asset_ids: Iterable[str], at: datetime) -> None:
        for asset_id in asset_ids:
            if self._lost is not None:
                self._lost.discard(asset_id)
            await self._apply(asset_id, False, at, "an agent serves it again")

    async def _apply(self, asset_id: str, active: bool, at: datetime, text: str) -> Alarm | None:
        asset = self._inventory.assets.get(asset_id)
        if asset is None:  # left the inventory
            return None
        return await self._book.apply(
            Condition(
                asset_id=asset_id,
                site_id=asset.site_id,
                code=COMMS_LOSS,
                active=active,
                at=at,
                severity="major",
                text=text,
            )
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("comms-loss alarm update failed: %s: %s", type(exc).__name__, exc)
