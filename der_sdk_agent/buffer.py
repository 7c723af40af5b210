"""The agent's durable store-and-forward buffer: one SQLite file per agent.

What it holds, each in its own table:

* ``meta`` — the buffer's ``stream_id`` (a UUID made with the file), the next telemetry
  ``seq``, the drop counters and the schema version;
* ``telemetry`` — one row per sampler batch, keyed by its ``seq`` (the batch's serialized
  protobuf ``TelemetryBatch``, its sample count, size and creation time). ``seq`` increases
  by one per batch for the life of the file, across agent restarts;
* ``dropped`` — the seq ranges the bounds dropped without an acknowledgement, until the
  headend confirms them (see *Drops* below);
* ``outcomes`` — the dispatch journal: one row per headend command id, ``acked`` when
  received and then its final outcome, reported until the headend acknowledges it;
* ``events`` — :class:`~der_sdk.wire.codec.AgentEventRecord` not yet acknowledged;
* ``local_reports`` — reports of local commands (``LocalDispatch``) not yet acknowledged;
* ``in_force`` — per asset, where its setpoint in force came from (``headend``, ``local``,
  ``fallback`` or ``default``), for the link-loss fallback after a restart.

**Durability.** The file is in WAL mode. With ``sync="normal"`` (the default) a committed
row survives the agent process being killed (``kill -9``, a crash) but the last commits
may be lost on power loss or an OS crash; ``sync="full"`` makes every commit survive those
too, at the cost of an fsync per commit. ``path=":memory:"`` keeps everything in memory
(not durable; for tests). While the buffer is open its process holds an advisory lock
(``flock``) on ``<path>.lock``: a second agent pointed at the same file fails at start
instead of sharing sequence numbers. Other readers (an operator's ``sqlite3`` shell) may
read the file meanwhile; a killed agent's lock goes with its process.

**Bounds.** The telemetry table holds at most ``max_bytes`` of payload and nothing older
than ``max_age_s``; past either bound the **oldest** batches are dropped when a batch is
added (and by :meth:`Buffer.maintain`). Drops are counted in ``meta``, logged at WARNING
at most once a minute and recorded as one coalesced ``telemetry_dropped`` event per
minute. The journal, events, local reports and in-force table are never dropped by the
bounds; journal rows are pruned once older than :data:`JOURNAL_KEEP_S` *and* beyond the
newest :data:`JOURNAL_KEEP_ROWS`.

**Drops are the agent's to tell.** A held batch leaves the buffer for one of two reasons:
the headend acknowledged it, or the bounds dropped it. Only the agent knows which, so the
seqs it dropped are kept as exact ranges in the ``dropped`` table, committed in the same
transaction as the drop, and every batch sent lists them (:meth:`Buffer.drop_report`) until
a ``TelemetryAck`` with ``stored_through`` at or past them says the headend recorded them
(as stored, or as a gap). Every other seq below the floor was acknowledged. The headend
therefore never has to guess a gap from the floor: not after its own restart (when it no
longer remembers what it acknowledged), not after the agent's (the ranges are in the file).
A buffer written by an older agent starts with no ranges; its drops were reported by its
own ``telemetry_dropped`` events.

**Threading.** SQLite runs on one dedicated thread (a one-worker executor): every
operation is a whole transaction in one hop, so transactions never interleave and the
event loop never blocks on the disk. An in-memory index of the held batches (seq, size,
age), the unreported outcome ids and the counts of events and local reports live on the
loop and mirror the tables, so the link can ask what is held without touching the disk;
events and local reports themselves are read from the file a page at a time.

Every async method opens the buffer on first use; :meth:`Buffer.close` flushes and closes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import math
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import msgspec

from der_sdk.errors import DerSdkError
from der_sdk.models import TelemetrySample
from der_sdk.wire import codec
from der_sdk.wire.codec import (
    AgentEventRecord,
    Allocation,
    BufferStats,
    LocalDispatchReport,
    SeqRange,
)

__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_BYTES",
    "DROPPED_RANGES_PER_BATCH",
    "FINAL_STATUSES",
    "JOURNAL_KEEP_ROWS",
    "JOURNAL_KEEP_S",
    "MEMORY",
    "RESTARTED_REASON",
    "Buffer",
    "JournalEntry",
    "SyncMode",
]

log = logging.getLogger("der.agent.buffer")

T = TypeVar("T")

MEMORY = ":memory:"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
JOURNAL_KEEP_S = 7 * 24 * 3600.0
JOURNAL_KEEP_ROWS = 10_000
DROP_REPORT_EVERY_S = 60.0
"""At most one drop WARNING and one ``telemetry_dropped`` event per this many seconds."""
ACK_FLUSH_S = 0.05
"""Acknowledged batches are deleted in one transaction at most this often."""
JOURNAL_PRUNE_EVERY_S = 3600.0
SCHEMA_VERSION = 1
DROPPED_RANGES_PER_BATCH = 64
"""At most this many dropped ranges ride on one batch; see :meth:`Buffer.drop_report`."""
FINAL_STATUSES = frozenset({"applied", "rejected", "failed", "expired"})
RESTARTED_REASON = "agent restarted before the outcome was known; not applied again"

SyncMode = Literal["normal", "full"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS telemetry (
    seq INTEGER PRIMARY KEY,
    created_us INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outcomes (
    command_id TEXT PRIMARY KEY,
    received_us INTEGER NOT NULL,
    asset_id TEXT,
    site_id TEXT,
    mw REAL NOT NULL,
    duration_s REAL,
    status TEXT NOT NULL,
    final_us INTEGER,
    reason TEXT,
    allocations BLOB NOT NULL DEFAULT '[]',
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outcomes_received ON outcomes (received_us);
CREATE TABLE IF NOT EXISTS events (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    created_us INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS local_reports (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL UNIQUE,
    created_us INTEGER NOT NULL,
    report BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS in_force (
    asset_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    command_id TEXT,
    ts_us INTEGER NOT NULL
);
"""

_allocations_decode = msgspec.json.Decoder(tuple[Allocation, ...]).decode
_event_decode = msgspec.json.Decoder(AgentEventRecord).decode
_report_decode = msgspec.json.Decoder(LocalDispatchReport).decode
_json_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """One headend command in the dispatch journal.

    ``status`` is ``acked`` (received, not yet finished) or a final status in
    :data:`FINAL_STATUSES`. ``ts`` is when it reached that status. ``reported``: the headend
    acknowledged the final outcome (``SetpointOutcomeAck``).
    """

    command_id: str
    status: str
    ts: datetime
    received: datetime
    reason: str | None = None
    allocations: tuple[Allocation, ...] = ()
    reported: bool = False
    asset_id: str | None = None
    site_id: str | None = None
    mw: float = 0.0
    duration_s: float | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(slots=True)
class _Held:
    created: float  # wall clock, seconds since the epoch
    samples: int
    bytes: int


@dataclass
class _Loaded:
    """Everything :meth:`Buffer.open` reads from the file, in one transaction."""

    stream_id: str
    next_seq: int
    dropped_samples: int
    dropped_batches: int
    held: list[tuple[int, float, int, int]]
    events: tuple[int, int]  # how many, the highest n
    reports: tuple[int, int]
    unreported: list[str]
    in_force: dict[str, str]
    recovered: list[str]  # command ids found in progress, now failed
    dropped: list[SeqRange]


@dataclass
class _Drops:
    """Drops not reported yet (the warning and event are at most once a minute)."""

    first_seq: int = 0
    last_seq: int = 0
    batches: int = 0
    samples: int = 0
    reasons: set[str] = field(default_factory=set)


def _runs(seqs: Sequence[int]) -> list[SeqRange]:
    """Increasing ``seqs`` as ranges of consecutive seqs."""
    runs: list[SeqRange] = []
    for seq in seqs:
        if runs and runs[-1][1] + 1 == seq:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _ranges_above(ranges: Sequence[SeqRange], through: int) -> list[SeqRange]:
    """``ranges`` without the seqs up to ``through``."""
    return [(max(first, through + 1), last) for first, last in ranges if last > through]


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _dt(us: int) -> datetime:
    return codec.datetime_from_us(us)


class Buffer:
    """The store-and-forward buffer of one agent (see the module docstring).

    :param path: the SQLite file (its folder is created), or ``":memory:"``.
    :param max_bytes: bound on the telemetry payload held; the oldest batches go first.
    :param max_age_s: telemetry batches older than this are dropped.
    :param sync: ``normal`` survives a killed process; ``full`` also survives power loss.
    :param clock: wall clock in seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        path: str = MEMORY,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        sync: SyncMode = "normal",
        clock: Callable[[], float] = time.time,
        drop_report_every_s: float = DROP_REPORT_EVERY_S,
        ack_flush_s: float = ACK_FLUSH_S,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if not (math.isfinite(max_age_s) and max_age_s > 0):
            raise ValueError(f"max_age_s must be a positive number of seconds, got {max_age_s}")
        if sync not in ("normal", "full"):
            raise ValueError(f"sync must be 'normal' or 'full', got {sync!r}")
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.sync: SyncMode = sync
        self._clock = clock
        self._drop_report_every_s = drop_report_every_s
        self._ack_flush_s = ack_flush_s

        self.stream_id = ""
        self._next_seq = 1
        self._index: collections.OrderedDict[int, _Held] = collections.OrderedDict()
        self._dropped: list[SeqRange] = []  # dropped, not yet confirmed; increasing
        self._samples = 0
        self._bytes = 0
        self.dropped_samples = 0
        self.dropped_batches = 0
        self._event_count = 0
        self._last_event_n = 0
        self._report_count = 0
        self._last_report_n = 0
        self._unreported: set[str] = set()
        self._in_force: dict[str, str] = {}
        self._listeners: list[Callable[[], None]] = []

        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on the executor's thread only
        self._lock_file: Any = None  # the open <path>.lock while the buffer is open
        self._open_lock = asyncio.Lock()
        self._append_lock = asyncio.Lock()
        self._opened = False
        self._closed = False

        self._pending_acks: set[int] = set()
        self._pending_through = 0
        self._flusher: asyncio.Task[None] | None = None

        self._drops = _Drops()
        self._last_drop_report: float | None = None  # monotonic
        self._last_prune = -math.inf

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_open(self) -> bool:
        return self._opened and not self._closed

    @property
    def durable(self) -> bool:
        """``False`` for an in-memory buffer."""
        return self.path != MEMORY

    async def open(self) -> None:
        """Open (or create) the file, recover, and load the index. Idempotent.

        A journal row still ``acked`` (the agent died while applying it) becomes
        ``failed`` with :data:`RESTARTED_REASON`: it is never applied again.

        :raises DerSdkError: the file is locked by another process, is not a buffer, or
            cannot be created; the message names the path.
        """
        if self._opened:
            if self._closed:
                raise DerSdkError(f"telemetry buffer {self.path} is closed")
            return
        async with self._open_lock:
            if self._opened:
                return
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="der-agent-buffer"
            )
            try:
                loaded = await self._run(self._open_sync, _us(self._clock()))
            except BaseException:
                self._executor.submit(self._close_sync)
                self._executor.shutdown(wait=False)
                self._executor = None
                raise
            self.stream_id = loaded.stream_id
            self._next_seq = loaded.next_seq
            self.dropped_samples = loaded.dropped_samples
            self.dropped_batches = loaded.dropped_batches
            for seq, created, samples, size in loaded.held:
                self._index[seq] = _Held(created, samples, size)
                self._samples += samples
                self._bytes += size
            self._event_count, self._last_event_n = loaded.events
            self._report_count, self._last_report_n = loaded.reports
            self._unreported.update(loaded.unreported)
            self._in_force.update(loaded.in_force)
            self._dropped = loaded.dropped
            self._opened = True
        for command_id in loaded.recovered:
            log.warning(
                "command %s was being applied when the agent stopped; recorded as failed "
                "and not applied again",
                command_id,
            )
        log.info(
            "telemetry buffer %s (stream %s, sync %s): %d batch(es), %d sample(s) held, "
            "next seq %d",
            self.path,
            self.stream_id,
            self.sync,
            len(self._index),
            self._samples,
            self._next_seq,
        )
        await self.maintain()

    async def close(self) -> None:
        """Delete acknowledged batches still pending, close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._executor is None:
            return
        try:
            await self._flush_acks()
        except Exception:
            log.exception("telemetry buffer %s: deleting acknowledged batches failed", self.path)
        executor, self._executor = self._executor, None
        await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        executor.shutdown(wait=False)

    async def _ready(self) -> None:
        if not self._opened or self._closed:
            await self.open()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise DerSdkError(f"telemetry buffer {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously) after a batch, event or local report is added."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    # ------------------------------------------------------------------ telemetry

    @property
    def next_seq(self) -> int:
        """The seq the next batch will get."""
        return self._next_seq

    @property
    def floor_seq(self) -> int:
        """The lowest seq held, or the next seq when nothing is held."""
        return next(iter(self._index), self._next_seq)

    @property
    def dropped_ranges(self) -> list[SeqRange]:
        """The seq ranges dropped by the bounds and not yet confirmed by the headend."""
        return list(self._dropped)

    def drop_report(self, limit: int = DROPPED_RANGES_PER_BATCH) -> tuple[int, list[SeqRange]]:
        """What the next batch tells the headend: a floor and the dropped ranges below it.

        Every seq below the floor that is not in the ranges was acknowledged. With more
        than ``limit`` unconfirmed ranges the floor is lowered to the first range left
        out, which keeps that true; the rest follow once the first ones are confirmed.
        """
        if len(self._dropped) > limit:
            return self._dropped[limit][0], self._dropped[:limit]
        return self.floor_seq, list(self._dropped)

    def __contains__(self, seq: object) -> bool:
        return seq in self._index

    def __len__(self) -> int:
        """Telemetry batches held."""
        return len(self._index)

    @property
    def samples(self) -> int:
        """Samples held over all batches."""
        return self._samples

    def seqs(self) -> list[int]:
        """Every held seq, oldest first."""
        return list(self._index)

    def batch_samples(self, seq: int) -> int:
        """Samples in held batch ``seq`` (0 when it is not held)."""
        held = self._index.get(seq)
        return held.samples if held is not None else 0

    def live_count(self, since_seq: int) -> int:
        """How many held batches have ``seq >= since_seq``."""
        count = 0
        for seq in reversed(self._index):
            if seq < since_seq:
                break
            count += 1
        return count

    async def append(self, samples: Sequence[TelemetrySample]) -> int:
        """Commit one batch with the next seq; drop the oldest beyond the bounds.

        :return: the batch's seq (0 for an empty batch, which is not stored).
        """
        if not samples:
            return 0
        await self._ready()
        payload = codec.telemetry_payload(samples)
        async with self._append_lock:
            now = self._clock()
            seq = self._next_seq
            drops, reasons = self._plan_drops(len(payload), now)
            dropped = [(s, self._index[s]) for s in drops]
            report = self._note_drops(dropped, reasons)
            event_n = await self._run(
                self._append_sync,
                seq,
                _us(now),
                len(samples),
                payload,
                drops,
                self.dropped_samples + sum(h.samples for _, h in dropped),
                self.dropped_batches + len(dropped),
                report,
            )
            self._next_seq = seq + 1
            self._forget_dropped(dropped)
            self._index[seq] = _Held(now, len(samples), len(payload))
            self._samples += len(samples)
            self._bytes += len(payload)
            self._event_added(event_n)
        self._notify()
        return seq

    async def read(self, seq: int) -> bytes | None:
        """The stored payload of batch ``seq`` (``None`` when it is no longer held)."""
        if seq not in self._index:
            return None
        await self._ready()
        return await self._run(self._read_sync, seq)

    async def batch(self, seq: int) -> list[TelemetrySample]:
        """The samples of batch ``seq`` (empty when it is no longer held)."""
        payload = await self.read(seq)
        if payload is None:
            return []
        message = codec.agent_telemetry_payload(seq, payload)
        return codec.samples_from_batch(message.telemetry)

    def ack_telemetry(self, seq: int, stored_through: int = 0) -> int:
        """Forget batch ``seq`` and every batch ``<= stored_through`` (a ``TelemetryAck``),
        and the dropped ranges up to ``stored_through`` (the headend recorded them).

        The index changes at once; the rows are deleted in one transaction a moment later
        (:data:`ACK_FLUSH_S`). Returns how many held batches were forgotten.
        """
        forgotten = 0
        while self._index:
            first = next(iter(self._index))
            if first > stored_through:
                break
            self._forget(first)
            forgotten += 1
        if seq in self._index:
            self._forget(seq)
            forgotten += 1
            self._pending_acks.add(seq)
        if self._dropped and stored_through >= self._dropped[0][0]:
            self._dropped = _ranges_above(self._dropped, stored_through)
        if stored_through > self._pending_through:
            self._pending_through = stored_through
        pending = self._pending_acks or self._pending_through
        if pending and self._flusher is None and self._executor is not None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_later(), name="der-agent-buffer-acks"
            )
        return forgotten

    def _forget(self, seq: int) -> None:
        held = self._index.pop(seq)
        self._samples -= held.samples
        self._bytes -= held.bytes

    async def _flush_later(self) -> None:
        try:
            while self._pending_acks or self._pending_through:
                await asyncio.sleep(self._ack_flush_s)
                await self._flush_acks()
        except Exception:  # the rows stay; they are deleted with the next acknowledgement
            log.exception("telemetry buffer %s: deleting acknowledged batches failed", self.path)
        finally:
            self._flusher = None

    async def _flush_acks(self) -> None:
        # Forget the pending deletes only once they are done: a flush cancelled by
        # close() is simply done again (deleting twice is harmless).
        seqs, through = sorted(self._pending_acks), self._pending_through
        if seqs or through:
            await self._run(self._delete_acked_sync, seqs, through)
            self._pending_acks.difference_update(seqs)
            if self._pending_through == through:
                self._pending_through = 0

    def stats(self, replay_from_seq: int | None = None) -> BufferStats:
        """The buffer's figures. ``replay_batches`` counts held batches with a seq below
        ``replay_from_seq`` (the current stream's first live seq; ``None``: no stream)."""
        oldest = next(iter(self._index.values()), None)
        replay = 0
        if replay_from_seq is not None:
            replay = len(self._index) - self.live_count(replay_from_seq)
        return BufferStats(
            batches=len(self._index),
            samples=self._samples,
            bytes=self._bytes,
            oldest_age_s=max(0.0, self._clock() - oldest.created) if oldest else 0.0,
            dropped_samples=self.dropped_samples,
            dropped_batches=self.dropped_batches,
            replay_batches=replay,
        )

    def _plan_drops(self, incoming_bytes: int, now: float) -> tuple[list[int], set[str]]:
        """The oldest held seqs to drop so that ``incoming_bytes`` fits and nothing is too
        old. The incoming batch itself is always kept."""
        total = self._bytes + incoming_bytes
        cutoff = now - self.max_age_s
        drops: list[int] = []
        reasons: set[str] = set()
        for seq, held in self._index.items():
            if total > self.max_bytes:
                reasons.add("size")
            elif held.created < cutoff:
                reasons.add("age")
            else:
                break
            drops.append(seq)
            total -= held.bytes
        return drops, reasons

    def _forget_dropped(self, dropped: Sequence[tuple[int, _Held]]) -> None:
        for seq, held in dropped:
            if self._index.pop(seq, None) is not None:
                self._samples -= held.samples
                self._bytes -= held.bytes
            self.dropped_samples += held.samples
            self.dropped_batches += 1
        ranges = self._dropped
        for first, last in _runs([seq for seq, _ in dropped]):
            if ranges and ranges[-1][1] + 1 == first:
                ranges[-1] = (ranges[-1][0], last)
            else:
                ranges.append((first, last))

    def _note_drops(
        self, dropped: Sequence[tuple[int, _Held]], reasons: set[str], *, force: bool = False
    ) -> AgentEventRecord | None:
        """Add ``dropped`` to the unreported drops; when a report is due, log the warning
        and return the ``telemetry_dropped`` event to commit with the drop."""
        pending = self._drops
        if dropped:
            if not pending.batches:
                pending.first_seq = dropped[0][0]
            pending.last_seq = dropped[-1][0]
            pending.batches += len(dropped)
            pending.samples += sum(h.samples for _, h in dropped)
            pending.reasons |= reasons
        if not pending.batches:
            return None
        now = time.monotonic()
        last = self._last_drop_report
        if not force and last is not None and now - last < self._drop_report_every_s:
            return None
        self._last_drop_report = now
        self._drops = _Drops()
        total_samples = self.dropped_samples + (
            sum(h.samples for _, h in dropped) if dropped else 0
        )
        total_batches = self.dropped_batches + len(dropped)
        why = " and ".join(
            {"size": f"over {self.max_bytes} bytes", "age": f"older than {self.max_age_s:g} s"}[r]
            for r in sorted(pending.reasons, reverse=True)
        )
        message = (
            f"telemetry buffer full: dropped the {pending.batches} oldest batch(es), "
            f"{pending.samples} sample(s), seq {pending.first_seq}..{pending.last_seq} ({why}); "
            f"{total_samples} sample(s) dropped since the buffer was created"
        )
        log.warning("%s; the headend has not acknowledged them", message)
        return AgentEventRecord(
            event_id=str(uuid.uuid4()),
            ts=datetime.fromtimestamp(self._clock(), UTC),
            kind="telemetry_dropped",
            message=message,
            data={
                "first_seq": pending.first_seq,
                "last_seq": pending.last_seq,
                "batches": pending.batches,
                "samples": pending.samples,
                "reasons": sorted(pending.reasons),
                "dropped_samples_total": total_samples,
                "dropped_batches_total": total_batches,
                "stream_id": self.stream_id,
            },
        )

    async def maintain(self) -> None:
        """Periodic upkeep (the agent calls it every minute): drop batches past
        ``max_age_s``, report drops not reported yet, prune the journal."""
        await self._ready()
        async with self._append_lock:
            drops, reasons = self._plan_drops(0, self._clock())
            dropped = [(s, self._index[s]) for s in drops]
            report = self._note_drops(dropped, reasons)
            if dropped or report is not None:
                event_n = await self._run(
                    self._drop_sync,
                    drops,
                    self.dropped_samples + sum(h.samples for _, h in dropped),
                    self.dropped_batches + len(dropped),
                    report,
                )
                self._forget_dropped(dropped)
                if event_n is not None:
                    self._event_added(event_n)
                    self._notify()
        now = time.monotonic()
        if now - self._last_prune >= JOURNAL_PRUNE_EVERY_S:
            self._last_prune = now
            pruned = await self._run(
                self._prune_sync, _us(self._clock() - JOURNAL_KEEP_S), JOURNAL_KEEP_ROWS
            )
            for command_id in pruned:
                self._unreported.discard(command_id)
            if pruned:
                log.info("dispatch journal: pruned %d command(s) older than 7 days", len(pruned))

    # ------------------------------------------------------------------ dispatch journal

    @property
    def unreported_outcomes(self) -> int:
        """Final outcomes the headend has not acknowledged yet."""
        return len(self._unreported)

    async def journal_receive(
        self,
        command_id: str,
        *,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None,
    ) -> tuple[JournalEntry, bool]:
        """Record a headend command as ``acked`` and commit, unless it is known.

        :return: the command's journal entry, and whether it is new (now recorded as
            ``acked``: go ahead and apply it). Not new: do **not** apply it again.
        """
        await self._ready()
        now = self._clock()
        return await self._run(
            self._receive_sync, command_id, _us(now), asset_id, site_id, mw, duration_s
        )

    async def journal_finish(
        self,
        command_id: str,
        status: str,
        allocations: Sequence[Allocation] = (),
        reason: str | None = None,
    ) -> JournalEntry:
        """Record a command's final outcome (unreported until :meth:`journal_reported`)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final status")
        await self._ready()
        entry = await self._run(
            self._finish_sync,
            command_id,
            status,
            _us(self._clock()),
            _json_encode(tuple(allocations)),
            reason,
        )
        self._unreported.add(command_id)
        return entry

    async def journal_get(self, command_id: str) -> JournalEntry | None:
        await self._ready()
        return await self._run(self._get_sync, command_id)

    async def journal_reported(self, command_id: str) -> None:
        """The headend recorded the final outcome (``SetpointOutcomeAck``)."""
        await self._ready()
        if await self._run(self._reported_sync, command_id):
            self._unreported.discard(command_id)

    async def journal_unreported(self) -> list[JournalEntry]:
        """Final outcomes not acknowledged yet, oldest first."""
        await self._ready()
        return await self._run(self._unreported_sync)

    # ------------------------------------------------------------------ events

    PAGE = 100
    """Events or local reports read from the file at once."""

    @property
    def event_count(self) -> int:
        """Events not acknowledged yet."""
        return self._event_count

    @property
    def last_event_n(self) -> int:
        """The position of the newest event (positions only grow; see :meth:`events_after`)."""
        return self._last_event_n

    def _event_added(self, n: int | None) -> None:
        if n is not None:
            self._event_count += 1
            self._last_event_n = max(self._last_event_n, n)

    async def add_event(
        self,
        kind: str,
        message: str,
        *,
        asset_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> AgentEventRecord:
        """Commit an event for the headend's record; it is kept until acknowledged."""
        await self._ready()
        event = AgentEventRecord(
            event_id=str(uuid.uuid4()),
            ts=datetime.fromtimestamp(self._clock(), UTC),
            kind=kind,
            message=message,
            asset_id=asset_id,
            data=dict(data or {}),
        )
        self._event_added(await self._run(self._insert_event_sync, event))
        self._notify()
        return event

    async def events_after(
        self, n: int = 0, limit: int = PAGE
    ) -> list[tuple[int, AgentEventRecord]]:
        """Up to ``limit`` unacknowledged events after position ``n``, oldest first, each
        with its position."""
        await self._ready()
        rows = await self._run(self._page_sync, "events", "record", n, limit)
        return [(position, _event_decode(blob)) for position, blob in rows]

    async def events(self) -> list[AgentEventRecord]:
        """Every unacknowledged event, oldest first."""
        return [e for _, e in await self.events_after(0, max(self._event_count, 1))]

    async def ack_event(self, event_id: str) -> None:
        """The headend recorded the event (``EventAck``)."""
        await self._ready()
        self._event_count -= await self._run(self._delete_sync, "events", "event_id", event_id)

    # ------------------------------------------------------------------ local reports

    @property
    def local_report_count(self) -> int:
        """Reports of local commands not acknowledged yet."""
        return self._report_count

    @property
    def last_local_report_n(self) -> int:
        return self._last_report_n

    async def add_local_report(self, report: LocalDispatchReport) -> None:
        """Commit a local command's report; it is kept until acknowledged."""
        await self._ready()
        n = await self._run(self._insert_report_sync, report, _us(self._clock()))
        self._report_count += 1
        self._last_report_n = max(self._last_report_n, n)
        self._notify()

    async def local_reports_after(
        self, n: int = 0, limit: int = PAGE
    ) -> list[tuple[int, LocalDispatchReport]]:
        """Up to ``limit`` unacknowledged local reports after position ``n``, oldest first."""
        await self._ready()
        rows = await self._run(self._page_sync, "local_reports", "report", n, limit)
        return [(position, _report_decode(blob)) for position, blob in rows]

    async def local_reports(self) -> list[LocalDispatchReport]:
        """Every unacknowledged local report, oldest first."""
        return [r for _, r in await self.local_reports_after(0, max(self._report_count, 1))]

    async def ack_local_report(self, command_id: str) -> None:
        """The headend recorded the local command (``LocalDispatchAck``)."""
        await self._ready()
        self._report_count -= await self._run(
            self._delete_sync, "local_reports", "command_id", command_id
        )

    # ------------------------------------------------------------------ setpoints in force

    @property
    def in_force(self) -> Mapping[str, str]:
        """Per asset id, where its setpoint in force came from: ``headend``, ``local``,
        ``fallback`` or ``default`` (absent: not commanded since the file was created)."""
        return dict(self._in_force)

    async def set_in_force(self, asset_id: str, source: str, command_id: str | None) -> None:
        await self._ready()
        await self._run(self._in_force_sync, asset_id, source, command_id, _us(self._clock()))
        self._in_force[asset_id] = source

    # ------------------------------------------------------------------ on the thread

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DerSdkError(f"telemetry buffer {self.path} is closed")
        return self._conn

    def _tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _open_sync(self, now_us: int) -> _Loaded:
        path = self.path
        try:
            if path != MEMORY:
                folder = os.path.dirname(os.path.abspath(path))
                os.makedirs(folder, exist_ok=True)
                self._lock_exclusively(path + ".lock")
            conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            self._close_sync()
            raise DerSdkError(
                f"cannot open the telemetry buffer {path}: {exc}; check the path and its "
                f"folder's permissions (agent config buffer.path, AGENT_BUFFER_PATH)"
            ) from None
        self._conn = conn
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
            return self._tx(lambda c: self._load(c, now_us))
        except sqlite3.OperationalError as exc:
            self._close_sync()
            raise DerSdkError(f"telemetry buffer {path} cannot be used: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self._close_sync()
            raise DerSdkError(
                f"telemetry buffer {path} is not an agent buffer ({exc}); move the file "
                f"away to start a new buffer"
            ) from None
        except BaseException:
            self._close_sync()
            raise

    def _lock_exclusively(self, lock_path: str) -> None:
        """Hold an advisory lock for as long as the buffer is open: two agents must never
        share a buffer. The OS drops it with the process, however that ends."""
        if sys.platform == "win32":  # no flock; one agent per file is up to the operator
            return
        import fcntl

        handle = open(lock_path, "a")  # noqa: SIM115 - held open, locked, until _close_sync
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DerSdkError(
                f"telemetry buffer {self.path} is in use by another process (another agent "
                f"with the same buffer path?); give each agent its own buffer file"
            ) from None
        except BaseException:
            handle.close()
            raise
        self._lock_file = handle

    def _load(self, conn: sqlite3.Connection, now_us: int) -> _Loaded:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        version = int(meta.get("schema_version", SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise DerSdkError(
                f"telemetry buffer {self.path} has schema version {version}, newer than this "
                f"agent's ({SCHEMA_VERSION}); upgrade the agent or move the file away"
            )
        if "stream_id" not in meta:
            meta = {
                "schema_version": SCHEMA_VERSION,
                "stream_id": str(uuid.uuid4()),
                "next_seq": 1,
                "dropped_samples": 0,
                "dropped_batches": 0,
                "created_us": now_us,
            }
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        recovered = [
            row[0] for row in conn.execute("SELECT command_id FROM outcomes WHERE status = 'acked'")
        ]
        conn.execute(
            "UPDATE outcomes SET status = 'failed', reason = ?, final_us = ?, reported = 0 "
            "WHERE status = 'acked'",
            (RESTARTED_REASON, now_us),
        )
        held = [
            (seq, created_us / 1_000_000, samples, size)
            for seq, created_us, samples, size in conn.execute(
                "SELECT seq, created_us, samples, bytes FROM telemetry ORDER BY seq"
            )
        ]
        next_seq = max(int(meta["next_seq"]), held[-1][0] + 1 if held else 1)
        return _Loaded(
            stream_id=str(meta["stream_id"]),
            next_seq=next_seq,
            dropped_samples=int(meta["dropped_samples"]),
            dropped_batches=int(meta["dropped_batches"]),
            held=held,
            events=conn.execute("SELECT count(*), coalesce(max(n), 0) FROM events").fetchone(),
            reports=conn.execute(
                "SELECT count(*), coalesce(max(n), 0) FROM local_reports"
            ).fetchone(),
            unreported=[
                row[0]
                for row in conn.execute(
                    "SELECT command_id FROM outcomes WHERE status != 'acked' AND reported = 0"
                )
            ],
            in_force=dict(conn.execute("SELECT asset_id, source FROM in_force").fetchall()),
            recovered=recovered,
            dropped=[
                (int(first), int(last))
                for first, last in conn.execute(
                    "SELECT first_seq, last_seq FROM dropped ORDER BY first_seq"
                )
            ],
        )

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            lock.close()  # releases the flock

    def _append_sync(
        self,
        seq: int,
        created_us: int,
        samples: int,
        payload: bytes,
        drops: list[int],
        dropped_samples: int,
        dropped_batches: int,
        report: AgentEventRecord | None,
    ) -> int | None:
        def work(conn: sqlite3.Connection) -> int | None:
            conn.execute(
                "INSERT INTO telemetry (seq, created_us, samples, bytes, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                (seq, created_us, samples, len(payload), payload),
            )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
            return self._record_drops(conn, drops, dropped_samples, dropped_batches, report)

        return self._tx(work)

    def _drop_sync(
        self,
        drops: list[int],
        dropped_samples: int,
        dropped_batches: int,
        report: AgentEventRecord | None,
    ) -> int | None:
        return self._tx(
            lambda conn: self._record_drops(conn, drops, dropped_samples, dropped_batches, report)
        )

    def _record_drops(
        self,
        conn: sqlite3.Connection,
        drops: list[int],
        dropped_samples: int,
        dropped_batches: int,
        report: AgentEventRecord | None,
    ) -> int | None:
        """Delete ``drops``, note them in ``dropped`` (extending the range they continue),
        store the counters and the event; returns the event's position."""
        if drops:
            conn.execute("DELETE FROM telemetry WHERE seq <= ?", (drops[-1],))
            for first, last in _runs(drops):
                extended = conn.execute(
                    "UPDATE dropped SET last_seq = ? WHERE last_seq = ?", (last, first - 1)
                )
                if not extended.rowcount:
                    conn.execute(
                        "INSERT INTO dropped (first_seq, last_seq) VALUES (?, ?)", (first, last)
                    )
            conn.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [(dropped_samples, "dropped_samples"), (dropped_batches, "dropped_batches")],
            )
        return self._insert_event(conn, report) if report is not None else None

    def _read_sync(self, seq: int) -> bytes | None:
        row = self._db().execute("SELECT payload FROM telemetry WHERE seq = ?", (seq,)).fetchone()
        return bytes(row[0]) if row else None

    def _delete_acked_sync(self, seqs: list[int], through: int) -> None:
        def work(conn: sqlite3.Connection) -> None:
            if through:
                conn.execute("DELETE FROM telemetry WHERE seq <= ?", (through,))
                conn.execute("DELETE FROM dropped WHERE last_seq <= ?", (through,))
                conn.execute(
                    "UPDATE dropped SET first_seq = ? WHERE first_seq <= ?",
                    (through + 1, through),
                )
            conn.executemany("DELETE FROM telemetry WHERE seq = ?", [(s,) for s in seqs])

        self._tx(work)

    def _receive_sync(
        self,
        command_id: str,
        now_us: int,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None,
    ) -> tuple[JournalEntry, bool]:
        def work(conn: sqlite3.Connection) -> tuple[JournalEntry, bool]:
            existing = self._get(conn, command_id)
            if existing is not None:
                return existing, False
            conn.execute(
                "INSERT INTO outcomes (command_id, received_us, asset_id, site_id, mw, "
                "duration_s, status) VALUES (?, ?, ?, ?, ?, ?, 'acked')",
                (command_id, now_us, asset_id, site_id, mw, duration_s),
            )
            return JournalEntry(
                command_id=command_id,
                status="acked",
                ts=_dt(now_us),
                received=_dt(now_us),
                asset_id=asset_id,
                site_id=site_id,
                mw=mw,
                duration_s=duration_s,
            ), True

        return self._tx(work)

    def _finish_sync(
        self, command_id: str, status: str, now_us: int, allocations: bytes, reason: str | None
    ) -> JournalEntry:
        def work(conn: sqlite3.Connection) -> JournalEntry:
            conn.execute(
                "UPDATE outcomes SET status = ?, final_us = ?, allocations = ?, reason = ?, "
                "reported = 0 WHERE command_id = ?",
                (status, now_us, allocations, reason, command_id),
            )
            entry = self._get(conn, command_id)
            if entry is None:
                raise KeyError(f"command {command_id} is not in the dispatch journal")
            return entry

        return self._tx(work)

    _COLUMNS = (
        "command_id, status, received_us, final_us, reason, allocations, reported, "
        "asset_id, site_id, mw, duration_s"
    )

    def _get(self, conn: sqlite3.Connection, command_id: str) -> JournalEntry | None:
        row = conn.execute(
            f"SELECT {self._COLUMNS} FROM outcomes WHERE command_id = ?", (command_id,)
        ).fetchone()
        return _entry(row) if row else None

    def _get_sync(self, command_id: str) -> JournalEntry | None:
        return self._get(self._db(), command_id)

    def _reported_sync(self, command_id: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE outcomes SET reported = 1 WHERE command_id = ? AND status != 'acked'",
                (command_id,),
            )
            return cursor.rowcount > 0

        return self._tx(work)

    def _unreported_sync(self) -> list[JournalEntry]:
        rows = self._db().execute(
            f"SELECT {self._COLUMNS} FROM outcomes WHERE status != 'acked' AND reported = 0 "
            "ORDER BY final_us, received_us"
        )
        return [_entry(row) for row in rows]

    def _prune_sync(self, cutoff_us: int, keep_rows: int) -> list[str]:
        def work(conn: sqlite3.Connection) -> list[str]:
            doomed = [
                (row[0], row[1])
                for row in conn.execute(
                    "SELECT command_id, reported FROM outcomes WHERE status != 'acked' "
                    "AND received_us < ? AND command_id NOT IN (SELECT command_id FROM "
                    "outcomes ORDER BY received_us DESC LIMIT ?)",
                    (cutoff_us, keep_rows),
                )
            ]
            conn.executemany("DELETE FROM outcomes WHERE command_id = ?", [(c,) for c, _ in doomed])
            unreported = [c for c, reported in doomed if not reported]
            if unreported:
                log.warning(
                    "dispatch journal: forgot %d outcome(s) the headend never acknowledged "
                    "in 7 days",
                    len(unreported),
                )
            return [c for c, _ in doomed]

        return self._tx(work)

    def _insert_event(self, conn: sqlite3.Connection, event: AgentEventRecord) -> int:
        cursor = conn.execute(
            "INSERT INTO events (event_id, created_us, record) VALUES (?, ?, ?)",
            (event.event_id, codec.datetime_to_us(event.ts), _json_encode(event)),
        )
        return int(cursor.lastrowid or 0)

    def _insert_event_sync(self, event: AgentEventRecord) -> int:
        return self._tx(lambda conn: self._insert_event(conn, event))

    def _insert_report_sync(self, report: LocalDispatchReport, now_us: int) -> int:
        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO local_reports (command_id, created_us, report) VALUES (?, ?, ?)",
                (report.command_id, now_us, _json_encode(report)),
            )
            return int(cursor.lastrowid or 0)

        return self._tx(work)

    def _page_sync(
        self, table: str, column: str, after: int, limit: int
    ) -> list[tuple[int, bytes]]:
        rows = self._db().execute(
            f"SELECT n, {column} FROM {table} WHERE n > ? ORDER BY n LIMIT ?", (after, limit)
        )
        return [(int(n), bytes(blob)) for n, blob in rows]

    def _delete_sync(self, table: str, key: str, value: str) -> int:
        return self._tx(
            lambda conn: conn.execute(f"DELETE FROM {table} WHERE {key} = ?", (value,)).rowcount
        )

    def _in_force_sync(
        self, asset_id: str, source: str, command_id: str | None, now_us: int
    ) -> None:
        self._tx(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO in_force (asset_id, source, command_id, ts_us) "
                "VALUES (?, ?, ?, ?)",
                (asset_id, source, command_id, now_us),
            )
        )


def _entry(row: Iterable[Any]) -> JournalEntry:
    (
        command_id,
        status,
        received_us,
        final_us,
        reason,
        allocations,
        reported,
        asset_id,
        site_id,
        mw,
        duration_s,
    ) = row
    return JournalEntry(
        command_id=command_id,
        status=status,
        ts=_dt(final_us if final_us is not None else received_us),
        received=_dt(received_us),
        reason=reason,
        allocations=_allocations_decode(allocations),
        reported=bool(reported),
        asset_id=asset_id,
        site_id=site_id,
        mw=mw,
        duration_s=duration_s,
    )
