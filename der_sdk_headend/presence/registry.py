"""The registry of live agent streams.

Each accepted agent stream is an :class:`AgentStream`; the :class:`Presence` registry maps
every asset to the one stream that serves it. An asset that registers on a new stream
while an older stream still holds it (the agent reconnected before the server noticed the
old connection drop) moves to the new stream, and its old session is closed.

Sessions are opened and closed in storage here, and the ``der_agent_connected`` /
``der_agent_disconnected`` observer hooks fired.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeAlias, TypeVar

from der_sdk.models import (
    Asset,
    BufferStats,
    EventAck,
    Session,
    SetpointCommand,
    SetpointOutcomeAck,
    TelemetryAck,
    utc_now,
)
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import StorageBackend

__all__ = ["AgentStream", "Outbox", "Outgoing", "Presence", "StreamListener", "WireMessage"]

log = logging.getLogger("der.headend.presence")

T = TypeVar("T")


class WireMessage(Protocol):
    """A message already in its wire form (a protobuf ``HeadendMessage``), built by the
    link for its own replies; written as is. Presence never looks inside one."""

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


StreamListener: TypeAlias = Callable[["AgentStream"], None]
"""Told of a stream that was attached or detached (:meth:`Presence.add_listener`)."""

Outgoing: TypeAlias = TelemetryAck | EventAck | SetpointCommand | SetpointOutcomeAck | WireMessage
"""What an agent stream's outbox holds: acks from ingest, commands and outcome acks from
dispatch, the link's own replies. The link encodes it when it writes it."""


class Outbox:
    """The messages waiting for one agent, drained by the stream's one writer.

    What ``asyncio.Queue`` does for one reader and no size limit, at a quarter of its
    memory (about 0.8 KB against 3.3 KB per stream, which a fleet pays per agent).
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Outgoing | None] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Outgoing | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Outgoing | None:
        """The oldest message, waiting for one if there is none (one reader at a time)."""
        while not self._items:
            if self._waiter is not None:
                raise RuntimeError("an Outbox has one reader; another is already waiting")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items


@dataclass(eq=False, kw_only=True, slots=True)
class AgentStream:
    """One accepted agent stream and what it serves.

    ``outbox`` holds the messages for the agent; one writer drains it, so messages never
    interleave. ``None`` in the outbox asks the writer to end the stream.
    """

    agent_id: str
    site_id: str
    peer: str
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    connected_at: datetime = field(default_factory=utc_now)
    last_seen: datetime = field(default_factory=utc_now)
    sessions: dict[str, Session] = field(default_factory=dict)
    outbox: Outbox = field(default_factory=Outbox)
    warned: set[str] = field(default_factory=set)
    """Warnings already logged on this stream (each is logged once per stream)."""
    telemetry_stream: str = ""
    """The agent's telemetry sequence space (``Register.stream_id``; the agent id when an
    older agent sends none). Batch seqs are unique within it across reconnects."""
    buffer: BufferStats | None = None
    """The agent's store-and-forward buffer, from its latest heartbeat."""
    clock_offset_s: float | None = None
    """The agent's clock offset from this headend's (headend minus agent), from its latest
    heartbeat; ``None`` until it reports one."""
    events_seen: set[str] = field(default_factory=set)
    """AgentEvent ids already queued for storage on this stream."""
    certificate_not_after: datetime | None = None
    """When the agent's client certificate expires (mutual TLS); ``None`` without one."""

    def __post_init__(self) -> None:
        if not self.telemetry_stream:
            self.telemetry_stream = self.agent_id

    @property
    def asset_ids(self) -> list[str]:
        """The assets this stream serves now, in registration order."""
        return list(self.sessions)

    def serves(self, asset_id: str) -> bool:
        return asset_id in self.sessions

    def send(self, message: Outgoing) -> None:
        """Queue ``message`` for the agent (never blocks)."""
        self.outbox.put_nowait(message)

    def end(self) -> None:
        """Ask the writer to end the stream once the queued messages are sent."""
        self.outbox.put_nowait(None)

    def touch(self, when: datetime | None = None) -> None:
        self.last_seen = when or utc_now()

    def describe(self) -> str:
        return f"agent {self.agent_id} (site {self.site_id}, peer {self.peer})"


class Presence:
    """Asset id → the live stream that serves it; opens and closes sessions.

    :param headend_id: recorded on every session opened here (``Session.headend_id``).
    """

    def __init__(
        self, storage: StorageBackend, plugins: Plugins, headend_id: str | None = None
    ) -> None:
        self._storage = storage
        self._plugins = plugins
        self._headend_id = headend_id
        self._by_asset: dict[str, AgentStream] = {}
        self._streams: dict[str, AgentStream] = {}
        self._last_seen: dict[str, datetime] = {}
        self._listeners: list[tuple[StreamListener, StreamListener]] = []

    def add_listener(self, on_attach: StreamListener, on_detach: StreamListener) -> None:
        """Call ``on_attach(stream)`` once a stream's sessions are on record and its assets
        show as connected, and ``on_detach(stream)`` once it no longer serves any (a
        cluster shares this through the bus: der_sdk_headend.cluster.presence).

        The callbacks are synchronous and must not block: schedule async work. One that
        raises is logged and never breaks the agent's link. Without listeners, attach and
        detach cost nothing more.
        """
        self._listeners.append((on_attach, on_detach))

    def _tell(self, attached: bool, stream: AgentStream) -> None:
        for on_attach, on_detach in self._listeners:
            try:
                (on_attach if attached else on_detach)(stream)
            except Exception:
                log.exception(
                    "presence listener failed on %s of %s",
                    "attach" if attached else "detach",
                    stream.describe(),
                )

    # ------------------------------------------------------------------ queries

    def stream_for(self, asset_id: str) -> AgentStream | None:
        """The live stream serving ``asset_id``, or ``None`` when it is offline."""
        return self._by_asset.get(asset_id)

    def streams(self) -> list[AgentStream]:
        """Every live stream, oldest first."""
        return list(self._streams.values())

    def connected_asset_ids(self) -> list[str]:
        return list(self._by_asset)

    def last_seen(self, asset_id: str) -> datetime | None:
        """When the asset was last heard from in this run (kept after it disconnects)."""
        stream = self._by_asset.get(asset_id)
        if stream is not None:
            return stream.last_seen
        return self._last_seen.get(asset_id)

    def touch(self, stream: AgentStream, when: datetime | None = None) -> None:
        stream.touch(when)
        for asset_id in stream.sessions:
            self._last_seen[asset_id] = stream.last_seen

    # ------------------------------------------------------------------ changes

    async def attach(self, stream: AgentStream, assets: Sequence[Asset]) -> list[Session]:
        """Make ``stream`` the server of ``assets``; open one session per asset.

        The sessions are stored first; only then do the assets show as connected (and
        ``der_agent_connected`` fires), so a connected asset always has its session on
        record. An asset held by another live stream is taken over: its old session is
        closed and ``der_agent_disconnected`` fired for it. Storage writes run to the end
        even if the stream is cancelled meanwhile, so no session is left open.
        """
        now = utc_now()
        opened = [
            Session(
                session_id=uuid.uuid4().hex,
                asset_id=asset.asset_id,
                site_id=asset.site_id,
                agent_id=stream.agent_id,
                peer=stream.peer,
                connected_at=now,
                headend_id=self._headend_id,
            )
            for asset in assets
        ]
        try:
            await run_to_completion(self._open_in_storage(opened))
        except asyncio.CancelledError:
            # Never announced, so no hook: just leave nothing open in the record.
            for session in opened:
                session.disconnected_at = utc_now()
            await run_to_completion(self._close_in_storage(opened, announce=False))
            raise

        # Publish with no await in between, so concurrent registrations see one map.
        taken_over: list[Session] = []
        for asset, session in zip(assets, opened, strict=True):
            previous = self._by_asset.get(asset.asset_id)
            if previous is not None and previous is not stream:
                old = previous.sessions.pop(asset.asset_id, None)
                if old is not None:
                    old.disconnected_at = now
                    taken_over.append(old)
                log.warning(
                    "asset %s moved from %s to %s (the old stream has not ended yet)",
                    asset.asset_id,
                    previous.describe(),
                    stream.describe(),
                )
            stream.sessions[asset.asset_id] = session
            self._by_asset[asset.asset_id] = stream
            self._last_seen[asset.asset_id] = now
        self._streams[stream.stream_id] = stream
        if self._listeners:
            self._tell(True, stream)
        self._plugins.notify("der_agent_connected", sessions=opened, assets=list(assets))
        await run_to_completion(self._close_in_storage(taken_over))
        return opened

    async def detach(self, stream: AgentStream) -> list[Session]:
        """Forget ``stream``: close the sessions it still holds (stream ended)."""
        now = utc_now()
        self._streams.pop(stream.stream_id, None)
        closed: list[Session] = []
        for asset_id, session in list(stream.sessions.items()):
            if self._by_asset.get(asset_id) is stream:
                del self._by_asset[asset_id]
                self._last_seen[asset_id] = stream.last_seen
            session.disconnected_at = now
            closed.append(session)
        stream.sessions.clear()
        if self._listeners:
            self._tell(False, stream)
        await run_to_completion(self._close_in_storage(closed))
        return closed

    async def detach_all(self) -> None:
        """Close every stream's sessions (headend stopping)."""
        for stream in self.streams():
            await self.detach(stream)

    async def _open_in_storage(self, sessions: Sequence[Session]) -> None:
        for session in sessions:
            await self._storage.open_session(session)

    async def _close_in_storage(
        self, sessions: Sequence[Session], *, announce: bool = True
    ) -> None:
        if not sessions:
            return
        for session in sessions:
            assert session.disconnected_at is not None
            await self._storage.close_session(session.session_id, session.disconnected_at)
        if announce:
            self._plugins.notify("der_agent_disconnected", sessions=list(sessions))


async def run_to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` and let it finish even if the caller is cancelled meanwhile.

    Presence records must not be left half-written: a stream cancelled while its
    sessions are being stored waits for the write, then the cancellation goes on.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise
