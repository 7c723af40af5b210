"""The in-memory bus (``memory://NAME``): an in-process broker, for tests of code that uses
the bus contract (several "replicas" in one process).

Buses opened with the same URL in one process share one broker (:class:`MemoryHub`), as
long as one of them is alive; ``memory://`` alone is the name ``""``. Within a broker,
namespaces (:attr:`BusOptions.namespace`) are apart, as on a server. Nothing outlives the
process: "durable" here means "until the broker is gone". Everything else follows the
contract as a server-backed bus does, so a test on ``memory://`` means the same on NATS:
expiry, redelivery after the acknowledgement wait, limits and backpressure, at-most-once
fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from der_sdk.bus.contract import (
    BusOptions,
    BusState,
    BusUnavailableError,
    CommandFailedError,
    CommandHandler,
    CommandTimeoutError,
    FanoutSubscription,
    MessageBus,
    MessageTooLargeError,
    NoResponderError,
    PresenceChange,
    PresenceConflictError,
    PresenceEntry,
    PresenceTable,
    PresenceWatch,
    PublishAck,
    StreamBacklog,
    StreamConsumer,
    StreamFullError,
    StreamMessage,
    Subscription,
    TelemetryStream,
    check_key,
    check_name,
    check_topic,
)
from der_sdk.extensions import BusBackendType
from der_sdk.plugins import hookimpl
from der_sdk.tasks import cancel_and_wait

__all__ = ["MAX_MESSAGE_BYTES", "MemoryBus", "MemoryHub", "der_bus_backends"]

MAX_MESSAGE_BYTES = 1024 * 1024
"""The largest payload of the memory bus: NATS's default ``max_payload``."""

FANOUT_QUEUE = 10_000
"""Messages a fan-out subscriber may fall behind by before it misses new ones."""

_HUBS: weakref.WeakValueDictionary[str, MemoryHub] = weakref.WeakValueDictionary()
_CLOSED = object()


def _now() -> float:
    return asyncio.get_running_loop().time()


class _Signal:
    """Wakes every waiter at once: ``wait()`` returns at the next :meth:`fire` (or timeout)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(timeout_s, 0.0))


# =========================================================================== presence


class _PresenceState:
    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.entries: dict[str, PresenceEntry] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.watches: set[_MemoryWatch] = set()
        self.revision = 0

    def write(self, key: str, value: bytes) -> int:
        self.revision += 1
        entry = PresenceEntry(key=key, value=value, revision=self.revision)
        self.entries[key] = entry
        self._forget_timer(key)
        loop = asyncio.get_running_loop()
        self.timers[key] = loop.call_later(self.max_age_s, self._expire, key, entry.revision)
        self._tell(PresenceChange(kind="put", key=key, entry=entry))
        return entry.revision

    def remove(self, key: str, kind: Literal["delete", "expired"]) -> None:
        self.entries.pop(key, None)
        self._forget_timer(key)
        self.revision += 1  # a deletion takes a revision, as a delete marker does on NATS
        self._tell(PresenceChange(kind=kind, key=key))

    def _expire(self, key: str, revision: int) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.revision == revision:
            self.timers.pop(key, None)
            self.remove(key, "expired")

    def _forget_timer(self, key: str) -> None:
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _tell(self, change: PresenceChange) -> None:
        for watch in self.watches:
            watch.queue.put_nowait(change)

    def clear(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        self.entries.clear()
        for watch in list(self.watches):
            watch.end()


class _MemoryWatch(PresenceWatch):
    def __init__(self, state: _PresenceState, bus: MemoryBus) -> None:
        self._state = state
        self._bus = bus
        self.initial = dict(state.entries)
        self.queue: asyncio.Queue[PresenceChange | object] = asyncio.Queue()
        state.watches.add(self)

    async def __anext__(self) -> PresenceChange:
        item = await self.queue.get()
        if item is _CLOSED:
            self.queue.put_nowait(_CLOSED)
            raise StopAsyncIteration
        assert isinstance(item, PresenceChange)
        return item

    def end(self) -> None:
        self._state.watches.discard(self)
        self.queue.put_nowait(_CLOSED)

    async def close(self) -> None:
        if self in self._state.watches:
            self.end()
        self._bus._subscriptions.discard(self)


class _MemoryPresence(PresenceTable):
    def __init__(self, bus: MemoryBus) -> None:
        self._bus = bus

    def _state(self) -> _PresenceState:
        return self._bus._space().presence

    @property
    def max_age_s(self) -> float:
        return self._bus.options.presence_max_age_s

    async def claim(self, key: str, value: bytes) -> int:
        return self._state().write(check_key(key), value)

    async def refresh(self, key: str, value: bytes, revision: int) -> int:
        state = self._state()
        current = state.entries.get(check_key(key))
        if current is None or current.revision != revision:
            raise PresenceConflictError(key, revision, current.revision if current else None)
        return state.write(key, value)

    async def release(self, key: str, revision: int) -> bool:
        state = self._state()
        current = state.entries.get(check_key(key))
        if current is None or current.revision != revision:
            return False
        state.remove(key, "delete")
        return True

    async def get(self, key: str) -> PresenceEntry | None:
        return self._state().entries.get(check_key(key))

    async def entries(self) -> dict[str, PresenceEntry]:
        return dict(self._state().entries)

    async def watch(self) -> PresenceWatch:
        watch = _MemoryWatch(self._state(), self._bus)
        self._bus._subscriptions.add(watch)
        return watch


# =========================================================================== telemetry


@dataclass
class _Stored:
    data: bytes
    msg_id: str | None


@dataclass
class _Delivery:
    due: float
    """When it is delivered again unless acknowledged first."""
    deliveries: int


@dataclass
class _StreamState:
    options: BusOptions
    messages: dict[int, _Stored] = field(default_factory=dict)
    stored_bytes: int = 0
    last_sequence: int = 0
    undelivered: deque[int] = field(default_factory=deque)
    pending: dict[int, _Delivery] = field(default_factory=dict)
    seen_ids: dict[str, tuple[int, float]] = field(default_factory=dict)
    signal: _Signal = field(default_factory=_Signal)

    def publish(self, data: bytes, msg_id: str | None) -> PublishAck:
        now = _now()
        if msg_id is not None:
            self.seen_ids = {k: v for k, v in self.seen_ids.items() if v[1] > now}
            if msg_id in self.seen_ids:
                return PublishAck(sequence=self.seen_ids[msg_id][0], duplicate=True)
        limits = self.options
        if len(self.messages) + 1 > limits.telemetry_max_messages:
            raise StreamFullError(
                f"telemetry stream of namespace {limits.namespace!r} is full: it holds "
                f"{len(self.messages)} batches (telemetry_max_messages); nothing was stored"
            )
        if self.stored_bytes + len(data) > limits.telemetry_max_bytes:
            raise StreamFullError(
                f"telemetry stream of namespace {limits.namespace!r} is full: it holds "
                f"{self.stored_bytes} bytes, {len(data)} more would pass telemetry_max_bytes="
                f"{limits.telemetry_max_bytes}; nothing was stored"
            )
        self.last_sequence += 1
        self.messages[self.last_sequence] = _Stored(data, msg_id)
        self.stored_bytes += len(data)
        self.undelivered.append(self.last_sequence)
        if msg_id is not None:
            self.seen_ids[msg_id] = (self.last_sequence, now + limits.duplicate_window_s)
        self.signal.fire()
        return PublishAck(sequence=self.last_sequence)

    def take(self, max_messages: int) -> list[tuple[int, bytes, int]]:
        """``(sequence, data, deliveries)`` of the batches due now: overdue ones first."""
        now = _now()
        taken: list[tuple[int, bytes, int]] = []
        due_again = sorted(seq for seq, d in self.pending.items() if d.due <= now)
        for seq in due_again[:max_messages]:
            delivery = self.pending[seq]
            delivery.deliveries += 1
            delivery.due = now + self.options.telemetry_ack_wait_s
            taken.append((seq, self.messages[seq].data, delivery.deliveries))
        while self.undelivered and len(taken) < max_messages:
            seq = self.undelivered.popleft()
            if seq in self.messages:
                self.pending[seq] = _Delivery(now + self.options.telemetry_ack_wait_s, 1)
                taken.append((seq, self.messages[seq].data, 1))
        return taken

    def next_due(self) -> float | None:
        return min((d.due for d in self.pending.values()), default=None)

    def ack(self, sequence: int) -> None:
        self.pending.pop(sequence, None)
        stored = self.messages.pop(sequence, None)
        if stored is not None:
            self.stored_bytes -= len(stored.data)

    def due_in(self, sequence: int, seconds: float) -> None:
        delivery = self.pending.get(sequence)
        if delivery is not None:
            delivery.due = _now() + seconds
            self.signal.fire()

    def clear(self) -> None:
        self.messages.clear()
        self.pending.clear()
        self.undelivered.clear()
        self.stored_bytes = 0
        self.signal.fire()


class _MemoryMessage(StreamMessage):
    def __init__(self, bus: MemoryBus, sequence: int, data: bytes, deliveries: int) -> None:
        self._bus = bus
        self.sequence = sequence
        self.data = data
        self.deliveries = deliveries

    async def ack(self) -> None:
        self._bus._space().stream.ack(self.sequence)

    async def nak(self, delay_s: float = 0.0) -> None:
        self._bus._space().stream.due_in(self.sequence, delay_s)

    async def in_progress(self) -> None:
        stream = self._bus._space().stream
        stream.due_in(self.sequence, stream.options.telemetry_ack_wait_s)


class _MemoryConsumer(StreamConsumer):
    def __init__(self, bus: MemoryBus) -> None:
        self._bus = bus
        self._closed = False

    async def fetch(self, max_messages: int = 100, timeout_s: float = 1.0) -> list[StreamMessage]:
        if max_messages < 1:
            raise ValueError(f"fetch: max_messages must be at least 1, got {max_messages}")
        deadline = _now() + timeout_s
        while True:
            if self._closed:
                raise BusUnavailableError("this telemetry consumer is closed")
            stream = self._bus._space().stream
            taken = stream.take(max_messages)
            if taken:
                return [_MemoryMessage(self._bus, *item) for item in taken]
            now = _now()
            if now >= deadline:
                return []
            wake = min(deadline, stream.next_due() or deadline)
            await stream.signal.wait(wake - now)

    async def close(self) -> None:
        self._closed = True
        self._bus._subscriptions.discard(self)


class _MemoryTelemetry(TelemetryStream):
    def __init__(self, bus: MemoryBus) -> None:
        self._bus = bus

    async def publish(self, payload: bytes, *, msg_id: str | None = None) -> PublishAck:
        if len(payload) > MAX_MESSAGE_BYTES:
            raise MessageTooLargeError(
                f"a telemetry batch of {len(payload)} bytes is larger than the bus carries "
                f"({MAX_MESSAGE_BYTES} bytes); split it"
            )
        return self._bus._space().stream.publish(bytes(payload), msg_id)

    async def consumer(self) -> StreamConsumer:
        self._bus._space()
        consumer = _MemoryConsumer(self._bus)
        self._bus._subscriptions.add(consumer)
        return consumer

    async def backlog(self) -> StreamBacklog:
        stream = self._bus._space().stream
        return StreamBacklog(
            messages=len(stream.messages),
            bytes=stream.stored_bytes,
            max_messages=stream.options.telemetry_max_messages,
            max_bytes=stream.options.telemetry_max_bytes,
        )


# =========================================================================== commands, fan-out


class _CommandServer(Subscription):
    """Serves one replica's commands one at a time, in a task of its own, so a sender that
    gives up does not cancel a handler halfway (as on a real bus)."""

    def __init__(self, bus: MemoryBus, replica: str, handler: CommandHandler) -> None:
        self._bus = bus
        self.replica = replica
        self._handler = handler
        self._queue: asyncio.Queue[tuple[bytes, asyncio.Future[bytes]]] = asyncio.Queue()
        self._task = asyncio.create_task(self._serve(), name=f"memory-bus-commands-{replica}")

    def submit(self, payload: bytes) -> asyncio.Future[bytes]:
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((payload, reply))
        return reply

    async def _serve(self) -> None:
        while True:
            payload, reply = await self._queue.get()
            try:
                result = await self._handler(payload)
            except Exception as exc:
                if not reply.done():
                    reply.set_exception(
                        CommandFailedError(f"replica {self.replica!r} failed the command: {exc}")
                    )
            else:
                if not reply.done():
                    reply.set_result(bytes(result))

    async def close(self) -> None:
        space = self._bus._spaces_if_open()
        if space is not None and space.commands.get(self.replica) is self:
            del space.commands[self.replica]
        self._bus._subscriptions.discard(self)
        await cancel_and_wait([self._task])
        while not self._queue.empty():
            _, reply = self._queue.get_nowait()
            reply.cancel()


class _MemoryFanout(FanoutSubscription):
    def __init__(self, bus: MemoryBus, topic: str) -> None:
        self._bus = bus
        self.topic = topic
        self.queue: asyncio.Queue[bytes | object] = asyncio.Queue(FANOUT_QUEUE + 1)
        self.missed = 0
        self._open = True

    def deliver(self, payload: bytes) -> None:
        if self.queue.qsize() >= FANOUT_QUEUE:
            self.missed += 1  # at most once: a subscriber this far behind misses messages
            return
        self.queue.put_nowait(payload)

    async def __anext__(self) -> bytes:
        item = await self.queue.get()
        if item is _CLOSED:
            self.queue.put_nowait(_CLOSED)
            raise StopAsyncIteration
        assert isinstance(item, bytes)
        return item

    def end(self) -> None:
        if self._open:
            self._open = False
            self.queue.put_nowait(_CLOSED)

    async def close(self) -> None:
        space = self._bus._spaces_if_open()
        if space is not None:
            space.topics.get(self.topic, set()).discard(self)
        self._bus._subscriptions.discard(self)
        self.end()


# =========================================================================== the broker


class _Space:
    """One namespace of a broker."""

    def __init__(self, options: BusOptions) -> None:
        self.presence = _PresenceState(options.presence_max_age_s)
        self.stream = _StreamState(options)
        self.commands: dict[str, _CommandServer] = {}
        self.topics: dict[str, set[_MemoryFanout]] = {}

    def configure(self, options: BusOptions) -> None:
        """The latest connect's limits apply, as when a server's stream is updated."""
        self.presence.max_age_s = options.presence_max_age_s
        self.stream.options = options


class MemoryHub:
    """An in-process broker: the namespaces of every bus opened with one ``memory://`` URL."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.spaces: dict[str, _Space] = {}

    @classmethod
    def named(cls, name: str) -> MemoryHub:
        """The broker called ``name`` in this process, created when none is alive."""
        hub = _HUBS.get(name)
        if hub is None:
            hub = cls(name)
            _HUBS[name] = hub
        return hub


class MemoryBus(MessageBus):
    """A bus on an in-process broker (:class:`MemoryHub`)."""

    name = "memory"

    def __init__(self, hub: MemoryHub, options: BusOptions) -> None:
        super().__init__(options)
        self.hub = hub
        self._connected = False
        self._subscriptions: set[Subscription] = set()
        self._presence = _MemoryPresence(self)
        self._telemetry = _MemoryTelemetry(self)

    @classmethod
    def from_url(cls, url: str, options: BusOptions) -> MemoryBus:
        """A bus on the broker named by what follows ``memory://`` (may be empty)."""
        return cls(MemoryHub.named(url.partition("://")[2]), options)

    def _spaces_if_open(self) -> _Space | None:
        return self.hub.spaces.get(self.options.namespace) if self._connected else None

    def _space(self) -> _Space:
        if not self._connected:
            raise BusUnavailableError(f"memory bus {self.hub.name!r} is not connected")
        space = self.hub.spaces.get(self.options.namespace)
        if space is None:  # destroyed by another bus: prepared again, as on connect
            space = self.hub.spaces[self.options.namespace] = _Space(self.options)
        return space

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        space = self.hub.spaces.get(self.options.namespace)
        if space is None:
            self.hub.spaces[self.options.namespace] = _Space(self.options)
        else:
            space.configure(self.options)
        self._connected = True

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        self._connected = False

    async def destroy(self) -> None:
        space = self.hub.spaces.pop(self.options.namespace, None)
        if space is not None:
            space.presence.clear()
            space.stream.clear()

    @property
    def state(self) -> BusState:
        return "connected" if self._connected else "closed"

    @property
    def max_message_bytes(self) -> int:
        return MAX_MESSAGE_BYTES

    # ------------------------------------------------------------------ commands

    async def serve_commands(self, replica: str, handler: CommandHandler) -> Subscription:
        space = self._space()
        if check_name("replica id", replica) in space.commands:
            raise ValueError(f"replica {replica!r} already serves its commands on this bus")
        server = _CommandServer(self, replica, handler)
        space.commands[replica] = server
        self._subscriptions.add(server)
        return server

    async def send_command(self, replica: str, payload: bytes, *, timeout_s: float = 5.0) -> bytes:
        server = self._space().commands.get(check_name("replica id", replica))
        if server is None:
            raise NoResponderError(f"no replica serves commands for {replica!r}")
        reply = server.submit(bytes(payload))
        try:
            return await asyncio.wait_for(asyncio.shield(reply), timeout_s)
        except TimeoutError:
            raise CommandTimeoutError(
                f"replica {replica!r} did not reply within {timeout_s:g} s; the command may "
                "or may not have been taken"
            ) from None
        except asyncio.CancelledError:
            if reply.cancelled():  # the replica stopped serving before it replied
                raise CommandTimeoutError(
                    f"replica {replica!r} stopped serving before it replied; the command may "
                    "or may not have been taken"
                ) from None
            raise

    # ------------------------------------------------------------------ presence, telemetry

    @property
    def presence(self) -> PresenceTable:
        return self._presence

    @property
    def telemetry(self) -> TelemetryStream:
        return self._telemetry

    # ------------------------------------------------------------------ fan-out

    async def broadcast(self, topic: str, payload: bytes) -> None:
        data = bytes(payload)
        for subscription in list(self._space().topics.get(check_topic(topic), ())):
            subscription.deliver(data)

    async def subscribe(self, topic: str) -> FanoutSubscription:
        subscription = _MemoryFanout(self, check_topic(topic))
        self._space().topics.setdefault(topic, set()).add(subscription)
        self._subscriptions.add(subscription)
        return subscription


@hookimpl
def der_bus_backends() -> list[BusBackendType]:
    return [
        BusBackendType(
            name="memory",
            schemes=("memory",),
            factory=MemoryBus.from_url,
            description="An in-process broker for tests (memory://NAME: buses with the "
            "same URL in one process share it).",
        )
    ]
