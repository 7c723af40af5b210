"""The bus contract on NATS (nats-py): core NATS for commands and fan-out, JetStream for
the telemetry stream and the presence table (a key-value bucket).

Names in namespace ``NS`` (:attr:`der_sdk.bus.BusOptions.namespace`):

=====================  =====================================================================
``NS.cmd.REPLICA``     the subject a replica serves its commands on (request and reply)
``NS.fan.TOPIC``       fan-out subjects
``NS-telemetry``       the telemetry stream (subject ``NS.telemetry``): file storage,
                       work-queue retention, ``discard: new`` at its limits, one durable pull
                       consumer ``writers`` shared by every writer
``NS-presence``        the presence bucket (stream ``KV_NS-presence``): file storage, one
                       revision per key, ``max_age`` = the presence age
=====================  =====================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue, StopIterSentinel
from packaging.version import InvalidVersion, Version

from der_sdk.bus.contract import (
    BusError,
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
from der_sdk.tasks import cancel_and_wait
from der_sdk_nats.settings import NatsSettings

__all__ = ["CONSUMER", "ERROR_HEADER", "MINIMUM_SERVER", "NatsBus", "check_server_version"]

log = logging.getLogger("der.bus.nats")

MINIMUM_SERVER = Version("2.9.0")
"""The oldest NATS server the bus works with (JetStream key-value, direct get)."""

CONSUMER = "writers"
"""The durable pull consumer every writer of the telemetry stream shares."""

ERROR_HEADER = "Der-Bus-Error"
"""The reply header that carries a failed command handler's message."""

HEADER_ROOM = 1024
"""Bytes of ``max_payload`` kept for headers (``Nats-Msg-Id``, ``Nats-Expected-Stream``)."""

FANOUT_QUEUE = 10_000
"""Messages a fan-out subscriber may fall behind by before it misses new ones."""

NO_RESPONDERS_RETRY_S = 0.05
"""How long :meth:`NatsBus.send_command` waits before it asks again after "no responders"."""

EXPIRY_CHECK_S = 0.25
"""How often a presence watch looks again at an entry whose age has passed but that the
server still holds (JetStream removes expired messages on its own timer)."""

# JetStream error codes (nats-server's errors.json)
_WRONG_LAST_SEQUENCE = {10071, 10164}
_STREAM_STORE_FAILED = 10077  # "maximum messages/bytes exceeded" under discard: new

_CLOSED = object()
T = TypeVar("T")


def check_server_version(version: str) -> None:
    """Refuse a NATS server older than :data:`MINIMUM_SERVER`.

    :raises BusError: naming the version found and the one needed.
    """
    try:
        found = Version(version)
    except InvalidVersion:
        raise BusError(f"NATS server reports version {version!r}, which is not a version") from None
    if found < MINIMUM_SERVER:
        raise BusError(
            f"NATS server {version} is too old: der-sdk-nats needs {MINIMUM_SERVER} or newer "
            "with JetStream enabled"
        )


def _entry(entry: KeyValue.Entry) -> PresenceEntry:
    return PresenceEntry(key=entry.key, value=entry.value or b"", revision=entry.revision or 0)


def _header_safe(text: str) -> str:
    return " ".join(text.split())[:500] or "error"


# =========================================================================== presence


class _NatsWatch(PresenceWatch):
    """A key-value watcher plus expiry: NATS removes an expired entry without a marker, so
    the watch keeps a deadline per entry and, once it passes, asks the server whether the
    entry is gone before it reports ``expired``."""

    def __init__(self, bus: NatsBus, kv: KeyValue, watcher: KeyValue.KeyWatcher) -> None:
        self._bus = bus
        self._kv = kv
        self._watcher = watcher
        self.initial = {}
        self._known: dict[str, int] = {}
        self._due: dict[str, float] = {}
        self._queue: asyncio.Queue[PresenceChange | object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        now = datetime.now(UTC)
        async for entry in self._watcher:
            if entry is None:  # nats-py's marker: the initial values are all there
                break
            if entry.operation in (KV_DEL, KV_PURGE):
                continue
            self.initial[entry.key] = _entry(entry)
            self._known[entry.key] = self.initial[entry.key].revision
            age = (now - entry.created).total_seconds() if entry.created else 0.0
            max_age = self._bus.options.presence_max_age_s
            self._due[entry.key] = loop.time() + max_age - min(max(age, 0.0), max_age)
        self._task = asyncio.create_task(self._run(), name="nats-bus-presence-watch")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        max_age = self._bus.options.presence_max_age_s
        # Not only the cancel of close(): on Python 3.11 asyncio.wait_for (in nats-py's
        # updates()) loses a cancel that lands as its wait ends, and the loop went on
        # forever (a replica's stop hung under load); each pass is at most about 1 s.
        while not self._closing:
            next_due = min(self._due.values(), default=loop.time() + 1.0)
            wait = min(max(next_due - loop.time(), 0.01), 1.0)
            try:
                entry = await self._watcher.updates(timeout=wait)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                entry = None
            except nats.errors.Error as exc:  # the watcher carries on after a reconnect
                log.debug("presence watch: %s", exc)
                await asyncio.sleep(EXPIRY_CHECK_S)
                entry = None
            if isinstance(entry, StopIterSentinel):
                break
            if isinstance(entry, KeyValue.Entry):
                if entry.operation in (KV_DEL, KV_PURGE):
                    self._due.pop(entry.key, None)
                    if self._known.pop(entry.key, None) is not None:
                        self._queue.put_nowait(PresenceChange(kind="delete", key=entry.key))
                else:
                    stored = _entry(entry)
                    self._known[entry.key] = stored.revision
                    self._due[entry.key] = loop.time() + max_age
                    self._queue.put_nowait(PresenceChange(kind="put", key=entry.key, entry=stored))
            await self._report_expiries(loop.time())

    async def _report_expiries(self, now: float) -> None:
        for key in [k for k, due in self._due.items() if due <= now]:
            try:
                await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                self._due.pop(key, None)
                if self._known.pop(key, None) is not None:
                    self._queue.put_nowait(PresenceChange(kind="expired", key=key))
            except (TimeoutError, nats.errors.Error):
                self._due[key] = now + EXPIRY_CHECK_S  # unreachable now: look again later
            else:
                self._due[key] = now + EXPIRY_CHECK_S  # the server has not removed it yet

    async def __anext__(self) -> PresenceChange:
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            raise StopAsyncIteration
        assert isinstance(item, PresenceChange)
        return item

    async def close(self) -> None:
        if self._task is not None:
            self._closing = True
            task, self._task = self._task, None
            await cancel_and_wait([task])
            with contextlib.suppress(nats.errors.Error):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            self._queue.put_nowait(_CLOSED)
        self._bus._subscriptions.discard(self)


class _NatsPresence(PresenceTable):
    def __init__(self, bus: NatsBus) -> None:
        self._bus = bus

    @property
    def max_age_s(self) -> float:
        return self._bus.options.presence_max_age_s

    async def _current(self, kv: KeyValue, key: str) -> int | None:
        try:
            return (await kv.get(key)).revision
        except nats.js.errors.KeyNotFoundError:
            return None

    async def claim(self, key: str, value: bytes) -> int:
        kv = self._bus._kv_or_raise()
        return await self._bus._call(kv.put(check_key(key), value), f"claim {key!r}")

    async def refresh(self, key: str, value: bytes, revision: int) -> int:
        kv = self._bus._kv_or_raise()
        try:
            return await self._bus._call(
                kv.update(check_key(key), value, last=revision), f"refresh {key!r}"
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            current = await self._bus._call(self._current(kv, key), f"look up {key!r}")
            raise PresenceConflictError(key, revision, current) from None

    async def release(self, key: str, revision: int) -> bool:
        kv = self._bus._kv_or_raise()
        try:
            await self._bus._call(kv.delete(check_key(key), last=revision), f"release {key!r}")
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def get(self, key: str) -> PresenceEntry | None:
        kv = self._bus._kv_or_raise()
        try:
            entry = await self._bus._call(kv.get(check_key(key)), f"get {key!r}")
        except nats.js.errors.KeyNotFoundError:
            return None
        return _entry(entry)

    async def entries(self) -> dict[str, PresenceEntry]:
        watch = await self.watch()
        await watch.close()
        return watch.initial

    async def watch(self) -> PresenceWatch:
        kv = self._bus._kv_or_raise()
        watcher = await self._bus._call(kv.watchall(), "watch the presence table")
        watch = _NatsWatch(self._bus, kv, watcher)
        try:
            await self._bus._call(watch.start(), "read the presence table")
        except BaseException:
            await watch.close()
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()  # type: ignore[no-untyped-call]
            raise
        self._bus._subscriptions.add(watch)
        return watch


# =========================================================================== telemetry


class _NatsMessage(StreamMessage):
    def __init__(self, bus: NatsBus, msg: Msg) -> None:
        self._bus = bus
        self._msg = msg
        self.data = msg.data
        metadata = msg.metadata
        self.sequence = metadata.sequence.stream
        self.deliveries = metadata.num_delivered

    async def ack(self) -> None:
        # acknowledging twice does no harm (the contract says so)
        with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._bus._call(
                self._msg.ack_sync(timeout=self._bus.settings.request_timeout),
                f"acknowledge batch {self.sequence}",
            )

    async def nak(self, delay_s: float = 0.0) -> None:
        with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._bus._call(self._msg.nak(delay=delay_s or None), f"nak {self.sequence}")

    async def in_progress(self) -> None:
        await self._bus._call(self._msg.in_progress(), f"hold batch {self.sequence}")


class _NatsConsumer(StreamConsumer):
    def __init__(self, bus: NatsBus, subscription: JetStreamContext.PullSubscription) -> None:
        self._bus = bus
        self._subscription = subscription
        self._closed = False

    async def fetch(self, max_messages: int = 100, timeout_s: float = 1.0) -> list[StreamMessage]:
        if max_messages < 1:
            raise ValueError(f"fetch: max_messages must be at least 1, got {max_messages}")
        if self._closed:
            raise BusUnavailableError("this telemetry consumer is closed")
        self._bus._require_connected("fetch telemetry")
        try:
            messages = await self._subscription.fetch(max_messages, timeout=timeout_s)
        except TimeoutError:
            # nats-py raises its own TimeoutError (a subclass) and, when the wait ran out
            # between its no-wait probe and its long poll, a plain asyncio.TimeoutError:
            # both mean "nothing to fetch now"
            return []
        except nats.errors.Error as exc:
            raise BusUnavailableError(f"NATS: fetch telemetry failed: {exc}") from exc
        return [_NatsMessage(self._bus, m) for m in messages]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(nats.errors.Error):
                await self._subscription.unsubscribe()
        self._bus._subscriptions.discard(self)


class _NatsTelemetry(TelemetryStream):
    def __init__(self, bus: NatsBus) -> None:
        self._bus = bus

    async def publish(self, payload: bytes, *, msg_id: str | None = None) -> PublishAck:
        bus = self._bus
        if len(payload) > bus.max_message_bytes:
            raise MessageTooLargeError(
                f"a telemetry batch of {len(payload)} bytes is larger than NATS carries "
                f"({bus.max_message_bytes} bytes: the server's max_payload less room for "
                "headers); split it"
            )
        js = bus._js_or_raise()
        headers = {"Nats-Msg-Id": msg_id} if msg_id is not None else None
        try:
            ack = await bus._call(
                js.publish(
                    bus.telemetry_subject,
                    payload,
                    timeout=bus.settings.request_timeout,
                    stream=bus.stream_name,
                    headers=headers,
                ),
                "publish telemetry",
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STREAM_STORE_FAILED:
                raise StreamFullError(
                    f"telemetry stream {bus.stream_name!r} is full ({exc.description}: "
                    f"limits {bus.options.telemetry_max_messages} batches, "
                    f"{bus.options.telemetry_max_bytes} bytes); nothing was stored"
                ) from None
            raise BusError(f"NATS refused a telemetry batch: {exc.description}") from exc
        return PublishAck(sequence=ack.seq, duplicate=bool(ack.duplicate))

    async def consumer(self) -> StreamConsumer:
        bus = self._bus
        js = bus._js_or_raise()
        subscription = await bus._call(
            js.pull_subscribe_bind(durable=CONSUMER, stream=bus.stream_name),
            "bind a telemetry consumer",
        )
        consumer = _NatsConsumer(bus, subscription)
        bus._subscriptions.add(consumer)
        return consumer

    async def backlog(self) -> StreamBacklog:
        bus = self._bus
        info = await bus._call(bus._js_or_raise().stream_info(bus.stream_name), "stream info")
        return StreamBacklog(
            messages=info.state.messages,
            bytes=info.state.bytes,
            max_messages=info.config.max_msgs or -1,
            max_bytes=info.config.max_bytes or -1,
        )


# =========================================================================== commands, fan-out


class _NatsSubscription(Subscription):
    def __init__(self, bus: NatsBus) -> None:
        self._bus = bus
        self._subscription: NatsSubscription | None = None

    async def close(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
                nc = self._bus._nc
                if nc is not None and nc.is_connected:
                    await nc.flush()  # the server stops routing here before close returns
        self._bus._subscriptions.discard(self)
        self._ended()

    def _ended(self) -> None:
        """Called once the subscription is closed."""


class _NatsFanout(_NatsSubscription, FanoutSubscription):
    def __init__(self, bus: NatsBus) -> None:
        super().__init__(bus)
        self._queue: asyncio.Queue[bytes | object] = asyncio.Queue(FANOUT_QUEUE + 1)
        self.missed = 0
        self._open = True

    async def deliver(self, msg: Msg) -> None:
        if self._queue.qsize() >= FANOUT_QUEUE:
            self.missed += 1  # at most once: a subscriber this far behind misses messages
            return
        self._queue.put_nowait(msg.data)

    async def __anext__(self) -> bytes:
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            raise StopAsyncIteration
        assert isinstance(item, bytes)
        return item

    def _ended(self) -> None:
        if self._open:
            self._open = False
            self._queue.put_nowait(_CLOSED)


# =========================================================================== the bus


class NatsBus(MessageBus):
    """The bus on a NATS server (2.9 or newer, JetStream enabled)."""

    name = "nats"

    def __init__(self, settings: NatsSettings, options: BusOptions) -> None:
        super().__init__(options)
        self.settings = settings
        namespace = options.namespace
        self.stream_name = f"{namespace}-telemetry"
        self.telemetry_subject = f"{namespace}.telemetry"
        self.bucket_name = f"{namespace}-presence"
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._max_payload = 0
        self._restored = False
        self._subscriptions: set[Subscription] = set()
        self._presence = _NatsPresence(self)
        self._telemetry = _NatsTelemetry(self)

    @classmethod
    def from_url(cls, url: str, options: BusOptions) -> NatsBus:
        return cls(NatsSettings.from_url(url), options)

    def __repr__(self) -> str:
        return f"<NatsBus {self.settings.target} namespace={self.options.namespace!r}>"

    # ------------------------------------------------------------------ plumbing

    def _require_connected(self, what: str) -> Client:
        nc = self._nc
        if nc is None or self.state != "connected":
            raise BusUnavailableError(
                f"cannot {what}: the bus is {self.state} (NATS at {self.settings.target})"
            )
        return nc

    def _js_or_raise(self) -> JetStreamContext:
        self._require_connected("use JetStream")
        assert self._js is not None
        return self._js

    def _kv_or_raise(self) -> KeyValue:
        self._require_connected("use the presence table")
        assert self._kv is not None
        return self._kv

    async def _call(self, operation: Awaitable[T], what: str) -> T:
        """Await ``operation``, turning a lost or unanswered server into
        :class:`BusUnavailableError`; JetStream's own answers pass through."""
        try:
            return await operation
        except (nats.js.errors.APIError, nats.errors.MsgAlreadyAckdError):
            raise
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise BusUnavailableError(
                f"NATS did not answer in time ({what}, {self.settings.request_timeout:g} s); "
                "the outcome is unknown"
            ) from exc
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.NoRespondersError,
            nats.js.errors.NoStreamResponseError,
            nats.js.errors.ServiceUnavailableError,
        ) as exc:
            raise BusUnavailableError(f"NATS cannot {what} now: {exc}") from exc

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            return
        nc = Client()
        settings = self.settings
        problems: list[Exception] = []  # nats-py ends a failed start with NoServersError

        async def on_error(exc: Exception) -> None:
            problems.append(exc)
            log.debug("NATS at %s: %s", settings.target, exc)

        async def on_disconnected() -> None:
            if self._nc is nc:
                self._restored = False
                log.warning("lost NATS at %s; reconnecting", settings.target)

        async def on_reconnected() -> None:
            # nats-py calls this once the subscriptions are replayed and flushed: only
            # then is the bus "connected" again
            self._restored = True
            log.warning("reconnected to NATS at %s", settings.target)

        try:
            await nc.connect(
                servers=list(settings.servers),
                name=settings.name,
                user=settings.user,
                password=settings.password,
                token=settings.token,
                connect_timeout=settings.connect_timeout,  # type: ignore[arg-type]
                reconnect_time_wait=settings.reconnect_wait,  # type: ignore[arg-type]
                max_reconnect_attempts=settings.connect_attempts,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            # an authorization failure says more than the reset that may follow it
            refused = [p for p in problems if isinstance(p, nats.errors.AuthorizationError)]
            cause = (refused or problems or [exc])[-1]
            with contextlib.suppress(Exception):
                await nc.close()
            raise BusUnavailableError(
                f"cannot connect to NATS at {settings.target}: "
                f"{type(cause).__name__}: {cause}".rstrip(": ")
            ) from exc
        # Bounded attempts at start (a wrong URL fails), endless reconnects once connected:
        # nats-py reads this option on every reconnect.
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self._restored = True
        try:
            server = nc.connected_server_version
            check_server_version(f"{server.major}.{server.minor}.{server.patch}")
            self._max_payload = nc.max_payload - HEADER_ROOM
            self._js = nc.jetstream(timeout=settings.request_timeout)
            await self._prepare_stream(self._js)
            self._kv = await self._prepare_bucket(self._js)
        except BaseException:
            await self.close()
            raise

    async def _prepare(
        self, js: JetStreamContext, config: api.StreamConfig, what: str
    ) -> api.StreamInfo:
        """Create the stream ``config`` names, or apply ``config`` to it if it exists."""
        assert config.name is not None
        try:
            try:
                await js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                return await js.add_stream(config)
            return await js.update_stream(config)
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
            raise BusError(
                f"NATS at {self.settings.target} has no JetStream (start nats-server with "
                f"-js): cannot prepare the {what}"
            ) from exc
        except nats.js.errors.APIError as exc:
            raise BusError(
                f"NATS refused the {what} {config.name!r}: {exc.description} (error {exc.err_code})"
            ) from exc

    async def _prepare_stream(self, js: JetStreamContext) -> None:
        options = self.options
        await self._prepare(
            js,
            api.StreamConfig(
                name=self.stream_name,
                description="der-sdk telemetry batches on their way to storage",
                subjects=[self.telemetry_subject],
                retention=api.RetentionPolicy.WORK_QUEUE,
                discard=api.DiscardPolicy.NEW,
                storage=api.StorageType.FILE,
                max_msgs=options.telemetry_max_messages,
                max_bytes=options.telemetry_max_bytes,
                duplicate_window=options.duplicate_window_s,
                num_replicas=self.settings.replicas,
            ),
            "telemetry stream",
        )
        consumer = api.ConsumerConfig(
            name=CONSUMER,
            durable_name=CONSUMER,
            description="der-sdk telemetry writers",
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=options.telemetry_ack_wait_s,
            max_deliver=-1,
            filter_subject=self.telemetry_subject,
        )
        try:
            await js.add_consumer(self.stream_name, consumer)
        except nats.js.errors.APIError as exc:
            raise BusError(
                f"NATS refused the telemetry consumer {CONSUMER!r} of {self.stream_name!r}: "
                f"{exc.description} (error {exc.err_code})"
            ) from exc

    async def _prepare_bucket(self, js: JetStreamContext) -> KeyValue:
        max_age = self.options.presence_max_age_s
        await self._prepare(
            js,
            api.StreamConfig(
                name=f"KV_{self.bucket_name}",
                description="der-sdk presence: who holds which agent's stream",
                subjects=[f"$KV.{self.bucket_name}.>"],
                storage=api.StorageType.FILE,
                max_msgs_per_subject=1,
                max_age=max_age,
                duplicate_window=min(max_age, 120.0),
                discard=api.DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
                deny_delete=True,
                allow_direct=True,
                num_replicas=self.settings.replicas,
            ),
            "presence bucket",
        )
        return await js.key_value(self.bucket_name)

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        nc, self._nc = self._nc, None
        self._js = self._kv = None
        if nc is not None and not nc.is_closed:
            await nc.close()

    async def destroy(self) -> None:
        js = self._js_or_raise()
        for stream in (self.stream_name, f"KV_{self.bucket_name}"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self._call(js.delete_stream(stream), f"delete stream {stream!r}")

    @property
    def state(self) -> BusState:
        nc = self._nc
        if nc is None or nc.is_closed:
            return "closed"
        return "connected" if nc.is_connected and self._restored else "reconnecting"

    @property
    def max_message_bytes(self) -> int:
        return self._max_payload

    # ------------------------------------------------------------------ commands

    def _command_subject(self, replica: str) -> str:
        return f"{self.options.namespace}.cmd.{check_name('replica id', replica)}"

    async def serve_commands(self, replica: str, handler: CommandHandler) -> Subscription:
        subject = self._command_subject(replica)
        nc = self._require_connected("serve commands")

        async def serve(msg: Msg) -> None:
            if not msg.reply:
                return
            headers: dict[str, str] | None = None
            try:
                reply = bytes(await handler(msg.data))
            except Exception as exc:
                reply, headers = b"", {ERROR_HEADER: _header_safe(str(exc))}
            with contextlib.suppress(nats.errors.Error):
                await nc.publish(msg.reply, reply, headers=headers)

        served = _NatsSubscription(self)
        served._subscription = await self._call(nc.subscribe(subject, cb=serve), "subscribe")
        await self._call(nc.flush(), "subscribe")  # served from the moment this returns
        self._subscriptions.add(served)
        return served

    async def send_command(self, replica: str, payload: bytes, *, timeout_s: float = 5.0) -> bytes:
        subject = self._command_subject(replica)
        nc = self._require_connected(f"send a command to {replica!r}")
        try:
            try:
                msg = await nc.request(subject, payload, timeout=timeout_s)
            except nats.errors.NoRespondersError:
                # nats-server 2.9.10 now and then answers "no responders" to a request
                # sent within milliseconds of the responder's subscription, although that
                # was flushed (4 in 400 fresh connection pairs here; none 50 ms later).
                # The request was not delivered, so asking once more is safe.
                await asyncio.sleep(NO_RESPONDERS_RETRY_S)
                msg = await nc.request(subject, payload, timeout=timeout_s)
        except nats.errors.NoRespondersError:
            raise NoResponderError(f"no replica serves commands for {replica!r}") from None
        except nats.errors.TimeoutError:
            raise CommandTimeoutError(
                f"replica {replica!r} did not reply within {timeout_s:g} s; the command may "
                "or may not have been taken"
            ) from None
        except nats.errors.Error as exc:
            raise BusUnavailableError(
                f"cannot send a command to {replica!r}: {exc}; the command may or may not "
                "have been taken"
            ) from exc
        error = (msg.headers or {}).get(ERROR_HEADER)
        if error is not None:
            raise CommandFailedError(f"replica {replica!r} failed the command: {error}")
        return msg.data

    # ------------------------------------------------------------------ presence, telemetry

    @property
    def presence(self) -> PresenceTable:
        return self._presence

    @property
    def telemetry(self) -> TelemetryStream:
        return self._telemetry

    # ------------------------------------------------------------------ fan-out

    def _fanout_subject(self, topic: str) -> str:
        return f"{self.options.namespace}.fan.{check_topic(topic)}"

    async def broadcast(self, topic: str, payload: bytes) -> None:
        subject = self._fanout_subject(topic)
        nc = self._require_connected(f"broadcast on {topic!r}")
        await self._call(nc.publish(subject, payload), f"broadcast on {topic!r}")

    async def subscribe(self, topic: str) -> FanoutSubscription:
        subject = self._fanout_subject(topic)
        nc = self._require_connected(f"subscribe to {topic!r}")
        subscription = _NatsFanout(self)
        deliver: Callable[[Msg], Awaitable[None]] = subscription.deliver
        subscription._subscription = await self._call(
            nc.subscribe(subject, cb=deliver), f"subscribe to {topic!r}"
        )
        await self._call(nc.flush(), f"subscribe to {topic!r}")
        self._subscriptions.add(subscription)
        return subscription
