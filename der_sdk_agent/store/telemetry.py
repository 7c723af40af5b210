"""The telemetry queue: sampler batches, numbered by ``seq``, held until acknowledged.

Its tables in the buffer file (:mod:`.file`):

* ``telemetry`` — one row per sampler batch, keyed by its ``seq`` (the batch's serialized
  protobuf ``TelemetryBatch``, its sample count, size and creation time). ``seq`` increases
  by one per batch for the life of the file, across agent restarts;
* ``dropped`` — the seq ranges the bounds dropped without an acknowledgement, until the
  headend confirms them (see *Drops* below);
* in ``meta``: the queue's ``stream_id`` (a UUID made with the file), the next ``seq`` and
  the drop counters.

**Bounds.** The queue holds at most ``max_bytes`` of payload and nothing older than
``max_age_s``; past either bound the **oldest** batches are dropped when a batch is added
(and by :meth:`TelemetryQueue.maintain`). Drops are counted in ``meta``, logged at WARNING
at most once a minute and recorded in the outbox as one coalesced ``telemetry_dropped``
event per minute, committed with the drop. Nothing else in the file is dropped by them.

**Drops are the agent's to tell.** A held batch leaves the queue for one of two reasons:
the headend acknowledged it, or the bounds dropped it. Only the agent knows which, so the
seqs it dropped are kept as exact ranges in the ``dropped`` table, committed in the same
transaction as the drop, and every batch sent lists them (:meth:`TelemetryQueue.
drop_report`) until a ``TelemetryAck`` with ``stored_through`` at or past them says the
headend recorded them (as stored, or as a gap). Every other seq below the floor was
acknowledged. The headend therefore never has to guess a gap from the floor: not after its
own restart (when it no longer remembers what it acknowledged), not after the agent's (the
ranges are in the file). A buffer written by an older agent starts with no ranges; its
drops were reported by its own ``telemetry_dropped`` events.

**On the loop.** An index of the held batches (seq, size, age) mirrors the table, so the
link asks what is held without touching the disk; only payloads are read from the file.
Adding a batch is one transaction; acknowledgements change the index at once and are
deleted from the file in the transaction that adds the next batch (at 1 Hz telemetry: one
transaction a tick, not two), or on their own when none comes within :data:`ACK_FLUSH_S`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from der_sdk.models import TelemetrySample
from der_sdk.wire import codec
from der_sdk.wire.codec import AgentEventRecord, BufferStats, SeqRange
from der_sdk_agent.store.file import BufferFile, Loaded, Store, us
from der_sdk_agent.store.outbox import Outbox

__all__ = [
    "ACK_FLUSH_S",
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_BYTES",
    "DROPPED_RANGES_PER_BATCH",
    "DROP_REPORT_EVERY_S",
    "TelemetryQueue",
]

log = logging.getLogger("der.agent.buffer")

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DROP_REPORT_EVERY_S = 60.0
"""At most one drop WARNING and one ``telemetry_dropped`` event per this many seconds."""
ACK_FLUSH_S = 2.0
"""Acknowledged batches are deleted with the next batch added, or on their own once no
batch has been added for this long (telemetry slower than every 2 s, or the sampler
stopped). Deleting later than acknowledged loses nothing: a batch
left in the file by a crash meanwhile is sent again, and the headend stores its samples
once (keyed by asset and timestamp: docs/durability.md)."""
DROPPED_RANGES_PER_BATCH = 64
"""At most this many dropped ranges ride on one batch; see :meth:`TelemetryQueue.drop_report`."""


@dataclass(slots=True)
class _Held:
    created: float  # wall clock, seconds since the epoch
    samples: int
    bytes: int


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


class TelemetryQueue(Store):
    """The telemetry batches of one agent (see the module docstring).

    :param file: the buffer file it is kept in.
    :param outbox: where the ``telemetry_dropped`` events go.
    :param max_bytes: bound on the telemetry payload held; the oldest batches go first.
    :param max_age_s: telemetry batches older than this are dropped.
    :param clock: wall clock in seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        file: BufferFile,
        outbox: Outbox,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
        drop_report_every_s: float = DROP_REPORT_EVERY_S,
        ack_flush_s: float = ACK_FLUSH_S,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if not (math.isfinite(max_age_s) and max_age_s > 0):
            raise ValueError(f"max_age_s must be a positive number of seconds, got {max_age_s}")
        super().__init__(file)
        self.outbox = outbox
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
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
        self._listeners: list[Callable[[], None]] = []
        self._append_lock = asyncio.Lock()
        # the batch appended last, which the link reads at once to send it: served from
        # memory rather than read back from the file
        self._fresh: tuple[int, bytes] | None = None

        self._pending_acks: set[int] = set()
        self._pending_through = 0
        self._flusher: asyncio.Task[None] | None = None

        self._drops = _Drops()
        self._last_drop_report: float | None = None  # monotonic

    @property
    def path(self) -> str:
        return self.file.path

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously) after a batch is added."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------ what is held

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

    def stats(self, replay_from_seq: int | None = None) -> BufferStats:
        """The queue's figures. ``replay_batches`` counts held batches with a seq below
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

    # ------------------------------------------------------------------ add, read, ack

    async def append(self, samples: Sequence[TelemetrySample]) -> int:
        """Commit one batch with the next seq; drop the oldest beyond the bounds.

        :return: the batch's seq (0 for an empty batch, which is not stored).
        """
        if not samples:
            return 0
        await self.file.ready()
        payload = codec.telemetry_payload(samples)
        async with self._append_lock:
            now = self._clock()
            seq = self._next_seq
            drops, reasons = self._plan_drops(len(payload), now)
            dropped = [(s, self._index[s]) for s in drops]
            report = self._note_drops(dropped, reasons)
            counters = self._counters_after(dropped)
            created_us, count = us(now), len(samples)
            acked = sorted(self._pending_acks), self._pending_through

            def append(conn: sqlite3.Connection) -> int | None:
                self._delete_acked(conn, *acked)  # acknowledged since the last batch
                conn.execute(
                    "INSERT INTO telemetry (seq, created_us, samples, bytes, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (seq, created_us, count, len(payload), payload),
                )
                conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                return self._record_drops(conn, drops, counters, report, created_us)

            event_n = await self.file.write(append)
            self._acked_deleted(*acked)
            self._next_seq = seq + 1
            self._forget_dropped(dropped)
            self._index[seq] = _Held(now, count, len(payload))
            self._fresh = (seq, payload)
            self._samples += count
            self._bytes += len(payload)
            self.outbox.events.added(event_n)
        for callback in self._listeners:
            callback()
        return seq

    async def read(self, seq: int) -> bytes | None:
        """The stored payload of batch ``seq`` (``None`` when it is no longer held)."""
        if seq not in self._index:
            return None
        fresh = self._fresh
        if fresh is not None and fresh[0] == seq:
            return fresh[1]
        await self.file.ready()

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT payload FROM telemetry WHERE seq = ?", (seq,)).fetchone()
            return bytes(row[0]) if row else None

        return await self.file.run(read)

    async def batch(self, seq: int) -> list[TelemetrySample]:
        """The samples of batch ``seq`` (empty when it is no longer held)."""
        payload = await self.read(seq)
        if payload is None:
            return []
        message = codec.agent_telemetry_payload(seq, payload)
        return codec.samples_from_batch(message.telemetry)

    def ack(self, seq: int, stored_through: int = 0) -> int:
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
        if pending and self._flusher is None and self.file.accepting:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_later(), name="der-agent-buffer-acks"
            )
        return forgotten

    def _forget(self, seq: int) -> None:
        held = self._index.pop(seq)
        if self._fresh is not None and self._fresh[0] == seq:
            self._fresh = None
        self._samples -= held.samples
        self._bytes -= held.bytes

    async def _flush_later(self) -> None:
        try:
            while self._pending_acks or self._pending_through:
                appended = self._next_seq
                await asyncio.sleep(self._ack_flush_s)
                if self._next_seq == appended:  # no batch came to delete them with it
                    await self._flush_acks()
        except Exception:  # the rows stay; they are deleted with the next acknowledgement
            log.exception("telemetry buffer %s: deleting acknowledged batches failed", self.path)
        finally:
            self._flusher = None

    async def _flush_acks(self) -> None:
        # Forget the pending deletes only once they are done: a flush cancelled by
        # close() is simply done again (deleting twice is harmless).
        seqs, through = sorted(self._pending_acks), self._pending_through
        if not (seqs or through):
            return
        await self.file.write(lambda conn: self._delete_acked(conn, seqs, through))
        self._acked_deleted(seqs, through)

    @staticmethod
    def _delete_acked(conn: sqlite3.Connection, seqs: list[int], through: int) -> None:
        """On the thread: delete acknowledged ``seqs`` and everything through ``through``
        (batches and dropped ranges)."""
        if through:
            conn.execute("DELETE FROM telemetry WHERE seq <= ?", (through,))
            conn.execute("DELETE FROM dropped WHERE last_seq <= ?", (through,))
            conn.execute(
                "UPDATE dropped SET first_seq = ? WHERE first_seq <= ?",
                (through + 1, through),
            )
        if seqs:
            conn.executemany("DELETE FROM telemetry WHERE seq = ?", [(s,) for s in seqs])

    def _acked_deleted(self, seqs: list[int], through: int) -> None:
        """``seqs`` and ``through`` are deleted from the file: no longer pending."""
        self._pending_acks.difference_update(seqs)
        if through and self._pending_through == through:
            self._pending_through = 0

    # ------------------------------------------------------------------ bounds

    async def maintain(self) -> None:
        """Periodic upkeep (the agent calls it every minute): drop batches past
        ``max_age_s`` and report drops not reported yet."""
        await self.file.ready()
        async with self._append_lock:
            drops, reasons = self._plan_drops(0, self._clock())
            dropped = [(s, self._index[s]) for s in drops]
            report = self._note_drops(dropped, reasons)
            if dropped or report is not None:
                counters, now_us = self._counters_after(dropped), us(self._clock())
                event_n = await self.file.write(
                    lambda conn: self._record_drops(conn, drops, counters, report, now_us)
                )
                self._forget_dropped(dropped)
                if event_n is not None:
                    self.outbox.events.added(event_n)

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

    def _counters_after(self, dropped: Sequence[tuple[int, _Held]]) -> tuple[int, int]:
        """The drop counters (samples, batches) once ``dropped`` is dropped."""
        return (
            self.dropped_samples + sum(h.samples for _, h in dropped),
            self.dropped_batches + len(dropped),
        )

    def _record_drops(
        self,
        conn: sqlite3.Connection,
        drops: list[int],
        counters: tuple[int, int],
        report: AgentEventRecord | None,
        now_us: int,
    ) -> int | None:
        """On the thread: delete ``drops``, note them in ``dropped`` (extending the range
        they continue), store the counters and the event; returns the event's position."""
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
            dropped_samples, dropped_batches = counters
            conn.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [(dropped_samples, "dropped_samples"), (dropped_batches, "dropped_batches")],
            )
        return self.outbox.events.insert(conn, report, now_us) if report is not None else None

    def _forget_dropped(self, dropped: Sequence[tuple[int, _Held]]) -> None:
        for seq, held in dropped:
            if self._fresh is not None and self._fresh[0] == seq:
                self._fresh = None
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
        self, dropped: Sequence[tuple[int, _Held]], reasons: set[str]
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
        if last is not None and now - last < self._drop_report_every_s:
            return None
        self._last_drop_report = now
        self._drops = _Drops()
        total_samples, total_batches = self._counters_after(dropped)
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

    # ------------------------------------------------------------------ the file's calls

    def loader(self) -> Callable[[sqlite3.Connection], Loaded]:
        def load(conn: sqlite3.Connection) -> Loaded:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if "stream_id" not in meta:
                meta.update(
                    stream_id=str(uuid.uuid4()), next_seq=1, dropped_samples=0, dropped_batches=0
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [
                        (key, meta[key])
                        for key in ("stream_id", "next_seq", "dropped_samples", "dropped_batches")
                    ],
                )
            held = [
                (seq, created_us / 1_000_000, samples, size)
                for seq, created_us, samples, size in conn.execute(
                    "SELECT seq, created_us, samples, bytes FROM telemetry ORDER BY seq"
                )
            ]
            dropped = [
                (int(first), int(last))
                for first, last in conn.execute(
                    "SELECT first_seq, last_seq FROM dropped ORDER BY first_seq"
                )
            ]
            next_seq = max(int(meta["next_seq"]), held[-1][0] + 1 if held else 1)
            return lambda: self._loaded(meta, next_seq, held, dropped)

        return load

    def _loaded(
        self,
        meta: dict[str, object],
        next_seq: int,
        held: list[tuple[int, float, int, int]],
        dropped: list[SeqRange],
    ) -> None:
        self.stream_id = str(meta["stream_id"])
        self._fresh = None
        self._next_seq = next_seq
        self.dropped_samples = int(str(meta["dropped_samples"]))
        self.dropped_batches = int(str(meta["dropped_batches"]))
        for seq, created, samples, size in held:
            self._index[seq] = _Held(created, samples, size)
            self._samples += samples
            self._bytes += size
        self._dropped = dropped
        log.info(
            "telemetry buffer %s (stream %s, sync %s): %d batch(es), %d sample(s) held, "
            "next seq %d",
            self.path,
            self.stream_id,
            self.file.sync,
            len(self._index),
            self._samples,
            self._next_seq,
        )

    async def after_open(self) -> None:
        await self.maintain()

    async def before_close(self) -> None:
        """Delete the acknowledged batches still pending."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        try:
            await self._flush_acks()
        except Exception:
            log.exception("telemetry buffer %s: deleting acknowledged batches failed", self.path)
