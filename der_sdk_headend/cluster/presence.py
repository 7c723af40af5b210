"""One view of presence across the replicas of a cluster.

Each replica writes what it holds into the bus's presence table
(:class:`der_sdk.bus.PresenceTable`), and watches the table into an in-memory view, so
that every replica can say which agents are connected to the cluster and which replica
holds the stream of an asset's agent:

``agents.<agent>``
    one entry per agent stream this replica holds (:class:`AgentPresence`): claimed when
    the stream is attached, released when it ends, refreshed every third of the table's
    max age meanwhile. An agent that moved to another replica is claimed there (the
    newest claim wins); this replica then stops refreshing it and never deletes the
    other's claim.
``replicas.<replica>``
    one entry per live replica (:class:`ReplicaPresence`), refreshed the same way. When
    it expires (the replica died) or is deleted (it stopped), every surviving replica
    closes the dead replica's open sessions in storage (``HEADEND_ID``-scoped, so doing
    it more than once is harmless), and drops its agents from the view at once.

The bus may go away and come back: calls that fail are logged once and retried on the
next tick, never in an agent's way; entries that expired meanwhile are claimed again (and
this replica's live sessions, which the others may have closed meanwhile, written open
again), and the view is rebuilt from a fresh snapshot.

A replica is authoritative for its own streams: its view of its own agents comes from
its :class:`~der_sdk_headend.presence.Presence`, so a connect or disconnect shows on it at
once, and on the others as soon as their watch sees the write (milliseconds).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from der_sdk.bus.contract import (
    BusError,
    PresenceChange,
    PresenceConflictError,
    PresenceEntry,
    PresenceTable,
    PresenceWatch,
    check_key,
)
from der_sdk.models import utc_now
from der_sdk.storage.contract import StorageBackend
from der_sdk.tasks import cancel_and_wait
from der_sdk_headend.cluster.core import Cluster
from der_sdk_headend.presence import AgentStream, Presence

__all__ = [
    "AGENT_PREFIX",
    "REPLICA_PREFIX",
    "AgentPresence",
    "ClusterPresence",
    "ReplicaPresence",
    "agent_key",
]

log = logging.getLogger("der.headend.cluster.presence")

AGENT_PREFIX = "agents."
REPLICA_PREFIX = "replicas."
CALLS_AT_ONCE = 64
"""Presence writes in flight at once during a refresh tick."""
RELEASE_AT_STOP_S = 5.0
"""How long a clean stop waits to release this replica's entries before leaving them to
expire."""
REWATCH_WAIT_S = 1.0
"""Wait before watching the table again after a watch failed or ended."""

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")


def agent_key(agent_id: str) -> str:
    """The presence key of ``agent_id``: ``agents.`` and the id itself when it is made of
    letters, digits, ``-`` and ``_``, else ``agents.=`` and its UTF-8 in unpadded base64url
    (which never starts with ``=``, so the two never meet)."""
    if _PLAIN.fullmatch(agent_id):
        return check_key(AGENT_PREFIX + agent_id)
    encoded = base64.urlsafe_b64encode(agent_id.encode()).decode().rstrip("=")
    return check_key(f"{AGENT_PREFIX}={encoded}")


class AgentPresence(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's entry: who it is, what it serves and which replica holds its stream."""

    agent_id: str
    site_id: str
    asset_ids: tuple[str, ...]
    replica: str
    """The holder's bus name: where commands for this agent go."""
    headend_id: str
    """The holder's ``HEADEND_ID``: what its sessions record."""
    connected_at: datetime
    peer: str


class ReplicaPresence(msgspec.Struct, frozen=True, kw_only=True):
    """A live replica's entry."""

    replica: str
    headend_id: str
    started_at: datetime


_encode = msgspec.msgpack.Encoder().encode
_decode_agent = msgspec.msgpack.Decoder(AgentPresence).decode
_decode_replica = msgspec.msgpack.Decoder(ReplicaPresence).decode


@dataclass(eq=False, slots=True)
class _Held:
    """An agent stream this replica holds, and its claim on the bus."""

    stream: AgentStream
    key: str
    revision: int | None = None
    """The revision of our claim; ``None`` until it is written."""
    busy: bool = False
    """A write of the claim is in flight."""
    lost: bool = False
    """Another replica claimed the agent since: leave its entry alone."""


class ClusterPresence:
    """This replica's entries in the presence table, and the cluster's view of it.

    :param cluster: the replica's bus connection (connected before :meth:`start`).
    :param presence: this replica's agent streams.
    :param storage: the shared storage, where a dead replica's sessions are closed.
    """

    def __init__(self, cluster: Cluster, presence: Presence, storage: StorageBackend) -> None:
        self._cluster = cluster
        self._presence = presence
        self._storage = storage
        self._table: PresenceTable = cluster.bus.presence
        self.replica = cluster.replica
        self.headend_id = cluster.replica_id
        self._replica_key = check_key(REPLICA_PREFIX + self.replica)
        self._replica_value = _encode(
            ReplicaPresence(replica=self.replica, headend_id=self.headend_id, started_at=utc_now())
        )
        self._replica_revision: int | None = None
        self._held: dict[str, _Held] = {}
        self._to_release: dict[str, int] = {}
        # The view of the table: every agent entry by agent id, and live replicas.
        self._agents: dict[str, tuple[AgentPresence, int]] = {}
        self._agent_of_key: dict[str, str] = {}
        self._replicas: dict[str, ReplicaPresence] = {}
        self._cache: tuple[dict[str, AgentPresence], dict[str, AgentPresence]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._watch: PresenceWatch | None = None
        self._watching = asyncio.Event()
        self._bus_down = False
        self._reopen_sessions = 0
        self._closed = False
        self.on_agents_gone: Callable[[list[AgentPresence]], None] | None = None
        """Told (synchronously) of other replicas' agents that left the view: their
        entry was deleted or expired, or their replica died or stopped. The comms-loss
        watch starts their grace time (der_sdk_headend/alarms/comms.py)."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def interval_s(self) -> float:
        """Seconds between refreshes: a third of the table's max age."""
        return self._table.max_age_s / 3

    async def start(self) -> None:
        """Claim this replica's key, start watching the table and refreshing, and listen
        to this replica's streams. Before agents are accepted: a bus that fails here is
        retried on the next tick, not raised."""
        await self._claim_replica()
        self._presence.add_listener(self._on_attach, self._on_detach)
        self._watch_task = asyncio.create_task(self._watch_loop(), name="cluster-presence-watch")
        self._tick_task = asyncio.create_task(self._tick_loop(), name="cluster-presence-refresh")
        # The first view, so counts are right from the start (a bus that is down now is
        # watched as soon as it is back).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.interval_s):
                await self._watching.wait()

    async def close(self, *, release: bool = True) -> None:
        """Stop refreshing and watching; with ``release`` (a clean stop) delete this
        replica's entries first, so the others see it gone at once. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait([self._tick_task, self._watch_task])
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.interval_s)
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.close()
        if not release:
            return
        releases = dict(self._to_release)
        for held in self._held.values():
            if held.revision is not None and not held.lost:
                releases[held.key] = held.revision
        if self._replica_revision is not None:
            releases[self._replica_key] = self._replica_revision
        results: list[bool | BaseException] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RELEASE_AT_STOP_S):
                results = await asyncio.gather(
                    *(self._table.release(k, r) for k, r in releases.items()),
                    return_exceptions=True,
                )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed or len(results) < len(releases):
            log.warning(
                "could not release %d of this replica's %d presence entries (%s): they "
                "expire on their own within HEADEND_BUS_PRESENCE_MAX_AGE_S=%g s",
                len(releases) - len(results) + len(failed),
                len(releases),
                failed[0] if failed else "timed out",
                self._table.max_age_s,
            )

    # ------------------------------------------------------------------ the view

    def agents(self) -> list[AgentPresence]:
        """Every agent connected to the cluster, this replica's included."""
        return list(self._merged()[0].values())

    def agent_count(self) -> int:
        return len(self._merged()[0])

    def asset_count(self) -> int:
        return len(self._merged()[1])

    def holder_of_asset(self, asset_id: str) -> AgentPresence | None:
        """The entry of the agent serving ``asset_id`` anywhere in the cluster, or
        ``None`` when no connected agent serves it."""
        return self._merged()[1].get(asset_id)

    def replica_of_asset(self, asset_id: str) -> str | None:
        """The bus name of the replica holding the stream of the agent that serves
        ``asset_id`` (where to send its commands), or ``None`` when it is offline."""
        entry = self._merged()[1].get(asset_id)
        return entry.replica if entry is not None else None

    def replicas(self) -> list[str]:
        """The bus names of the live replicas, this one included, sorted."""
        return sorted({*self._replicas, self.replica})

    def _changed(self) -> None:
        self._cache = None

    def _merged(self) -> tuple[dict[str, AgentPresence], dict[str, AgentPresence]]:
        """Agents by id and by asset: the other replicas' entries from the watch, this
        replica's from its streams; where both name an agent, the newer claim."""
        if self._cache is not None:
            return self._cache
        agents: dict[str, AgentPresence] = {}
        revisions: dict[str, int] = {}
        for agent_id, (entry, revision) in self._agents.items():
            if entry.replica != self.replica:
                agents[agent_id] = entry
                revisions[agent_id] = revision
        for agent_id, held in self._held.items():
            if held.lost:
                continue
            theirs = revisions.get(agent_id)
            if theirs is not None and (
                theirs > held.revision
                if held.revision is not None
                else agents[agent_id].connected_at > held.stream.connected_at
            ):
                continue  # claimed elsewhere after us: it moved
            agents[agent_id] = self._entry(held.stream)
            revisions[agent_id] = held.revision or 0
        by_asset: dict[str, AgentPresence] = {}
        by_asset_revision: dict[str, int] = {}
        for agent_id, entry in agents.items():
            revision = revisions[agent_id]
            for asset_id in entry.asset_ids:
                if by_asset_revision.get(asset_id, -1) < revision:
                    by_asset[asset_id] = entry
                    by_asset_revision[asset_id] = revision
        self._cache = (agents, by_asset)
        return self._cache

    def _entry(self, stream: AgentStream) -> AgentPresence:
        return AgentPresence(
            agent_id=stream.agent_id,
            site_id=stream.site_id,
            asset_ids=tuple(stream.asset_ids),
            replica=self.replica,
            headend_id=self.headend_id,
            connected_at=stream.connected_at,
            peer=stream.peer,
        )

    # ------------------------------------------------------------------ our streams

    def _on_attach(self, stream: AgentStream) -> None:
        if self._closed:
            return
        held = _Held(stream, agent_key(stream.agent_id))
        self._held[stream.agent_id] = held
        self._to_release.pop(held.key, None)
        self._changed()
        self._spawn(self._claim(held))

    def _on_detach(self, stream: AgentStream) -> None:
        held = self._held.get(stream.agent_id)
        if held is None or held.stream is not stream:
            return  # a newer stream of the agent holds it now
        del self._held[stream.agent_id]
        self._changed()
        if not held.busy and not self._closed:
            self._spawn(self._release(held))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("cluster presence task failed", exc_info=exc)

    async def _claim(self, held: _Held) -> None:
        held.busy = True
        try:
            held.revision = await self._table.claim(held.key, _encode(self._entry(held.stream)))
            held.lost = False
        except BusError as exc:
            self._bus_failed(exc)
        finally:
            held.busy = False
        self._changed()
        if self._closed or held.revision is None:
            return
        current = self._held.get(held.stream.agent_id)
        if current is None:
            await self._release(held)  # the stream ended while we claimed
        elif current is not held and not current.busy:
            # A newer stream of the agent here claimed before this claim landed: write
            # the newer one again, so the entry describes the stream that is live.
            await self._claim(current)

    async def _release(self, held: _Held) -> None:
        if held.revision is None or held.lost:
            return
        try:
            await self._table.release(held.key, held.revision)
        except BusError as exc:
            self._to_release[held.key] = held.revision
            self._bus_failed(exc)

    # ------------------------------------------------------------------ refreshing

    async def _claim_replica(self) -> None:
        try:
            self._replica_revision = await self._table.claim(self._replica_key, self._replica_value)
        except BusError as exc:
            self._bus_failed(exc)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("refreshing this replica's presence entries failed")

    async def tick(self) -> None:
        """Refresh this replica's entries once (claim those not written yet or expired),
        and release what could not be released before. Called every :attr:`interval_s`."""
        if not self._cluster.connected:
            self._bus_failed(None)
            return
        failed = False
        if self._reopen_sessions:
            self._reopen_sessions -= 1
            await self._reopen()
        try:
            await self._refresh_replica()
        except BusError as exc:
            self._bus_failed(exc)
            return
        for key, revision in list(self._to_release.items()):
            try:
                await self._table.release(key, revision)
                self._to_release.pop(key, None)
            except BusError as exc:
                self._bus_failed(exc)
                failed = True
        todo = [h for h in self._held.values() if not h.busy and not h.lost]
        limit = asyncio.Semaphore(CALLS_AT_ONCE)
        results = await asyncio.gather(*(self._refresh_agent(h, limit) for h in todo))
        failed = failed or not all(results)
        if not failed and self._bus_down:
            self._bus_down = False
            log.info("message bus is back: this replica's presence entries are written again")
            self._rewatch()

    async def _refresh_replica(self) -> None:
        if self._replica_revision is None:
            self._replica_revision = await self._table.claim(self._replica_key, self._replica_value)
            return
        try:
            self._replica_revision = await self._table.refresh(
                self._replica_key, self._replica_value, self._replica_revision
            )
        except PresenceConflictError as exc:
            if exc.current is not None:
                log.error(
                    "another process wrote this replica's presence key %s: is HEADEND_ID=%s "
                    "used by two replicas? Claiming it back",
                    self._replica_key,
                    self.headend_id,
                )
            else:
                log.warning(
                    "this replica's presence entry expired (the bus was away longer than "
                    "HEADEND_BUS_PRESENCE_MAX_AGE_S=%g s): claiming it again and writing "
                    "its open sessions again, which the other replicas may have closed",
                    self._table.max_age_s,
                )
                self._reopen_sessions = 2  # now, and once more on the next tick (a race)
            self._replica_revision = await self._table.claim(self._replica_key, self._replica_value)
            if self._reopen_sessions:
                self._reopen_sessions -= 1
                await self._reopen()

    async def _reopen(self) -> None:
        """Write this replica's live sessions again as open (storage upserts by id)."""
        try:
            for stream in self._presence.streams():
                for session in list(stream.sessions.values()):
                    if session.disconnected_at is None:
                        await self._storage.open_session(session)
        except Exception as exc:
            log.warning("could not write this replica's open sessions again: %s", exc)
            self._reopen_sessions += 1

    async def _refresh_agent(self, held: _Held, limit: asyncio.Semaphore) -> bool:
        """Refresh (or claim) one held entry; ``False`` when the bus failed."""
        async with limit:
            if held.busy or held.lost or self._held.get(held.stream.agent_id) is not held:
                return True
            if held.revision is None:
                await self._claim(held)
                return held.revision is not None
            held.busy = True
            try:
                held.revision = await self._table.refresh(
                    held.key, _encode(self._entry(held.stream)), held.revision
                )
            except PresenceConflictError as exc:
                if exc.current is None:  # expired while the bus was away; still ours
                    held.revision = None
                    held.busy = False
                    await self._claim(held)
                    return held.revision is not None
                try:
                    holder = await self._holder(held.key)
                except BusError as exc:
                    self._bus_failed(exc)
                    return False
                if holder == self.replica:
                    # Written by this replica for an older stream of the agent: ours.
                    held.revision = None
                    held.busy = False
                    await self._claim(held)
                    return held.revision is not None
                held.lost = True
                self._changed()
                log.info(
                    "agent %s was claimed by another replica: no longer refreshing its entry",
                    held.stream.agent_id,
                )
            except BusError as exc:
                self._bus_failed(exc)
                return False
            finally:
                held.busy = False
            if self._held.get(held.stream.agent_id) is not held and not self._closed:
                # The stream ended while this refresh was in flight (its detach saw the
                # entry busy and left the release to whoever held it): release it now,
                # or the others list the agent until the entry expires.
                await self._release(held)
            return True

    async def _holder(self, key: str) -> str | None:
        """The replica whose claim ``key`` holds now, or ``None`` (gone, or unreadable)."""
        entry = await self._table.get(key)
        if entry is None:
            return None
        try:
            return _decode_agent(entry.value).replica
        except msgspec.DecodeError:
            return None

    def _bus_failed(self, exc: BaseException | None) -> None:
        if not self._bus_down:
            self._bus_down = True
            log.warning(
                "message bus unavailable for presence (%s): agents stay connected; "
                "entries are written again when it is back",
                exc if exc is not None else self._cluster.bus.state,
            )

    # ------------------------------------------------------------------ watching

    def _rewatch(self) -> None:
        """Rebuild the view from a fresh snapshot (after a bus outage)."""
        watch = self._watch
        if watch is not None:
            self._spawn(watch.close())

    async def _watch_loop(self) -> None:
        while True:
            try:
                watch = await self._table.watch()
            except BusError as exc:
                log.debug("cannot watch presence yet: %s", exc)
                await asyncio.sleep(REWATCH_WAIT_S)
                continue
            self._watch = watch
            try:
                await self._load(watch.initial)
                self._watching.set()
                async for change in watch:
                    await self._apply(change)
            except BusError as exc:
                log.info("presence watch failed (%s): watching again", exc)
            finally:
                with contextlib.suppress(Exception):
                    await watch.close()
                self._watch = None
            await asyncio.sleep(REWATCH_WAIT_S)

    async def _load(self, initial: dict[str, PresenceEntry]) -> None:
        """Replace the view with a snapshot of the table."""
        before = dict(self._replicas)
        self._agents.clear()
        self._agent_of_key.clear()
        self._replicas.clear()
        for entry in initial.values():
            self._put(entry)
        self._changed()
        if not self._watching.is_set():
            # The first snapshot, before agents are accepted: this replica's agent entries
            # are those of its previous run, which stopped uncleanly. Gone now.
            for agent, (entry_of, revision) in list(self._agents.items()):
                if entry_of.replica == self.replica and agent not in self._held:
                    with contextlib.suppress(BusError):
                        await self._table.release(agent_key(agent), revision)
        for name, gone in before.items():
            if name not in self._replicas:
                await self._replica_gone(name, gone)

    async def _apply(self, change: PresenceChange) -> None:
        if change.kind == "put":
            assert change.entry is not None
            self._put(change.entry)
            self._changed()
            return
        key = change.key
        agent = self._agent_of_key.pop(key, None)
        if agent is not None:
            gone = self._agents.pop(agent, None)
            self._changed()
            if gone is not None and gone[0].replica != self.replica:
                self._gone([gone[0]])
        elif key.startswith(REPLICA_PREFIX):
            record = self._replicas.pop(key.removeprefix(REPLICA_PREFIX), None)
            if record is not None:
                await self._replica_gone(record.replica, record)

    def _gone(self, entries: list[AgentPresence]) -> None:
        if entries and self.on_agents_gone is not None:
            try:
                self.on_agents_gone(entries)
            except Exception:
                log.exception("presence listener failed on agents gone")

    def _put(self, entry: PresenceEntry) -> None:
        try:
            if entry.key.startswith(AGENT_PREFIX):
                agent = _decode_agent(entry.value)
                old = self._agents.get(agent.agent_id)
                if old is not None and old[1] > entry.revision:
                    return
                self._agents[agent.agent_id] = (agent, entry.revision)
                self._agent_of_key[entry.key] = agent.agent_id
            elif entry.key.startswith(REPLICA_PREFIX):
                record = _decode_replica(entry.value)
                self._replicas[record.replica] = record
        except msgspec.DecodeError as exc:
            log.warning("ignoring presence entry %s: %s", entry.key, exc)

    async def _replica_gone(self, name: str, record: ReplicaPresence) -> None:
        """Replica ``name`` stopped or died: drop its agents from the view and close its
        sessions left open, unless it is back already."""
        if name == self.replica:
            return  # our own key: the next tick claims it again
        dropped = [a for a, (entry, _) in self._agents.items() if entry.replica == name]
        entries = [self._agents[agent][0] for agent in dropped]
        for agent in dropped:
            del self._agents[agent]
        for key in [k for k, a in self._agent_of_key.items() if a in dropped]:
            del self._agent_of_key[key]
        self._changed()
        self._gone(entries)
        self._spawn(self._close_sessions_of(name, record))

    async def _close_sessions_of(self, name: str, record: ReplicaPresence) -> None:
        try:
            if await self._table.get(REPLICA_PREFIX + name) is not None:
                return  # it came back meanwhile
            closed = await self._storage.close_open_sessions(
                utc_now(), headend_id=record.headend_id
            )
        except Exception as exc:
            log.warning("could not close the sessions of replica %s: %s", name, exc)
            return
        if closed:
            log.info(
                "replica %s (headend %s) is gone: closed its %d open session(s)",
                name,
                record.headend_id,
                closed,
            )
