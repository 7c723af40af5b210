"""Telemetry ingest: check on the stream's reader, store on one writer task.

Ingest speaks :mod:`der_sdk.models` only. The link's servicer decodes what arrives
(:func:`der_sdk.wire.codec.telemetry_batch_from_pb`) into a
:class:`~der_sdk.models.TelemetryBatch`: a sample that does not decode is logged there
with its asset and skipped, the rest of the batch goes on; a non-finite number (NaN,
±inf) in ``mw``, ``mw_setpoint`` or ``details`` is taken out and the sample kept as
``bad`` with the field named in ``quality_reason``, and the batch's ``non_finite`` says
which. Heartbeats arrive as :class:`~der_sdk.models.AgentHeartbeat`, events as
:class:`~der_sdk.models.Event`; acknowledgements leave as
:class:`~der_sdk.models.TelemetryAck` and :class:`~der_sdk.models.EventAck` on the
stream's outbox, encoded by the link as it writes them.

A batch goes through two stages.

**On the stream's reader**, before the batch is decoded, the reader reserves queue space
for its raw sample count (:meth:`TelemetryIngest.reserve`, a first-come-first-served
:class:`~der_sdk_headend.ingest.space.QueueSpace`). While the queue is full the reader
waits there, holding only the parsed protobuf of one batch, and stops reading its stream,
so gRPC flow control pushes back on the agent, which keeps the samples in its own buffer.
A write that frees space wakes only the readers whose batches now fit, in arrival order.
Then, once decoded (:meth:`TelemetryIngest.queue_batch`):

1. drop samples for assets the stream does not serve (an event and one warning per
   stream and asset);
2. log a warning for a sample the decoder kept as ``bad`` for its non-finite numbers
   (one per stream, asset and fields);
3. check ``details`` against the asset type: a bad field is dropped from ``details``, the
   sample is kept and its quality downgraded from ``good`` to ``uncertain`` with the
   problem appended to ``quality_reason``; unknown fields are kept, missing ones are fine;
4. update the in-memory latest sample of each asset (only by a newer ``ts``), so
   ``/telemetry/latest`` stays fresh even while storage is stalled;
5. put the batch on the **bounded ingest queue**, giving back the space reserved for
   samples that were skipped or dropped. Nothing is dropped for want of space, and memory
   does not grow with the backlog: decoded samples exist only within the bound.

**On the writer tasks** (``INGEST_WRITERS``, default 2, so one write is copied in
while the other commits): each claims up to :data:`WRITE_BATCH_SAMPLES` samples from the
head of the queue, stores them in one ``append_telemetry`` call, and only after that
commit fires ``der_telemetry_received`` and acknowledges each batch with
``TelemetryAck(seq, stored_through)``; writes finish in any order. A failed write puts
its batches back at the head of the queue, unacknowledged, and is retried with backoff
(one log line when it starts failing, one when it recovers); ``/healthz`` reports the
stall. Heartbeats and events ride writer 0 (heartbeats coalesced per agent).

**Sequence tracking and gaps.** Batch ``seq`` numbers are per agent telemetry stream (the
agent's buffer, ``Register.stream_id``), durable across agent restarts. A seq leaves the
agent's buffer in one of two ways, acknowledged or dropped by its size or age bounds, and
only the agent knows which. So the agent is the source of truth: every batch carries
``floor_seq`` (the lowest seq it holds) and ``dropped``, the exact seq ranges it dropped
without an acknowledgement, kept in its buffer file until an acknowledgement covers them.
Below the floor, every seq not listed was acknowledged, by this run or an earlier one.

For each stream the headend keeps a :class:`SeqCursor` for as long as it runs. When a
batch is queued, a listed seq this run has neither stored nor received is a **gap**;
when the batch is stored, its gaps are written as ``telemetry_gap`` events (one per range)
*before* it is acknowledged, and ``stored_through`` moves over everything settled: stored,
acknowledged earlier, or recorded as a gap. The agent forgets a listed range once an ack's
``stored_through`` covers it. What this gives:

* *headend restart*: the new cursor knows nothing and needs nothing; seqs an earlier run
  acknowledged are below the floor and not listed, so they are no gap, even the live
  batches a replay sent first, which sit above seqs the agent still holds;
* *agent restart*: the ranges are in the buffer file and listed again;
* *duplicates*: a range is listed by every batch until the ack covering it arrives; once
  recorded (or pending) it is not recorded again, and a batch sent twice is stored
  idempotently by the backend's ``(asset_id, ts)`` key;
* *a dropped seq that did arrive* (sent, then dropped before its ack came back) was read
  from the stream before the batch listing it, so it is stored or queued: no gap;
* *older agents* send no list (``lists_dropped`` false): their acknowledged and dropped
  seqs below the floor cannot be told apart, so the watermark follows the floor and no gap
  is inferred; their own ``telemetry_dropped`` events remain the record of their drops.

**Sinks.** By default the writers store into the headend's storage. A replica of a
cluster (``HEADEND_BUS_URL``) gives :class:`TelemetryIngest` a :class:`TelemetrySink`
instead (:class:`der_sdk_headend.cluster.ingest.BusTelemetrySink`): a writer hands its group
(samples and gap events) to the sink and acknowledges the agents once the sink has it
durably. A sink's failure is a write failure like storage's: the batches go back to the
queue head, the queue fills, readers stop reading, agents buffer.

Not promised: a batch stored by an earlier run whose ack was lost, and then dropped by the
agent before it could send it again, is reported as a gap although it is stored. A gap
event whose ack is lost with a killed headend is recorded again by the next run.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from der_sdk.asset_types import validate_details
from der_sdk.backoff import Backoff
from der_sdk.errors import UnknownNameError
from der_sdk.extensions import AssetType
from der_sdk.inventory import Inventory
from der_sdk.models import (
    AgentHeartbeat,
    Asset,
    Event,
    EventAck,
    Heartbeat,
    SeqRange,
    TelemetryAck,
    TelemetryBatch,
    TelemetrySample,
    utc_now,
)
from der_sdk.plugins import Plugins
from der_sdk.storage.contract import StorageBackend
from der_sdk_headend.ingest.space import QueueSpace
from der_sdk_headend.presence import AgentStream, Presence

__all__ = [
    "DEFAULT_QUEUE_MAX_SAMPLES",
    "STALL_AFTER_S",
    "WRITE_BATCH_SAMPLES",
    "IngestStats",
    "SeqCursor",
    "SinkBatch",
    "TelemetryIngest",
    "TelemetrySink",
]

log = logging.getLogger("der.headend.ingest")

DEFAULT_QUEUE_MAX_SAMPLES = 50_000
"""How many samples may wait for storage before readers stop reading their streams."""
WRITE_BATCH_SAMPLES = 5_000
"""The most samples one writer stores in one ``append_telemetry`` call."""
DEFAULT_WRITERS = 2
"""Concurrent writes: while one commits (PostgreSQL waits for its WAL flush), the next
is copied in. Measured with 1,000 streams (docs/performance.md): 2 writers store about a
third more than 1; 3 no more than 2."""
STALL_AFTER_S = 5.0
"""A write failing, or running or waiting longer than this, makes ``/healthz`` degraded."""
RETRY_INITIAL_S = 0.25
"""A writer's first wait after a failed write; doubles each failure up to
:data:`RETRY_MAX_S`, back to this after a good write."""
RETRY_MAX_S = 5.0


@dataclass
class SeqCursor:
    """What this headend run knows of one agent telemetry stream's sequence numbers.

    Seqs are *settled* when the agent may forget them: stored, acknowledged to the agent
    earlier (below its floor and not listed as dropped), or dropped by the agent and
    recorded as a gap. ``stored_through`` is the contiguous watermark (every seq up to it
    is settled) and what each ``TelemetryAck`` carries; ``settled`` holds the settled
    ranges above it. ``pending`` holds what is on its way to settled: seqs received in this
    run and not yet stored, and gaps found and not yet written. All are sorted lists of
    disjoint ``(first, last)`` ranges, so a dropped range of a million seqs is one entry.

    Two calls per batch: :meth:`received` on the stream's reader when the batch is queued
    (it finds the gaps), :meth:`stored` on the writer once the batch and its gap events
    are in storage (it moves the watermark).
    """

    stored_through: int = 0
    settled: list[SeqRange] = field(default_factory=list)
    pending: list[SeqRange] = field(default_factory=list)
    gaps: int = 0

    def received(self, seq: int, dropped: Sequence[SeqRange] | None) -> list[SeqRange]:
        """Batch ``seq`` was queued listing the agent's ``dropped`` ranges; return the gaps:
        the dropped seqs this run has neither settled nor received.

        A dropped seq the agent sent before dropping it was read from the stream before
        this batch (one stream keeps order), so it is settled or pending, never a gap. A
        range listed again (every batch lists it until the agent hears it was recorded)
        finds its seqs pending or settled: one gap per range and run.
        """
        gaps: list[SeqRange] = []
        for first, last in dropped or ():
            first = max(first, self.stored_through + 1)
            if first <= last:
                gaps.extend(_uncovered(first, last, self.settled, self.pending))
        for first, last in gaps:
            _add(self.pending, first, last)
        if seq > self.stored_through:
            _add(self.pending, seq, seq)
        return gaps

    def stored(
        self,
        seq: int,
        floor_seq: int,
        dropped: Sequence[SeqRange] | None,
        gaps: Sequence[SeqRange] = (),
    ) -> int:
        """Batch ``seq`` and the ``gaps`` it revealed are in storage; return the new
        ``stored_through``.

        Below ``floor_seq`` every seq the agent does not list as dropped was acknowledged
        (in this run or an earlier one): settled. A listed seq settles only when it is
        stored or its gap recorded. From an agent that does not list its drops
        (``dropped is None``) everything below the floor settles, and no gap is inferred:
        its acknowledged and dropped seqs cannot be told apart.
        """
        _remove(self.pending, seq, seq)
        if seq == self.stored_through + 1 and not gaps:
            self.stored_through = seq  # the usual case: the next seq, nothing to merge yet
        elif seq > self.stored_through:
            _add(self.settled, seq, seq)
        for first, last in gaps:
            _remove(self.pending, first, last)
            _add(self.settled, first, last)
        below = self.stored_through + 1, floor_seq - 1
        if below[0] <= below[1]:
            acked = [below] if dropped is None else _uncovered(*below, dropped)
            for first, last in acked:
                _add(self.settled, first, last)
        settled = self.settled
        while settled and settled[0][0] <= self.stored_through + 1:
            self.stored_through = max(self.stored_through, settled.pop(0)[1])
        self.gaps += len(gaps)
        return self.stored_through


def _overlapping(ranges: Sequence[SeqRange], first: int, last: int) -> range:
    """The indexes of the ranges in sorted, disjoint ``ranges`` that overlap first..last."""
    start = bisect.bisect_left(ranges, (first,))
    if start and ranges[start - 1][1] >= first:
        start -= 1
    end = bisect.bisect_right(ranges, (last, math.inf), start)
    return range(start, end)


def _add(ranges: list[SeqRange], first: int, last: int) -> None:
    """Add first..last to sorted, disjoint ``ranges``, merging what touches it."""
    if not ranges or ranges[-1][1] < first - 1:  # the usual case: seqs arrive in order
        ranges.append((first, last))
        return
    if ranges[-1][1] == first - 1:
        ranges[-1] = (ranges[-1][0], last)
        return
    span = _overlapping(ranges, first - 1, last + 1)
    if span:
        first = min(first, ranges[span.start][0])
        last = max(last, ranges[span.stop - 1][1])
    ranges[span.start : span.stop] = [(first, last)]


def _remove(ranges: list[SeqRange], first: int, last: int) -> None:
    """Take first..last out of sorted, disjoint ``ranges``."""
    if ranges and ranges[0][0] == first:  # the usual case: stored in order
        if ranges[0][1] <= last:
            if len(ranges) == 1 or ranges[1][0] > last:
                del ranges[0]
                return
        else:
            ranges[0] = (last + 1, ranges[0][1])
            return
    span = _overlapping(ranges, first, last)
    pieces: list[SeqRange] = []
    if span:
        low, high = ranges[span.start][0], ranges[span.stop - 1][1]
        if low < first:
            pieces.append((low, first - 1))
        if high > last:
            pieces.append((last + 1, high))
    ranges[span.start : span.stop] = pieces


def _uncovered(first: int, last: int, *covers: Sequence[SeqRange]) -> list[SeqRange]:
    """The parts of first..last outside every range in ``covers`` (each sorted, disjoint)."""
    left = [(first, last)]
    for cover in covers:
        for index in _overlapping(cover, first, last):
            _remove(left, *cover[index])
    return left


@dataclass(frozen=True)
class IngestStats:
    """Counters for ``/healthz`` and ``/metrics``."""

    queued_batches: int
    queued_samples: int
    max_queued_samples: int
    samples_stored: int
    batches_acked: int
    writes: int
    write_seconds: float
    write_failures: int
    gaps: int
    stalled: bool
    stall_reason: str | None
    oldest_queued_s: float


class SinkBatch(abc.ABC):
    """One agent batch as a :class:`TelemetrySink` sees it (read-only)."""

    __slots__ = ()

    stream: AgentStream
    seq: int
    samples: list[TelemetrySample]
    gaps: list[SeqRange]

    def gap_events(self) -> list[Event]:
        """The ``telemetry_gap`` events of the batch: recorded before it is acknowledged."""
        return [_gap_event(self.stream, first, last) for first, last in self.gaps]


class TelemetrySink(abc.ABC):
    """Where the ingest writers put checked telemetry instead of the headend's storage.

    :meth:`write` returns once the batches (their samples and gap events) are held
    durably; the writer then acknowledges them to their agents. Raising is a write
    failure: the batches go back to the head of the ingest queue and are written again
    with backoff, so a sink must take the same batches twice without harm (an
    idempotency key per batch).
    """

    #: Shown in logs (``bus nats``).
    name: str = "sink"

    @abc.abstractmethod
    async def write(self, batches: Sequence[SinkBatch]) -> None:
        """Hold ``batches`` durably; raise when they are not (all) held."""

    def retry_max_s(self, exc: Exception) -> float:
        """The longest wait before writing again after :meth:`write` failed with ``exc``
        (the writers back off from 0.25 s, doubling, up to this or 5 s)."""
        return RETRY_MAX_S

    def failure_reason(self, exc: Exception) -> str:
        """What ``/healthz`` says while :meth:`write` keeps failing with ``exc``."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return f"{self.name} writes failing: {text}"


@dataclass
class _Item(SinkBatch):
    stream: AgentStream
    seq: int
    floor_seq: int
    dropped: tuple[SeqRange, ...] | None  # None: an agent that does not list its drops
    gaps: list[SeqRange]  # dropped seqs never received: recorded before the batch is acked
    samples: list[TelemetrySample]
    queued_at: float


@dataclass
class _EventItem:
    event: Event
    ack: tuple[AgentStream, str] | None = None  # (stream, event id) to acknowledge


class TelemetryIngest:
    """Checks telemetry on arrival, keeps the latest sample of every asset in memory, and
    stores batches through a bounded queue and one writer task."""

    def __init__(
        self,
        inventory: Inventory,
        plugins: Plugins,
        storage: StorageBackend,
        presence: Presence,
        *,
        max_queued_samples: int = DEFAULT_QUEUE_MAX_SAMPLES,
        stall_after_s: float = STALL_AFTER_S,
        writers: int = DEFAULT_WRITERS,
        sink: TelemetrySink | None = None,
    ) -> None:
        if writers < 1:
            raise ValueError(f"writers must be at least 1, got {writers}")
        self.writers = writers
        self._inventory = inventory
        self._plugins = plugins
        self._storage = storage
        self._sink = sink
        self._presence = presence
        self._latest: dict[str, TelemetrySample] = {}
        self.latest_listener: Callable[[TelemetrySample], None] | None = None
        """Called with every sample that becomes an asset's latest (the console's live hub,
        only while a console listens); ``None`` costs one check per new latest sample."""
        self.event_listener: Callable[[Event], Awaitable[None]] | None = None
        """Awaited with each event before it is stored (the alarm book). An error it
        raises is a storage failure: the event stays queued, unacknowledged, and is tried
        again, so the listener must be idempotent (the alarm book is, by event id)."""
        self._known: dict[str, tuple[Asset, AssetType | None]] = {}
        self._space = QueueSpace(max_queued_samples)
        self.stall_after_s = stall_after_s
        self._queue: deque[_Item] = deque()
        self._events: deque[_EventItem] = deque()
        self._heartbeats: dict[str, tuple[AgentStream, AgentHeartbeat]] = {}
        self._queued_samples = 0
        self._work = asyncio.Event()
        self._cursors: dict[tuple[str, str], SeqCursor] = {}
        self._writers: list[asyncio.Task[None]] = []
        self._claimed: dict[int, list[_Item]] = {}  # writer → the batches it is storing
        self._closing = False
        self._samples_stored = 0
        self._batches_acked = 0
        self._write_failures = 0
        self._writes = 0
        self._write_seconds = 0.0
        self._failing_since: float | None = None
        self._failure: str | None = None
        self._failure_reason: str | None = None
        # events and heartbeats when telemetry goes to a sink (their own failures)
        self._side_failure: str | None = None
        self._side_failed = 0
        self._side_retry_at: float | None = None
        self._side_backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S, multiplier=2.0, jitter=0.0)
        self._write_started: dict[int, float] = {}

    @property
    def max_queued_samples(self) -> int:
        """How many samples may be queued (or reserved by readers decoding them) before
        readers wait."""
        return self._space.capacity

    @max_queued_samples.setter
    def max_queued_samples(self, value: int) -> None:
        self._space.capacity = value

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer task (the headend does this once storage is open)."""
        if not self._writers:
            self._writers = [
                asyncio.create_task(self._write_loop(index), name=f"headend-ingest-writer-{index}")
                for index in range(self.writers)
            ]

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Store what is queued (up to ``drain_timeout_s``), then stop the writer.

        Batches still queued after the timeout are not acknowledged: their agents send
        them again.
        """
        self._closing = True
        if not self._writers:
            return
        self._work.set()
        try:
            async with asyncio.timeout(drain_timeout_s):
                while self._queue or self._events or self._heartbeats or self._claimed_batches:
                    if all(writer.done() for writer in self._writers):
                        break
                    await asyncio.sleep(0.02)
        except TimeoutError:
            log.warning(
                "stopping with %d telemetry batch(es) not stored; their agents will send "
                "them again",
                len(self._queue) + self._claimed_batches,
            )
        for writer in self._writers:
            writer.cancel()
        # Bounded: a client library may swallow a cancel (nats-py turns some into
        # timeouts, which a sink reports as a failure to retry): cancel such a writer again.
        for _ in range(3):
            pending = [writer for writer in self._writers if not writer.done()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=1.0)
            for writer in pending:
                writer.cancel()
        for writer in self._writers:
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                log.error("ingest writer %s ended: %r", writer.get_name(), writer.exception())
        self._writers = []
        self._space.close()

    # ------------------------------------------------------------------ latest

    async def warm(self) -> None:
        """Fill the latest-sample cache from storage (at start, before agents connect)."""
        stored = await self._storage.latest_telemetry()
        self._latest = {a: s for a, s in stored.items() if a in self._inventory.assets}

    def latest(self, asset_id: str) -> TelemetrySample | None:
        return self._latest.get(asset_id)

    def merge_latest(self, samples: Sequence[TelemetrySample]) -> int:
        """Take ``samples`` (stored elsewhere, e.g. by another replica) into the latest
        cache where they are newer than what it holds; return how many were taken."""
        taken = 0
        assets = self._inventory.assets
        listener = self.latest_listener
        for sample in samples:
            current = self._latest.get(sample.asset_id)
            if (current is None or sample.ts > current.ts) and sample.asset_id in assets:
                self._latest[sample.asset_id] = sample
                taken += 1
                if listener is not None:
                    listener(sample)
        return taken

    # ------------------------------------------------------------------ status

    def stats(self) -> IngestStats:
        now = time.monotonic()
        waiting = [items[0].queued_at for items in self._claimed.values() if items]
        if self._queue:
            waiting.append(self._queue[0].queued_at)
        oldest = now - min(waiting) if waiting else 0.0
        reason = self._stall_reason(now, oldest)
        return IngestStats(
            queued_batches=len(self._queue) + self._claimed_batches,
            queued_samples=self._queued_samples,
            max_queued_samples=self.max_queued_samples,
            samples_stored=self._samples_stored,
            batches_acked=self._batches_acked,
            writes=self._writes,
            write_seconds=self._write_seconds,
            write_failures=self._write_failures,
            gaps=sum(c.gaps for c in self._cursors.values()),
            stalled=reason is not None,
            stall_reason=reason,
            oldest_queued_s=oldest,
        )

    def _stall_reason(self, now: float, oldest: float) -> str | None:
        if self._failure_reason is not None:
            return self._failure_reason
        if self._side_failure is not None:
            return f"storage writes failing (events and heartbeats held): {self._side_failure}"
        started = min(self._write_started.values(), default=None)
        if started is not None and now - started > self.stall_after_s:
            what = "storage" if self._sink is None else self._sink.name
            return f"a {what} write has been running for {now - started:.0f} s"
        if oldest > self.stall_after_s:
            return f"the oldest queued batch has waited {oldest:.0f} s"
        return None

    # ------------------------------------------------------------------ the reader side

    async def submit(self, stream: AgentStream, batch: TelemetryBatch) -> int:
        """Check ``batch`` and queue it for storage; wait while the queue is full.
        (The link reserves before it decodes: :meth:`reserve`, then :meth:`queue_batch`.)

        :return: how many samples were queued.
        """
        size = len(batch.samples)
        await self.reserve(stream, size)
        return self.queue_batch(stream, batch, size)

    async def reserve(self, stream: AgentStream, samples: int) -> None:
        """Wait, first come first served, until the queue has room for ``samples`` more
        (a batch's raw sample count, before it is decoded); then they are held for the
        caller, who must hand them to :meth:`queue_batch` or :meth:`unreserve`. A batch
        larger than the whole bound goes through alone."""
        self._presence.touch(stream)
        await self._space.reserve(samples)

    def would_wait(self, samples: int) -> bool:
        """Whether :meth:`reserve` of ``samples`` would wait now: the queue is full, or
        other readers wait for space already."""
        return self._space.would_wait(samples)

    def try_reserve(self, stream: AgentStream, samples: int) -> bool:
        """:meth:`reserve` when that needs no wait; ``False`` (nothing held) when it
        would: the caller may drop what it can before it waits."""
        self._presence.touch(stream)
        return self._space.try_reserve(samples)

    def unreserve(self, samples: int) -> None:
        """Give back a reservation whose batch will not be queued (it failed to decode)."""
        self._space.release(samples)

    def queue_batch(self, stream: AgentStream, batch: TelemetryBatch, reserved: int) -> int:
        """Check ``batch`` and queue it for storage in the space ``reserved`` for it
        (what its checks drop is given back at once).

        :return: how many samples were queued.
        """
        try:
            self._presence.touch(stream)
            samples: list[TelemetrySample] = []
            non_finite = batch.non_finite
            accept = self._accept
            for index, received in enumerate(batch.samples):
                sample = accept(stream, received, non_finite.get(index) if non_finite else None)
                if sample is not None:
                    samples.append(sample)

            latest = self._latest
            listener = self.latest_listener
            for sample in samples:
                current = latest.get(sample.asset_id)
                if current is None or sample.ts > current.ts:
                    latest[sample.asset_id] = sample
                    if listener is not None:
                        listener(sample)
            item = self._received(stream, batch, samples)
        except BaseException:
            self._space.release(reserved)
            raise
        size = len(samples)
        self._space.resize(reserved, size)
        self._queue.append(item)
        self._queued_samples += size
        self._work.set()
        return size

    def _received(
        self, stream: AgentStream, batch: TelemetryBatch, samples: list[TelemetrySample]
    ) -> _Item:
        """The queue item for ``batch``, noted in its stream's cursor (see :class:`SeqCursor`)."""
        dropped = batch.dropped
        key = (stream.agent_id, stream.telemetry_stream)
        cursor = self._cursors.get(key)
        if cursor is None:
            # An agent that sends no floor (older still): the watermark starts below its
            # first batch, as the agent acknowledged nothing it cannot have sent.
            start = batch.seq - 1 if not batch.floor_seq and dropped is None else 0
            cursor = self._cursors[key] = SeqCursor(stored_through=max(start, 0))
        gaps = cursor.received(batch.seq, dropped)
        return _Item(stream, batch.seq, batch.floor_seq, dropped, gaps, samples, time.monotonic())

    def submit_heartbeat(self, stream: AgentStream, heartbeat: AgentHeartbeat) -> None:
        """Queue a heartbeat; a newer one from the same stream replaces one not yet stored."""
        self._presence.touch(stream)
        if heartbeat.buffer is not None:
            stream.buffer = heartbeat.buffer
        if heartbeat.clock_offset_s is not None:
            stream.clock_offset_s = heartbeat.clock_offset_s
        self._heartbeats[stream.stream_id] = (stream, heartbeat)
        self._work.set()

    def submit_event(self, event: Event, ack: tuple[AgentStream, str] | None = None) -> None:
        """Queue an event for storage; ``ack`` = (stream, event id) to acknowledge after."""
        self._events.append(_EventItem(event, ack))
        self._work.set()

    def _accept(
        self, stream: AgentStream, sample: TelemetrySample, non_finite: Sequence[str] | None
    ) -> TelemetrySample | None:
        """The checked ``sample``, or ``None`` when it is dropped. ``non_finite``: the
        fields whose non-finite numbers the decoder took out (the sample is ``bad``)."""
        known = self._known.get(sample.asset_id)
        if known is None:
            known = self._resolve(sample.asset_id)
        if known is None or not stream.serves(known[0].asset_id):
            self._refuse_unserved(stream, sample.asset_id)
            return None
        asset, asset_type = known
        if non_finite:
            self._warn_once(
                stream,
                f"non-finite:{asset.asset_id}:{';'.join(non_finite)}",
                "telemetry of asset %s from %s: %s; sample kept as bad without those values",
                asset.asset_id,
                stream.describe(),
                "; ".join(non_finite),
            )

        quality = sample.quality
        reason = sample.quality_reason
        details = sample.details
        problems: list[str] = []
        if asset_type is not None:
            details, problems = validate_details(asset_type, sample.details)
        if problems:
            self._warn_once(
                stream,
                f"details:{asset.asset_id}:{';'.join(problems)}",
                "telemetry details of asset %s (%s) from %s: %s; sample kept as uncertain",
                asset.asset_id,
                asset.asset_type,
                stream.describe(),
                "; ".join(problems),
            )
            if quality == "good":
                quality = "uncertain"
            reason = "; ".join([*([reason] if reason else []), *problems])

        if (
            problems
            or details is not sample.details
            or asset.asset_id != sample.asset_id
            or asset.site_id != sample.site_id
        ):
            sample = msgspec.structs.replace(
                sample,
                asset_id=asset.asset_id,
                site_id=asset.site_id,
                quality=quality,
                quality_reason=reason,
                details=details,
            )
        return sample

    def _resolve(self, wire_id: str) -> tuple[Asset, AssetType | None] | None:
        """The inventory asset a sample's ``asset_id`` names, and its asset type (``None``
        when no plugin provides it); remembered per spelling. ``None``: not an asset."""
        try:
            asset = self._inventory.asset(wire_id)
        except UnknownNameError:
            return None
        types = self._plugins.asset_types
        known = (asset, types.get(asset.asset_type) if asset.asset_type in types else None)
        if len(self._known) < 4 * len(self._inventory.assets) + 64:  # bounded: any spelling
            self._known[wire_id] = known
        return known

    def _refuse_unserved(self, stream: AgentStream, asset_id: str) -> None:
        key = f"unserved:{asset_id}"
        if key in stream.warned:
            return
        known = asset_id in self._inventory.assets
        why = "is not served by this stream" if known else "is not in the inventory"
        self._warn_once(
            stream,
            key,
            "dropped telemetry for asset %s from %s: the asset %s (logged once per stream)",
            asset_id or "<none>",
            stream.describe(),
            why,
        )
        self.submit_event(
            Event(
                ts=utc_now(),
                kind="telemetry_dropped",
                message=f"telemetry for asset {asset_id} from agent {stream.agent_id} "
                f"dropped: the asset {why}",
                asset_id=asset_id or None,
                site_id=stream.site_id or None,
                data={"agent_id": stream.agent_id, "peer": stream.peer},
            )
        )

    @staticmethod
    def _warn_once(stream: AgentStream, key: str, message: str, *args: object) -> None:
        if key in stream.warned:
            log.debug(message, *args)
            return
        stream.warned.add(key)
        log.warning(message, *args)

    # ------------------------------------------------------------------ the writer

    @property
    def _claimed_batches(self) -> int:
        return sum(len(items) for items in self._claimed.values())

    async def _write_loop(self, index: int) -> None:
        """Writer ``index``: telemetry from the queue; writer 0 also events, heartbeats."""
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S, multiplier=2.0, jitter=0.0)
        failed = 0
        while True:
            while not (self._queue or (index == 0 and self._side_records_due())):
                self._work.clear()
                retry_at = self._side_retry_at
                if index == 0 and retry_at is not None:  # a sink's side records wait
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, retry_at - time.monotonic())):
                            await self._work.wait()
                else:
                    await self._work.wait()
            try:
                await self._write_once(index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._write_failures += 1
                failed += 1
                delay = backoff.delay(failed)
                if self._sink is not None:
                    delay = min(delay, self._sink.retry_max_s(exc))
                self._on_failure(exc, delay)
                await asyncio.sleep(delay)
            else:
                failed = 0
                self._on_success()

    async def _write_once(self, index: int = 0) -> None:
        """Store one group of queued work; on success acknowledge it. The batches are
        claimed from the queue (so another writer takes the next ones) and put back at
        its head when the write fails."""
        items: list[_Item] = []
        total = 0
        queue = self._queue
        while queue and (not items or total + len(queue[0].samples) <= WRITE_BATCH_SAMPLES):
            item = queue.popleft()
            items.append(item)
            total += len(item.samples)
        self._claimed[index] = items
        samples = [s for item in items for s in item.samples]
        self._write_started[index] = started = time.monotonic()
        try:
            if self._sink is not None:
                await self._sink.write(items)
            else:
                if samples:
                    await self._storage.append_telemetry(samples)
                for item in items:  # recorded before the acks that let the agent forget them
                    for first, last in item.gaps:
                        await self._storage.append_event(_gap_event(item.stream, first, last))
        except BaseException:
            queue.extendleft(reversed(items))
            raise
        finally:
            del self._claimed[index]
            self._write_seconds += time.monotonic() - started
            del self._write_started[index]
        self._writes += 1

        if samples and self._sink is None:  # a sink's samples are stored (and told) later
            self._plugins.notify("der_telemetry_received", samples=samples)
        self._queued_samples -= total
        self._samples_stored += total
        self._space.release(total)
        for item in items:
            stored_through = self._track(item)
            item.stream.send(TelemetryAck(seq=item.seq, stored_through=stored_through))
            self._batches_acked += 1
            log.debug(
                "batch %d from %s: %d samples stored, acknowledged through %d",
                item.seq,
                item.stream.describe(),
                len(item.samples),
                stored_through,
            )
        if index == 0:  # after the acks: a failure here must not hold telemetry back
            if self._sink is None:
                await self._write_side_records()
            elif self._side_records_due():
                await self._write_side_records_apart()

    def _side_records_due(self) -> bool:
        """Events or heartbeats wait and are not held back by a failed write's backoff."""
        if not (self._events or self._heartbeats):
            return False
        retry_at = self._side_retry_at
        return retry_at is None or time.monotonic() >= retry_at

    async def _write_side_records_apart(self) -> None:
        """Events and heartbeats when telemetry goes to a sink: they still go to storage,
        and a storage failure must neither slow the telemetry writers nor be taken for a
        sink failure. Retried with their own backoff; one log line when failing starts,
        one on recovery; ``/healthz`` says so meanwhile."""
        try:
            await self._write_side_records()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._side_failed += 1
            self._write_failures += 1
            delay = self._side_backoff.delay(self._side_failed)
            self._side_retry_at = time.monotonic() + delay
            if self._side_failure is None:
                log.error(
                    "storage %s: writing events and heartbeats failed: %s; %d event(s) held, "
                    "retrying (telemetry is not held back)",
                    self._storage.name,
                    text,
                    len(self._events),
                )
            self._side_failure = text
            return
        if self._side_failure is not None:
            log.warning("storage %s: events and heartbeats stored again", self._storage.name)
        self._side_failure = None
        self._side_failed = 0
        self._side_retry_at = None

    async def _write_side_records(self) -> None:
        """Events and heartbeats (writer 0 only)."""
        started = time.monotonic()
        self._write_started[-1] = started
        try:
            events = list(self._events)
            listener = self.event_listener
            for event_item in events:
                if listener is not None:
                    await listener(event_item.event)
                await self._storage.append_event(event_item.event)
                self._events.popleft()
                if event_item.ack is not None:
                    stream, event_id = event_item.ack
                    stream.send(EventAck(event_id=event_id))
            beats = dict(self._heartbeats)
            if beats:
                await self._store_heartbeats(list(beats.values()))
                for key, value in beats.items():
                    if self._heartbeats.get(key) is value:  # not replaced by a newer one
                        del self._heartbeats[key]
        finally:
            self._write_seconds += time.monotonic() - started
            del self._write_started[-1]

    def _track(self, item: _Item) -> int:
        stream = item.stream
        cursor = self._cursors[(stream.agent_id, stream.telemetry_stream)]
        for first, last in item.gaps:
            log.warning(
                "telemetry gap from %s: %d batch(es), seq %d..%d, never reached storage "
                "(the agent dropped them)",
                stream.describe(),
                last - first + 1,
                first,
                last,
            )
        return cursor.stored(item.seq, item.floor_seq, item.dropped, item.gaps)

    async def _store_heartbeats(self, beats: list[tuple[AgentStream, AgentHeartbeat]]) -> None:
        rows: list[Heartbeat] = []
        for stream, heartbeat in beats:
            # An agent without a clock or id still proves it is alive: use ours.
            agent_id = heartbeat.agent_id or stream.agent_id
            ts = heartbeat.ts if heartbeat.ts is not None else utc_now()
            rows.extend(
                Heartbeat(
                    asset_id=session.asset_id,
                    site_id=session.site_id,
                    agent_id=agent_id,
                    ts=ts,
                    uptime_s=heartbeat.uptime_s,
                )
                for session in stream.sessions.values()
            )
        if rows:
            await self._storage.append_heartbeats(rows)

    @property
    def _target(self) -> str:
        """What the writers write to, for logs."""
        return f"storage {self._storage.name}" if self._sink is None else self._sink.name

    def _on_failure(self, exc: Exception, delay: float) -> None:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        target = self._target
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "%s: writing telemetry failed: %s; %d batch(es) (%d samples) held "
                "unacknowledged, retrying (agents keep buffering)",
                target,
                text,
                len(self._queue),
                self._queued_samples,
            )
        elif text != self._failure:
            log.warning("%s: still failing: %s", target, text)
        else:
            log.debug("%s: write retry in %.2f s failed: %s", target, delay, text)
        self._failure = text
        self._failure_reason = (
            f"storage writes failing: {text}"
            if self._sink is None
            else self._sink.failure_reason(exc)
        )

    def _on_success(self) -> None:
        if self._failing_since is None:
            return
        down = time.monotonic() - self._failing_since
        log.warning(
            "%s: writes recovered after %.1f s; %d batch(es) still queued",
            self._target,
            down,
            len(self._queue),
        )
        self._failing_since = None
        self._failure = None
        self._failure_reason = None


def _gap_event(stream: AgentStream, first: int, last: int) -> Event:
    count = last - first + 1
    return Event(
        ts=utc_now(),
        kind="telemetry_gap",
        message=f"agent {stream.agent_id}: telemetry batches {first}..{last} ({count}) never "
        f"reached storage; the agent dropped them by its buffer bounds",
        site_id=stream.site_id or None,
        data={
            "agent_id": stream.agent_id,
            "stream_id": stream.telemetry_stream,
            "first_seq": first,
            "last_seq": last,
            "batches": count,
        },
    )
