"""The outbound link to the headend: one bidirectional gRPC stream, kept open.

Per attempt: open a channel, send ``Register`` (with the telemetry queue's ``stream_id``), wait for
``RegisterAck``; then send every final setpoint outcome the headend has not acknowledged
and run

* one **writer** (the only task that writes to the call): setpoint acks first, then
  reports of local commands (``LocalDispatch``) and agent events not yet sent on this
  stream, then a heartbeat (with the buffer's figures) when due, then telemetry batches
  from the telemetry queue, each with its ``seq``, ``floor_seq`` and the seq ranges the
  queue dropped that the headend has not confirmed yet
  (:meth:`~der_sdk_agent.store.telemetry.TelemetryQueue.drop_report`);
* one **reader**: ``Setpoint`` goes to the command worker, ``TelemetryAck`` forgets the
  batch and every batch and dropped range up to ``stored_through``, ``SetpointOutcomeAck``,
  ``LocalDispatchAck`` and ``EventAck`` mark the outcome, report or event as recorded.

Two tasks live as long as the link, across streams:

* the **command worker** takes setpoints through the dispatch journal one at a time, in
  arrival order (:meth:`~der_sdk_agent.dispatch.Dispatcher.headend_command`): a stream
  that ends mid-apply does not interrupt the device write, and the final outcome, kept in
  the journal, is sent on the next stream;
* the **link-loss watch**: when the link has been down (not registered) for
  ``link_loss_hold_s``, it applies the configured fallback once per outage.

**Telemetry flow.** At register, every batch already in the buffer is *backlog*; batches
created later are *live*. Live batches go first, in seq order; backlog batches go oldest
first, paced by a token bucket of ``replay_samples_per_s`` samples (one second of burst),
so after an outage the newest values stay fresh while the history catches up. At most
``window`` batches are in flight (sent, not acknowledged) on a stream; when the window is
full the writer waits for acknowledgements and the sampler keeps filling the buffer — a
stalled headend makes the agent buffer, it never blocks the sampler. Batches sent but not
acknowledged are backlog on the next stream and are sent again, in seq order.

**Liveness.** The channel pings the headend after 20 s without activity
(``grpc.keepalive_time_ms``) and gives up on the connection when a ping is not answered
within 10 s (``grpc.keepalive_timeout_ms``, and ``grpc.http2.ping_timeout_ms``, which
current gRPC core uses for the wait and which defaults to 60 s): a half-open link is
detected at most 20 + 10 = 30 s after it went silent, inside the 40 s budget with room
for scheduling.
Pings are allowed with no call in flight and without data frames in between
(``grpc.http2.max_pings_without_data`` 0: unlimited), so an idle or stalled stream is
still watched. The headend accepts a ping every 10 s; 20 s is twice that, so timer jitter
never earns a ``too_many_pings`` GOAWAY.

**Security.** The channel is plaintext, or TLS with a pinned CA and optionally a client
certificate, and the stream may carry the agent's token (:class:`~der_sdk_agent.tls.
LinkSecurity`). A failed TLS handshake is a failed attempt like any other; its log line
adds what to check when the failure says enough (an expired client certificate, a server
name that does not match, a headend without TLS).

**Reconnecting.** Any error or end of stream ends the attempt with one log line, and the
link retries after the gRPC connection-backoff schedule: the base delay is
``reconnect_initial_s`` (1 s) times :data:`RECONNECT_MULTIPLIER` (1.6) per failed attempt,
capped at ``reconnect_max_s`` (120 s), and each delay is the base ±
:data:`RECONNECT_JITTER` (20 %), uniformly (:class:`der_sdk.backoff.Backoff`). The jitter
spreads a fleet that lost the headend at the same instant (even its first retries), and
stays on at the cap so the fleet stays spread. The attempt count resets after a successful
register.

**Several headends.** With several addresses the link dials one at a time, in an order
shuffled at start, and every failure moves it to the next address after the first delay;
the delay grows only when every address failed in a row
(:class:`~der_sdk_agent.headends.HeadendRotation`). Registering at another address than
the last register is one INFO line naming both. Nothing else changes on a move: the
buffer's unacknowledged batches, outcomes, reports and events go to the new headend like
after any reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from der_sdk.backoff import JITTER, MULTIPLIER, Backoff
from der_sdk.models import utc_now
from der_sdk.wire import codec, pb, pb_grpc
from der_sdk_agent.dispatch import Dispatcher, HeadendCommand
from der_sdk_agent.headends import HeadendRotation, parse_headend_addresses
from der_sdk_agent.store import CommandJournal, JournalEntry, Outbox, TelemetryQueue
from der_sdk_agent.store.journal import split_step_key, step_key
from der_sdk_agent.tls import LinkSecurity

__all__ = [
    "DEFAULT_REPLAY_SAMPLES_PER_S",
    "DEFAULT_WINDOW_BATCHES",
    "RECONNECT_JITTER",
    "RECONNECT_MULTIPLIER",
    "Backoff",
    "HeadendLink",
    "LinkStats",
    "RegisterRefused",
    "StreamEnded",
    "TokenBucket",
]

log = logging.getLogger("der.agent.link")

DEFAULT_REGISTER_TIMEOUT_S = 10.0
DEFAULT_WINDOW_BATCHES = 32
DEFAULT_REPLAY_SAMPLES_PER_S = 2000.0
DEFAULT_LINK_LOSS_HOLD_S = 300.0
RECONNECT_MULTIPLIER = MULTIPLIER
RECONNECT_JITTER = JITTER
CLOCK_SKEW_WARN_S = 5.0
"""A setpoint's absolute and relative expiry disagreeing by more is logged as clock skew
(at most once a minute)."""

LinkLossFallback = Literal["default", "hold"]

_CHANNEL_OPTIONS = (
    # One TCP connection per agent, even when several agents share a process (der launch,
    # the demo): the headend then sees each agent's own peer, as in the field.
    ("grpc.use_local_subchannel_pool", 1),
    # A half-open link is found within 20 + 10 = 30 s (see the module docstring); the
    # headend accepts a ping every 10 s (der_sdk_headend.service.GRPC_SERVER_OPTIONS).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Current gRPC core waits for a ping's ack for ping_timeout_ms (default 60 s), whatever
    # keepalive_timeout_ms says (grpc/grpc#34647): without it a dead link takes 80 s.
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


class StreamEnded(Exception):
    """The headend ended the stream."""


class RegisterRefused(Exception):
    """The headend answered ``RegisterAck(accepted=False)``."""


@dataclass
class LinkStats:
    """Counters for tests and operators. ``last_ack_seq`` is the highest batch seq the
    headend acknowledged on the current stream; ``replay_from_seq`` the current stream's
    first live seq and ``headend`` the address it is registered with (both ``None``
    while disconnected)."""

    connected: bool = False
    headend: str | None = None
    registrations: int = 0
    reconnects: int = 0
    failed_attempts: int = 0
    batches_sent: int = 0
    last_ack_seq: int = 0
    replay_from_seq: int | None = None
    fallbacks: int = 0
    clock_offset_s: float | None = None
    """The agent's clock offset from the headend's (headend minus agent), seconds."""


class TokenBucket:
    """``rate`` tokens per second, at most ``rate`` banked (one second of burst)."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.capacity = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def wait_s(self, n: int) -> float:
        """Seconds until ``n`` tokens may be taken (0: now). A request bigger than the
        bucket waits for a full bucket, then goes (the balance goes negative)."""
        self._refill()
        need = min(float(n), self.capacity)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate

    def take(self, n: int) -> None:
        self._refill()
        self._tokens -= n


@dataclass
class _Stream:
    """State of one stream: it starts fresh on every attempt."""

    call: Any
    live_from: int = 1  # batches with a seq from here on were created after register
    next_live: int = 1
    backlog: list[int] = field(default_factory=list)
    backlog_at: int = 0
    bucket: TokenBucket | None = None
    in_flight: set[int] = field(default_factory=set)
    acks: collections.deque[pb.AgentMessage] = field(default_factory=collections.deque)
    reports_sent_n: int = 0  # position of the last LocalDispatch sent (outbox positions)
    events_sent_n: int = 0
    # The headend reads telemetry by column (its RegisterAck says so); else rows.
    columns: bool = False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details()
        return f"{exc.code().name}: {details}" if details else str(exc.code().name)
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    if isinstance(exc, StreamEnded | RegisterRefused):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _setpoint_ack(entry: JournalEntry) -> pb.AgentMessage:
    command_id, step = split_step_key(entry.command_id)
    return codec.agent_setpoint_ack(
        command_id,
        entry.status,
        entry.allocations,
        entry.reason,
        ts=entry.ts,
        step=step,
        superseded_by=entry.superseded_by,
    )


class HeadendLink:
    """Keeps the agent's stream to the headend open until cancelled.

    :param headend: the headend's address, or several (a sequence or a comma-separated
        list); :attr:`headend` is then the address dialled now.
    :param window: most telemetry batches in flight (sent, not acknowledged) per stream.
    :param replay_samples_per_s: pace of the backlog after a reconnect.
    :param link_loss_hold_s: how long the link may be down before the fallback.
    :param link_loss_fallback: ``default`` (assets holding a headend setpoint return to
        their default) or ``hold`` (keep every setpoint; log only).
    :param security: TLS, client certificate and token; default: plaintext, no token.
    :param clock: the agent's wall clock, seconds since the epoch; its offset from the
        headend's is measured from the ``sent_at_us`` of the headend's messages.
    """

    CLOCK_SAMPLES = 16
    """The offset is the largest of the last this many (headend time - agent time) on
    receipt: the one with the shortest transit."""

    def __init__(
        self,
        *,
        headend: str | Sequence[str],
        agent_id: str,
        site_id: str,
        adapters: Mapping[str, str],
        sdk_version: str,
        plugin_versions: Mapping[str, str],
        telemetry: TelemetryQueue,
        journal: CommandJournal,
        outbox: Outbox,
        dispatcher: Dispatcher,
        heartbeat_interval_s: float,
        backoff: Backoff,
        window: int = DEFAULT_WINDOW_BATCHES,
        replay_samples_per_s: float = DEFAULT_REPLAY_SAMPLES_PER_S,
        link_loss_hold_s: float = DEFAULT_LINK_LOSS_HOLD_S,
        link_loss_fallback: LinkLossFallback = "default",
        register_timeout_s: float = DEFAULT_REGISTER_TIMEOUT_S,
        security: LinkSecurity | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 batch, got {window}")
        self.headends = parse_headend_addresses(headend, source="headend")
        self.rotation = HeadendRotation(self.headends, backoff)
        self.headend = self.rotation.current
        self._registered_at: str | None = None  # the address of the last register
        self.agent_id = agent_id
        self.site_id = site_id
        self.adapters = dict(adapters)
        self.sdk_version = sdk_version
        self.plugin_versions = dict(plugin_versions)
        self.telemetry = telemetry
        self.journal = journal
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.heartbeat_interval_s = heartbeat_interval_s
        self.backoff = backoff
        self.window = window
        self.replay_samples_per_s = replay_samples_per_s
        self.link_loss_hold_s = link_loss_hold_s
        self.link_loss_fallback = link_loss_fallback
        self.register_timeout_s = register_timeout_s
        self.security = security if security is not None else LinkSecurity()
        self.stats = LinkStats()
        self.accepted_asset_ids: tuple[str, ...] = ()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._started = time.monotonic()
        self._registered = False
        self._stream: _Stream | None = None
        self._commands: asyncio.Queue[HeadendCommand] = asyncio.Queue()
        self._skew_logged_at = -math.inf
        self.clock = clock
        self._offsets: collections.deque[float] = collections.deque(maxlen=self.CLOCK_SAMPLES)
        telemetry.add_listener(self._wake.set)
        outbox.add_listener(self._wake.set)

    async def wait_connected(self) -> None:
        """Return once the agent is registered on a live stream."""
        await self._connected.wait()

    @property
    def clock_offset_s(self) -> float | None:
        """The agent's clock offset from the headend's (headend minus agent), seconds;
        ``None`` until a headend message carried its time."""
        return max(self._offsets) if self._offsets else None

    def _observe_clock(self, sent_at_us: int) -> None:
        if sent_at_us > 0:
            self._offsets.append(sent_at_us / 1e6 - self.clock())
            self.stats.clock_offset_s = self.clock_offset_s

    @property
    def unacked_local_dispatches(self) -> int:
        """Local command reports the headend has not acknowledged yet."""
        return self.outbox.local_reports.count

    # ------------------------------------------------------------------ reconnect loop

    async def run(self) -> None:
        """Connect, serve the stream, reconnect on failure; forever, until cancelled."""
        helpers = [
            asyncio.create_task(self._command_worker(), name="der-agent-link-commands"),
            asyncio.create_task(self._watch_link_loss(), name="der-agent-link-loss"),
        ]
        if self.dispatcher.schedules is not None:
            helpers.append(
                asyncio.create_task(
                    self.dispatcher.schedules.run(self._send), name="der-agent-schedules"
                )
            )
        try:
            await self._reconnect_forever()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _reconnect_forever(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            level = logging.WARNING
            try:
                await self._attempt()
                reason = "stream ended"  # pragma: no cover - an attempt ends by raising
            except asyncio.CancelledError:
                raise
            except RegisterRefused as exc:
                level, reason = logging.ERROR, _reason(exc)
            except Exception as exc:
                reason = _reason(exc)
                hint = self.security.explain(exc)
                if hint:
                    reason = f"{reason} ({hint})"
            finally:
                self._stream = None
                self.stats.connected = False
                self.stats.headend = None
                self.stats.replay_from_seq = None
                self._connected.clear()
                self._disconnected.set()
            if self._registered:
                attempt = 1  # a good register resets the backoff
                self.rotation.registered()
                what = "connection lost"
            else:
                self.stats.failed_attempts += 1
                what = "refused registration" if level == logging.ERROR else "unreachable"
            failed, delay = self.headend, self.rotation.failed()
            self.headend = self.rotation.current
            then = "retrying" if self.headend == failed else f"trying headend {self.headend}"
            log.log(
                level,
                "headend %s %s (attempt %d): %s; %s in %.1f s",
                failed,
                what,
                attempt,
                reason,
                then,
                delay,
            )
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self) -> None:
        """Register and serve one stream; ends by raising (stream end is StreamEnded)."""
        self._registered = False
        await self.telemetry.open()
        channel = self.security.open_channel(self.headend, _CHANNEL_OPTIONS)
        call: Any = None
        try:
            call = pb_grpc.AgentLinkStub(channel).Stream(  # type: ignore[no-untyped-call]
                metadata=self.security.call_metadata()
            )
            stream = _Stream(call=call)
            register = codec.agent_register(
                agent_id=self.agent_id,
                site_id=self.site_id,
                assets=self.adapters,
                sdk_version=self.sdk_version,
                plugins=self.plugin_versions,
                stream_id=self.telemetry.stream_id,
            )
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.register_timeout_s):
                    await call.write(register)
                    first = await call.read()
                    # Tolerate a headend that queues a setpoint before its RegisterAck:
                    # the command worker takes it, in order, like any other.
                    while first is not grpc.aio.EOF and first.WhichOneof("msg") == "setpoint":
                        self._receive(first.setpoint, loop.time())
                        first = await call.read()
            except TimeoutError:
                raise StreamEnded(f"no RegisterAck within {self.register_timeout_s:g} s") from None
            if first is not grpc.aio.EOF:
                self._observe_clock(first.sent_at_us)
            self._on_register_ack(first, stream)
            self._registered = True
            await self._serve(stream)
        finally:
            if call is not None:
                call.cancel()
            await channel.close()

    def _on_register_ack(self, message: Any, stream: _Stream) -> None:
        if message is grpc.aio.EOF:
            raise StreamEnded("stream closed before RegisterAck")
        kind = message.WhichOneof("msg")
        if kind != "register_ack":
            raise StreamEnded(f"expected RegisterAck as the first message, got {kind}")
        ack = message.register_ack
        if not ack.accepted:
            raise RegisterRefused(f"agent {self.agent_id}: {ack.message or 'no assets accepted'}")
        for refusal in ack.refused:
            log.warning(
                "headend %s refused asset %s of agent %s: %s",
                self.headend,
                refusal.asset_id,
                self.agent_id,
                refusal.reason,
            )
        self.accepted_asset_ids = tuple(ack.accepted_asset_ids)
        stream.columns = ack.telemetry_columns

        buffer = self.telemetry
        stream.live_from = stream.next_live = buffer.next_seq
        stream.backlog = buffer.seqs()
        stream.bucket = TokenBucket(self.replay_samples_per_s, asyncio.get_running_loop().time)

        held = ""
        if self.stats.registrations:
            self.stats.reconnects += 1
        if stream.backlog:
            figures = buffer.stats(stream.live_from)
            held = (
                f"; replaying {figures.batches} buffered batch(es), {figures.samples} "
                f"sample(s), oldest {figures.oldest_age_s:.0f} s old, at up to "
                f"{self.replay_samples_per_s:g} samples/s ({figures.dropped_samples} "
                f"sample(s) dropped since the buffer was created)"
            )
        self.stats.registrations += 1
        self.stats.connected = True
        self.stats.headend = self.headend
        self.stats.last_ack_seq = 0
        self.stats.replay_from_seq = stream.live_from
        self._connected.set()
        self._disconnected.clear()
        if self._registered_at not in (None, self.headend):
            log.info(
                "agent %s moved from headend %s to headend %s",
                self.agent_id,
                self._registered_at,
                self.headend,
            )
        self._registered_at = self.headend
        log.info(
            "registered with headend %s as agent %s (stream %s): %d asset(s) accepted, "
            "%d refused%s",
            self.headend,
            self.agent_id,
            buffer.stream_id,
            len(ack.accepted_asset_ids),
            len(ack.refused),
            held,
        )

    async def _serve(self, stream: _Stream) -> None:
        for entry in await self.journal.unreported():
            stream.acks.append(_setpoint_ack(entry))
        self._stream = stream
        # The reader first: when the stream ends, its error says why; a failed write
        # racing it says less.
        tasks = [
            asyncio.create_task(self._reader(stream), name="der-agent-link-reader"),
            asyncio.create_task(self._writer(stream), name="der-agent-link-writer"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stream = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if task in done and not task.cancelled():
                exc = task.exception()
                if exc is not None:
                    raise exc
        raise StreamEnded("stream ended")

    # ------------------------------------------------------------------ the one writer

    async def _writer(self, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        buffer, reports, events = self.telemetry, self.outbox.local_reports, self.outbox.events
        heartbeat_due = loop.time() + self.heartbeat_interval_s
        while True:
            self._wake.clear()
            while stream.acks:
                await stream.call.write(stream.acks.popleft())
            newest = reports.last_n
            if newest > stream.reports_sent_n:
                page = await reports.after(stream.reports_sent_n)
                for n, report in page:
                    await stream.call.write(codec.agent_local_dispatch(report))
                    stream.reports_sent_n = n
                if len(page) < reports.PAGE:  # the rest was acknowledged meanwhile
                    stream.reports_sent_n = max(stream.reports_sent_n, newest)
            newest = events.last_n
            if newest > stream.events_sent_n:
                new_events = await events.after(stream.events_sent_n)
                for n, event in new_events:
                    await stream.call.write(codec.agent_event(event))
                    stream.events_sent_n = n
                if len(new_events) < events.PAGE:
                    stream.events_sent_n = max(stream.events_sent_n, newest)
            if loop.time() >= heartbeat_due:
                await stream.call.write(
                    codec.agent_heartbeat(
                        self.agent_id,
                        utc_now(),
                        time.monotonic() - self._started,
                        buffer=buffer.stats(stream.live_from),
                        clock_offset_s=self.clock_offset_s,
                    )
                )
                heartbeat_due = loop.time() + self.heartbeat_interval_s
            seq, replay_wait_s = self._next_batch(stream)
            if seq is not None:
                payload = await buffer.read(seq)
                if payload is not None:  # else acknowledged or dropped meanwhile
                    floor_seq, dropped = buffer.drop_report()
                    await stream.call.write(
                        codec.agent_telemetry_payload(
                            seq, payload, floor_seq, dropped, columns=stream.columns
                        )
                    )
                    stream.in_flight.add(seq)
                    self.stats.batches_sent += 1
                continue
            timeout = max(0.0, heartbeat_due - loop.time())
            if replay_wait_s is not None:
                timeout = min(timeout, replay_wait_s)
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _next_batch(self, stream: _Stream) -> tuple[int | None, float | None]:
        """The next batch to send: live first, then backlog as the token bucket allows.

        :return: ``(seq, None)``, or ``(None, seconds)`` when only backlog is left and
            the bucket needs that long, or ``(None, None)`` when nothing can go now.
        """
        if len(stream.in_flight) >= self.window:
            return None, None
        buffer = self.telemetry
        while stream.next_live < buffer.next_seq:
            seq = stream.next_live
            stream.next_live += 1
            if seq in buffer:
                return seq, None
        bucket = stream.bucket
        while stream.backlog_at < len(stream.backlog):
            seq = stream.backlog[stream.backlog_at]
            if seq not in buffer:  # acknowledged (stored_through) or dropped meanwhile
                stream.backlog_at += 1
                continue
            samples = buffer.batch_samples(seq)
            if bucket is not None:
                wait_s = bucket.wait_s(samples)
                if wait_s > 0:
                    return None, wait_s
                bucket.take(samples)
            stream.backlog_at += 1
            return seq, None
        return None, None

    def _send(self, entry: JournalEntry) -> None:
        """Acknowledge a setpoint on the current stream, if there is one (a final outcome
        missed here is sent again after the next register: it is in the journal)."""
        stream = self._stream
        if stream is not None:
            stream.acks.append(_setpoint_ack(entry))
            self._wake.set()

    # ------------------------------------------------------------------ reader

    async def _reader(self, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await stream.call.read()
            if message is grpc.aio.EOF:
                raise StreamEnded("headend closed the stream")
            self._observe_clock(message.sent_at_us)
            kind = message.WhichOneof("msg")
            if kind == "setpoint":
                self._receive(message.setpoint, loop.time())
            elif kind == "telemetry_ack":
                ack = message.telemetry_ack
                self._on_telemetry_ack(stream, ack.seq, ack.stored_through)
            elif kind == "outcome_ack":
                ack = message.outcome_ack
                key = step_key(ack.command_id, ack.step) if ack.HasField("step") else ack.command_id
                await self.journal.mark_reported(key)
            elif kind == "local_dispatch_ack":
                await self.outbox.local_reports.ack(message.local_dispatch_ack.command_id)
            elif kind == "event_ack":
                await self.outbox.events.ack(message.event_ack.event_id)
            else:
                log.debug("ignoring headend message %s on an open stream", kind)

    def _receive(self, setpoint: pb.Setpoint, received_at: float) -> None:
        command = _command(setpoint, received_at)
        skew = command.clock_skew_s
        skewed = skew is not None and abs(skew) > CLOCK_SKEW_WARN_S
        if skew is not None and skewed and received_at - self._skew_logged_at >= 60.0:
            self._skew_logged_at = received_at
            log.warning(
                "command %s: its expiry time is %.1f s %s than its time to live says: the "
                "clocks of this agent and headend %s disagree (or the command took that long "
                "to arrive); the earlier of the two applies",
                command.command_id,
                abs(skew),
                "later" if skew > 0 else "earlier",
                self.headend,
            )
        self._commands.put_nowait(command)

    def _on_telemetry_ack(self, stream: _Stream, seq: int, stored_through: int) -> None:
        stream.in_flight.discard(seq)
        if stored_through:
            stream.in_flight = {s for s in stream.in_flight if s > stored_through}
        self.telemetry.ack(seq, stored_through)
        self.stats.last_ack_seq = max(self.stats.last_ack_seq, seq)
        self._wake.set()

    # ------------------------------------------------------------------ long-lived helpers

    async def _command_worker(self) -> None:
        while True:
            command = await self._commands.get()
            try:
                await self.dispatcher.headend_command(command, self._send)
            except Exception:
                # The journal could not be written: the command was not applied (or its
                # outcome not recorded). Without an ack the headend sends it again.
                log.exception("command %s: the dispatch journal failed", command.command_id)

    async def _watch_link_loss(self) -> None:
        while True:
            await self._disconnected.wait()
            try:
                async with asyncio.timeout(self.link_loss_hold_s):
                    await self._connected.wait()
                continue
            except TimeoutError:
                pass
            try:
                await self._fall_back()
            except Exception:
                log.exception("the link-loss fallback failed")
            await self._connected.wait()

    async def _fall_back(self) -> None:
        hold = self.link_loss_hold_s
        self.stats.fallbacks += 1
        if self.link_loss_fallback == "hold":
            log.warning(
                "headend %s unreachable for %g s; link_loss_fallback is 'hold': every "
                "setpoint stays in force",
                ", ".join(self.headends),
                hold,
            )
            return
        why = f"link-loss fallback: headend unreachable for {hold:g} s"
        outcomes = await self.dispatcher.link_loss_fallback(why)
        assets = {a.asset_id: a.mw for o in outcomes for a in o.allocations}
        failed = sorted(
            a.asset_id for o in outcomes for a in o.allocations if a.status != "applied"
        )
        message = (
            f"headend unreachable for {hold:g} s: returned {len(assets)} asset(s) holding a "
            f"headend setpoint to their default"
            + (f" ({', '.join(f'{a}={mw:g} MW' for a, mw in assets.items())})" if assets else "")
            + (f"; not applied to {', '.join(failed)}" if failed else "")
        )
        log.warning("headend %s %s", ", ".join(self.headends), message)
        await self.outbox.add_event(
            "link_loss_fallback",
            message,
            data={
                "hold_s": hold,
                "policy": self.link_loss_fallback,
                "assets": assets,
                "failed": failed,
                "commands": [o.command_id for o in outcomes],
            },
        )


def _command(setpoint: pb.Setpoint, received_at: float) -> HeadendCommand:
    return HeadendCommand(
        command_id=setpoint.command_id,
        asset_id=setpoint.asset_id if setpoint.HasField("asset_id") else None,
        site_id=setpoint.site_id if setpoint.HasField("site_id") else None,
        mw=setpoint.mw,
        duration_s=setpoint.duration_s if setpoint.HasField("duration_s") else None,
        expires_in_ms=setpoint.expires_in_ms if setpoint.HasField("expires_in_ms") else None,
        expires_at=setpoint.expires_at_us / 1e6 if setpoint.HasField("expires_at_us") else None,
        received_at=received_at,
        received_wall=time.time(),
        start_at=setpoint.start_at_us / 1e6 if setpoint.HasField("start_at_us") else None,
        steps=tuple((s.offset_s, s.mw) for s in setpoint.steps),
        cancels=setpoint.cancels if setpoint.HasField("cancels") else None,
    )
