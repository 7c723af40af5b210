"""Ingest through the bus: telemetry is acknowledged to agents once JetStream holds it, and
the stream writers of every replica store it into the shared database.

Three parts, wired by :class:`der_sdk_headend.service.Headend` when ``HEADEND_BUS_URL`` is
set:

:class:`BusTelemetrySink`
    The ingest writers' sink (:class:`~der_sdk_headend.ingest.telemetry.TelemetrySink`):
    a writer's group of checked batches is encoded with msgspec msgpack (samples and gap
    events), split into messages under ``bus.max_message_bytes`` and published to the
    telemetry stream; the writer acknowledges the agents once every message is stored
    (file storage). Each message carries a ``msg_id`` made of the agent, stream, seq and
    sample span of its batches, so a retried group is not stored twice within the bus's
    duplicate window. ``StreamFullError`` is a write failure: the batches go back to the
    ingest queue's head and are retried with backoff, the bounded queue fills, readers stop
    reading, gRPC flow control pushes back on the agents, which buffer. Nothing is
    dropped. While the bus is unavailable (``BusUnavailableError``) the group is stored
    directly in the database instead, as a headend alone does, so a replica keeps
    acknowledging its own agents through a bus outage (after the commit); when the
    database fails too, that is a write failure as above.

:class:`StreamWriters`
    ``writers`` tasks sharing the stream's durable consumer with every replica's writers.
    Each fetches up to :data:`FETCH_MESSAGES` messages, stores their samples in one
    ``append_telemetry`` call (PostgreSQL keeps one row per ``(asset_id, ts)``, so a
    redelivered message is stored once), appends the gap events, fires
    ``der_telemetry_received`` and acknowledges the messages. While storage fails the
    messages stay held (``in_progress`` every third of the ack wait) and the store is
    retried with backoff: one log line when it starts failing, one on recovery. A writer
    that dies without acknowledging (a killed replica) leaves its messages to be delivered
    again after ``HEADEND_BUS_ACK_WAIT_S``.

Latest telemetry anywhere
    After storing, a writer broadcasts the newest sample per asset on the fan-out topic
    :data:`LATEST_TOPIC`; every replica subscribes and takes what is newer than its
    latest cache, so ``GET /telemetry/{id}`` on any replica follows the newest stored
    sample within the writers' store time. Fan-out is at most once: the next broadcast
    supersedes a missed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from der_sdk.backoff import Backoff
from der_sdk.bus.contract import (
    BusError,
    BusUnavailableError,
    MessageBus,
    StreamBacklog,
    StreamConsumer,
    StreamFullError,
    StreamMessage,
)
from der_sdk.models import Event, TelemetrySample
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import StorageBackend
from der_sdk.tasks import cancel_and_wait
from der_sdk_headend.ingest.telemetry import SinkBatch, TelemetryIngest, TelemetrySink

__all__ = [
    "FETCH_MESSAGES",
    "LATEST_TOPIC",
    "NEAR_FULL_FRACTION",
    "BusTelemetrySink",
    "StreamWriterStats",
    "StreamWriters",
    "decode_message",
    "encode_batches",
]

log = logging.getLogger("der.headend.cluster.ingest")

LATEST_TOPIC = "telemetry.latest"
"""The fan-out topic of the newest stored sample per asset."""
FETCH_MESSAGES = 16
"""The most stream messages a writer holds at once (each at most ``max_message_bytes``,
1 MB by default): bounds a writer's memory."""
FETCH_WAIT_S = 0.5
"""How long a fetch waits for the first message."""
NEAR_FULL_FRACTION = 0.9
"""``/healthz`` says degraded when the stream holds this share of a limit."""
BACKLOG_POLL_S = 1.0
"""How often the stream's backlog is read for ``/metrics`` and ``/healthz``."""
RETRY_INITIAL_S = 0.25
"""A stream writer's first wait after a failed store; doubles up to :data:`RETRY_MAX_S`."""
RETRY_MAX_S = 5.0
FULL_RETRY_MAX_S = 0.5
"""The longest wait before publishing again into a full stream."""
STALL_AFTER_S = 5.0
"""A store failing, or running longer than this, makes ``/healthz`` degraded."""


# =========================================================================== the message


class _BusBatch(msgspec.Struct, array_like=True, frozen=True):
    """One agent batch (or a part of one) on the stream."""

    samples: list[TelemetrySample]
    gaps: list[Event]


_encoder = msgspec.msgpack.Encoder()
_decode_batches = msgspec.msgpack.Decoder(list[_BusBatch]).decode
_decode_samples = msgspec.msgpack.Decoder(list[TelemetrySample]).decode


def _batch_key(batch: SinkBatch, part: str = "") -> str:
    samples = batch.samples
    span = f"{samples[0].ts.timestamp()}:{samples[-1].ts.timestamp()}" if samples else ""
    stream = batch.stream
    return f"{stream.agent_id}|{stream.telemetry_stream}|{batch.seq}|{len(samples)}|{span}{part}"


def _msg_id(keys: Sequence[str]) -> str:
    return hashlib.blake2b("\n".join(keys).encode(), digest_size=16).hexdigest()


def encode_batches(batches: Sequence[SinkBatch], max_bytes: int) -> list[tuple[str, bytes]]:
    """``batches`` as stream messages of at most ``max_bytes`` each: ``(msg_id, payload)``.

    Batches are packed in order, so the same batches give the same messages (and ids)
    when a group is published again. A batch larger than ``max_bytes`` is split into
    parts (its gap events ride the first); a sample alone larger than that is kept without
    its ``details``, as ``bad`` (logged).
    """
    parts: list[tuple[str, bytes]] = []  # (key, encoded _BusBatch)
    for batch in batches:
        gaps = batch.gap_events() if batch.gaps else []
        encoded = _encoder.encode(_BusBatch(batch.samples, gaps))
        if len(encoded) + 8 <= max_bytes:
            parts.append((_batch_key(batch), encoded))
            continue
        parts.extend(_split(batch, gaps, max_bytes))
    messages: list[tuple[str, bytes]] = []
    keys: list[str] = []
    raws: list[msgspec.Raw] = []
    size = 0
    for key, encoded in parts:
        if raws and size + len(encoded) + 8 > max_bytes:
            messages.append((_msg_id(keys), _encoder.encode(raws)))
            keys, raws, size = [], [], 0
        keys.append(key)
        raws.append(msgspec.Raw(encoded))
        size += len(encoded)
    if raws:
        messages.append((_msg_id(keys), _encoder.encode(raws)))
    return messages


def _split(batch: SinkBatch, gaps: list[Event], max_bytes: int) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    pending = [(0, len(batch.samples))]
    while pending:
        start, end = pending.pop(0)
        chunk = _BusBatch(batch.samples[start:end], gaps if start == 0 else [])
        encoded = _encoder.encode(chunk)
        if len(encoded) + 8 <= max_bytes:
            out.append((_batch_key(batch, f"|{start}-{end}"), encoded))
        elif end - start <= 1:
            out.append((_batch_key(batch, f"|{start}"), _oversize(chunk, len(encoded))))
        else:
            middle = (start + end) // 2
            pending[:0] = [(start, middle), (middle, end)]
    return out


def _oversize(chunk: _BusBatch, size: int) -> bytes:
    """One sample too large for a bus message: kept, as ``bad``, without its details
    (logged; the agent's batch is not held back for ever by one sample)."""
    sample = chunk.samples[0]
    reason = f"details too large for the message bus ({size} bytes), left out"
    log.error("telemetry sample of asset %s at %s: %s", sample.asset_id, sample.ts, reason)
    before = [sample.quality_reason] if sample.quality_reason else []
    kept = msgspec.structs.replace(
        sample, details={}, quality="bad", quality_reason="; ".join([*before, reason])
    )
    return _encoder.encode(_BusBatch([kept], chunk.gaps))


def decode_message(payload: bytes) -> tuple[list[TelemetrySample], list[Event]]:
    """The samples and gap events of one stream message.

    :raises msgspec.DecodeError: not a telemetry message.
    """
    samples: list[TelemetrySample] = []
    gaps: list[Event] = []
    for batch in _decode_batches(payload):
        samples.extend(batch.samples)
        gaps.extend(batch.gaps)
    return samples, gaps


# =========================================================================== the publisher


class BusTelemetrySink(TelemetrySink):
    """Publishes the ingest writers' groups to the bus's telemetry stream (module
    docstring).

    With ``storage``, a group the bus cannot take because it is unavailable (not because
    the stream is full) is stored there directly instead, as a headend alone stores it:
    the replica keeps acknowledging its own agents through a bus outage, after the
    database committed. Storage keeps one row per ``(asset_id, ts)``, so a group whose
    publish had an unknown outcome is stored once all the same.
    """

    def __init__(
        self,
        bus: MessageBus,
        storage: StorageBackend | None = None,
        plugins: Plugins | None = None,
    ) -> None:
        self._bus = bus
        self._storage = storage
        self._plugins = plugins
        self.name = f"bus {bus.name}"
        self.messages_published = 0
        self.duplicates = 0
        self.direct_writes = 0
        self._direct_since: float | None = None

    async def write(self, batches: Sequence[SinkBatch]) -> None:
        bus = self._bus
        try:
            messages = encode_batches(batches, bus.max_message_bytes)
            stream = bus.telemetry
            for msg_id, payload in messages:
                ack = await stream.publish(payload, msg_id=msg_id)
                self.messages_published += 1
                if ack.duplicate:
                    self.duplicates += 1
        except BusUnavailableError as exc:
            if self._storage is None:
                raise
            await self._write_direct(batches, exc)
            return
        if self._direct_since is not None:
            log.warning(
                "bus %s: telemetry goes through the stream again (stored directly for %.1f s)",
                bus.name,
                time.monotonic() - self._direct_since,
            )
            self._direct_since = None

    async def _write_direct(self, batches: Sequence[SinkBatch], exc: BusUnavailableError) -> None:
        storage = self._storage
        assert storage is not None
        samples = [s for batch in batches for s in batch.samples]
        if samples:
            await storage.append_telemetry(samples)
        for batch in batches:
            for event in batch.gap_events() if batch.gaps else ():
                await storage.append_event(event)
        self.direct_writes += 1
        if self._direct_since is None:
            self._direct_since = time.monotonic()
            log.warning(
                "bus %s unavailable (%s): storing telemetry directly in %s until it is back",
                self._bus.name,
                exc,
                storage.name,
            )
        if samples and self._plugins is not None:
            self._plugins.notify("der_telemetry_received", samples=samples)

    def retry_max_s(self, exc: Exception) -> float:
        # a full stream is flow control, not an outage: try again soon after the writers
        # free space, or the stream drains while every publisher sleeps
        return FULL_RETRY_MAX_S if isinstance(exc, StreamFullError) else RETRY_MAX_S

    def failure_reason(self, exc: Exception) -> str:
        if isinstance(exc, StreamFullError):
            options = self._bus.options
            return (
                f"the bus telemetry stream is full ({options.telemetry_max_messages} messages, "
                f"{options.telemetry_max_bytes} bytes): agents are held back and buffer "
                "until the stream writers free space"
            )
        if isinstance(exc, BusError):
            return f"bus unavailable: telemetry cannot be published ({exc}); agents buffer"
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return f"storage writes failing: {text}"


# =========================================================================== the writers


@dataclass(frozen=True)
class StreamWriterStats:
    """Counters of the stream writers and the stream's backlog, for ``/metrics``."""

    writers: int
    messages_acked: int
    messages_redelivered: int
    messages_undecodable: int
    samples_stored: int
    gap_events_stored: int
    stores: int
    store_seconds: float
    store_failures: int
    latest_received: int
    backlog: StreamBacklog | None
    stalled: bool
    stall_reason: str | None


class StreamWriters:
    """This replica's stream writers and its latest-telemetry subscriber (module docstring).

    :param writers: concurrent writer tasks (``INGEST_WRITERS``).
    :param ingest: this replica's ingest, whose latest cache the fan-out updates.
    """

    def __init__(
        self,
        bus: MessageBus,
        storage: StorageBackend,
        plugins: Plugins,
        ingest: TelemetryIngest,
        *,
        writers: int = 2,
        fetch_messages: int = FETCH_MESSAGES,
        stall_after_s: float = STALL_AFTER_S,
    ) -> None:
        if writers < 1:
            raise ValueError(f"writers must be at least 1, got {writers}")
        if fetch_messages < 1:
            raise ValueError(f"fetch_messages must be at least 1, got {fetch_messages}")
        self.writers = writers
        self.fetch_messages = fetch_messages
        self.stall_after_s = stall_after_s
        self._bus = bus
        self._storage = storage
        self._plugins = plugins
        self._ingest = ingest
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: dict[int, StreamConsumer] = {}
        self._closing = False
        self._backlog: StreamBacklog | None = None
        self._store_started: dict[int, float] = {}
        self._failing_since: float | None = None
        self._failure: str | None = None
        self._acked = 0
        self._redelivered = 0
        self._undecodable = 0
        self._samples_stored = 0
        self._gaps_stored = 0
        self._stores = 0
        self._store_seconds = 0.0
        self._store_failures = 0
        self._latest_received = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writers, the latest-telemetry subscriber and the backlog monitor."""
        if self._tasks:
            return
        self._closing = False
        self._tasks = [
            *(
                asyncio.create_task(self._write_loop(i), name=f"headend-stream-writer-{i}")
                for i in range(self.writers)
            ),
            asyncio.create_task(self._latest_loop(), name="headend-latest-telemetry"),
            asyncio.create_task(self._backlog_loop(), name="headend-stream-backlog"),
        ]

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let the writers finish what they hold (up to ``timeout_s``; they fetch nothing
        more), then stop. Messages fetched and not acknowledged are delivered again after
        the ack wait."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        writers, others = tasks[: self.writers], tasks[self.writers :]
        for task in others:
            task.cancel()
        # A writer ends on its own after its fetch (FETCH_WAIT_S) or store: a fetch is not
        # cancelled, as nats-py answers a cancelled fetch with a TimeoutError.
        await asyncio.wait(writers, timeout=timeout_s + FETCH_WAIT_S)
        await cancel_and_wait(tasks, attempts=3)  # what is left (logs what does not stop)
        for consumer in list(self._consumers.values()):
            with contextlib.suppress(Exception):
                await consumer.close()
        self._consumers.clear()

    # ------------------------------------------------------------------ status

    def stats(self) -> StreamWriterStats:
        reason = self.health_reason()
        return StreamWriterStats(
            writers=self.writers,
            messages_acked=self._acked,
            messages_redelivered=self._redelivered,
            messages_undecodable=self._undecodable,
            samples_stored=self._samples_stored,
            gap_events_stored=self._gaps_stored,
            stores=self._stores,
            store_seconds=self._store_seconds,
            store_failures=self._store_failures,
            latest_received=self._latest_received,
            backlog=self._backlog,
            stalled=reason is not None,
            stall_reason=reason,
        )

    def health_reason(self) -> str | None:
        """Why ``/healthz`` should say degraded because of the stream, or ``None``."""
        if self._failure is not None:
            return f"stream writers cannot store telemetry: {self._failure}"
        started = min(self._store_started.values(), default=None)
        if started is not None and time.monotonic() - started > self.stall_after_s:
            return (
                f"a stream writer's store has been running for {time.monotonic() - started:.0f} s"
            )
        backlog = self._backlog
        if backlog is not None:
            for held, limit, unit in (
                (backlog.messages, backlog.max_messages, "messages"),
                (backlog.bytes, backlog.max_bytes, "bytes"),
            ):
                if limit > 0 and held >= NEAR_FULL_FRACTION * limit:
                    return (
                        f"the bus telemetry stream is near full ({held} of {limit} {unit}): "
                        "agents will be held back"
                    )
        return None

    # ------------------------------------------------------------------ writers

    async def _write_loop(self, index: int) -> None:
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S, multiplier=2.0, jitter=0.0)
        failed = 0
        while not self._closing:
            try:
                consumer = self._consumers.get(index)
                if consumer is None:
                    consumer = self._consumers[index] = await self._bus.telemetry.consumer()
                messages = await consumer.fetch(self.fetch_messages, timeout_s=FETCH_WAIT_S)
                failed = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never end silently: a dead writer stores nothing
                failed += 1
                if isinstance(exc, BusError):
                    log.debug("stream writer %d: fetch failed: %s", index, exc)
                elif failed == 1:
                    log.error(
                        "stream writer %d: fetching from the telemetry stream failed "
                        "unexpectedly; retrying",
                        index,
                        exc_info=exc,
                    )
                state = self._bus.state
                if state == "closed":
                    return
                if state == "connected":  # the bus is fine, so this consumer is not
                    stale = self._consumers.pop(index, None)
                    if stale is not None:
                        with contextlib.suppress(Exception):
                            await stale.close()
                await asyncio.sleep(backoff.delay(failed))
                continue
            if messages:
                try:
                    await self._store(index, messages)
                except asyncio.CancelledError:
                    raise
                except Exception:  # not acknowledged: delivered again after the ack wait
                    log.exception("stream writer %d failed on %d message(s)", index, len(messages))

    async def _store(self, index: int, messages: list[StreamMessage]) -> None:
        """Store ``messages`` until it works, then acknowledge them."""
        samples: list[TelemetrySample] = []
        gaps: list[Event] = []
        good: list[StreamMessage] = []
        for message in messages:
            if message.deliveries > 1:
                self._redelivered += 1
            try:
                message_samples, message_gaps = decode_message(message.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._undecodable += 1
                log.error(
                    "stream message %d is not telemetry (%s): acknowledged and left out",
                    message.sequence,
                    exc,
                )
                with contextlib.suppress(BusError):
                    await message.ack()
                continue
            samples.extend(message_samples)
            gaps.extend(message_gaps)
            good.append(message)
        if not good:
            return
        self._store_started[index] = started = time.monotonic()
        holder = asyncio.create_task(self._hold(good), name=f"headend-stream-hold-{index}")
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S, multiplier=2.0, jitter=0.0)
        failed = 0
        gap_count = len(gaps)
        unstored = bool(samples)
        try:
            while True:
                try:
                    if unstored:
                        await self._storage.append_telemetry(samples)
                        unstored = False
                    while gaps:  # each recorded once, however often a later one fails
                        await self._storage.append_event(gaps[0])
                        del gaps[0]
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._store_failures += 1
                    failed += 1
                    self._on_failure(exc, len(good), len(samples))
                    await asyncio.sleep(backoff.delay(failed))
                    continue
                break
        finally:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
            self._store_seconds += time.monotonic() - started
            del self._store_started[index]
        self._on_success()
        self._stores += 1
        self._samples_stored += len(samples)
        self._gaps_stored += gap_count
        if samples:
            self._plugins.notify("der_telemetry_received", samples=samples)
        results = await asyncio.gather(*(m.ack() for m in good), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                # delivered again after the ack wait; storage keeps one row per sample
                log.debug("acknowledging a stored stream message failed: %s", result)
            else:
                self._acked += 1
        if samples:
            await self._broadcast_latest(samples)

    async def _hold(self, messages: list[StreamMessage]) -> None:
        """Keep ``messages`` from being delivered again while they are being stored."""
        every = max(0.5, self._bus.options.telemetry_ack_wait_s / 3)
        while True:
            await asyncio.sleep(every)
            await asyncio.gather(*(m.in_progress() for m in messages), return_exceptions=True)

    def _on_failure(self, exc: Exception, messages: int, samples: int) -> None:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "storage %s: stream writers cannot store telemetry: %s; %d message(s) (%d "
                "samples) held on the bus, retrying (agents are still acknowledged while "
                "the stream has room)",
                self._storage.name,
                text,
                messages,
                samples,
            )
        elif text != self._failure:
            log.warning("storage %s: stream writers still failing: %s", self._storage.name, text)
        self._failure = text

    def _on_success(self) -> None:
        if self._failing_since is None:
            return
        log.warning(
            "storage %s: stream writers store again after %.1f s",
            self._storage.name,
            time.monotonic() - self._failing_since,
        )
        self._failing_since = None
        self._failure = None

    # ------------------------------------------------------------------ latest telemetry

    async def _broadcast_latest(self, samples: list[TelemetrySample]) -> None:
        newest: dict[str, TelemetrySample] = {}
        for sample in samples:
            current = newest.get(sample.asset_id)
            if current is None or sample.ts > current.ts:
                newest[sample.asset_id] = sample
        latest = list(newest.values())
        payload = _encoder.encode(latest)
        limit = self._bus.max_message_bytes
        parts = [payload]
        if len(payload) > limit:  # many assets in one store: several messages
            pieces = len(payload) // limit + 2
            step = -(-len(latest) // pieces)
            parts = [_encoder.encode(latest[i : i + step]) for i in range(0, len(latest), step)]
        try:
            for part in parts:
                await self._bus.broadcast(LATEST_TOPIC, part)
        except Exception as exc:  # at most once: the next store broadcasts newer samples
            log.debug("broadcasting the latest telemetry failed: %s", exc)

    async def _latest_loop(self) -> None:
        """Take every replica's newest stored samples into this replica's latest cache;
        subscribe again whenever the subscription ends (a bus outage)."""
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S, multiplier=2.0)
        failed = 0
        while not self._closing:
            try:
                subscription = await self._bus.subscribe(LATEST_TOPIC)
            except BusUnavailableError as exc:
                failed += 1
                log.debug("subscribing to %s failed: %s", LATEST_TOPIC, exc)
                await asyncio.sleep(backoff.delay(failed))
                continue
            except BusError:
                if self._bus.state == "closed":
                    return
                failed += 1
                await asyncio.sleep(backoff.delay(failed))
                continue
            failed = 0
            try:
                async for payload in subscription:
                    try:
                        samples = _decode_samples(payload)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        log.warning("a %s message did not decode: %s", LATEST_TOPIC, exc)
                        continue
                    self._latest_received += 1
                    self._ingest.merge_latest(samples)
            finally:
                with contextlib.suppress(Exception):
                    await subscription.close()
            if self._bus.state == "closed":
                return
            await asyncio.sleep(RETRY_INITIAL_S)

    async def _backlog_loop(self) -> None:
        while not self._closing:
            try:
                self._backlog = await self._bus.telemetry.backlog()
            except BusError as exc:
                log.debug("reading the telemetry stream's backlog failed: %s", exc)
            await asyncio.sleep(BACKLOG_POLL_S)
