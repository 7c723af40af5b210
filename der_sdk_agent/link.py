"""The outbound link to the headend: one bidirectional gRPC stream, kept open.

Per attempt: open a channel, send ``Register``, wait for ``RegisterAck``; then run

* one **writer** (the only task that writes to the call): setpoint acks first, then
  reports of local commands (``LocalDispatch``), then a heartbeat when due, then telemetry
  batches from the outbox, each with a per-stream ``seq`` starting at 1;
* one **reader**: ``Setpoint`` goes to the dispatch worker, ``TelemetryAck`` drops the
  acknowledged batches from the outbox, ``LocalDispatchAck`` drops the acknowledged report;
* one **dispatch worker**: applies setpoints in arrival order and queues their acks.

Any error or end of stream ends the attempt with one log line, and the link reconnects
after a capped exponential backoff with **equal jitter**: for attempt *n* the cap is
``min(reconnect_max_s, reconnect_initial_s * 2**(n-1))`` and the delay is uniform in
``[cap/2, cap]``. Equal jitter (rather than full jitter) keeps a floor under the delay,
so an agent never spins on a headend that refuses it, while a fleet restarting together
still spreads out. The attempt count resets after a successful register. Batches sent
but not acknowledged stay in the outbox and are sent again, in order, on the next stream.
So do local command reports (at most :data:`MAX_UNACKED_LOCAL_DISPATCHES`, oldest dropped
first): commands made while the headend was unreachable reach its history on reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from der_sdk.models import utc_now
from der_sdk.wire import codec, pb, pb_grpc
from der_sdk_agent.dispatch import Dispatcher
from der_sdk_agent.outbox import Outbox

__all__ = ["Backoff", "HeadendLink", "LinkStats", "RegisterRefused", "StreamEnded"]

log = logging.getLogger("der.agent.link")

DEFAULT_REGISTER_TIMEOUT_S = 10.0
MAX_UNACKED_LOCAL_DISPATCHES = 1000

_CHANNEL_OPTIONS = (
    # One TCP connection per agent, even when several agents share a process (der launch,
    # the demo): the headend then sees each agent's own peer, as in the field.
    ("grpc.use_local_subchannel_pool", 1),
    # Pings find a dead link between telemetry batches; the headend accepts this rate
    # (der_sdk_headend.service.GRPC_SERVER_OPTIONS).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


class StreamEnded(Exception):
    """The headend ended the stream."""


class RegisterRefused(Exception):
    """The headend answered ``RegisterAck(accepted=False)``."""


@dataclass
class LinkStats:
    """Counters for tests and operators. ``last_ack_seq`` is for the current stream."""

    connected: bool = False
    registrations: int = 0
    reconnects: int = 0
    failed_attempts: int = 0
    batches_sent: int = 0
    last_ack_seq: int = 0


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with equal jitter (see the module docstring)."""

    initial_s: float
    max_s: float
    rng: random.Random = field(default_factory=random.Random)

    def cap(self, attempt: int) -> float:
        exponent = min(max(attempt - 1, 0), 32)
        return float(min(self.max_s, self.initial_s * 2**exponent))

    def delay(self, attempt: int) -> float:
        cap = self.cap(attempt)
        return cap / 2 + self.rng.uniform(0, cap / 2)


@dataclass
class _Stream:
    """State of one stream: it starts fresh on every attempt."""

    call: Any
    seq: int = 0
    last_sent_batch: int = 0
    in_flight: dict[int, int] = field(default_factory=dict)  # stream seq -> batch number
    acks: collections.deque[pb.AgentMessage] = field(default_factory=collections.deque)
    setpoints: asyncio.Queue[pb.Setpoint] = field(default_factory=asyncio.Queue)
    local_sent: set[str] = field(default_factory=set)  # LocalDispatch command ids


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


class HeadendLink:
    """Keeps the agent's stream to the headend open until cancelled."""

    def __init__(
        self,
        *,
        headend: str,
        agent_id: str,
        site_id: str,
        adapters: Mapping[str, str],
        sdk_version: str,
        plugin_versions: Mapping[str, str],
        outbox: Outbox,
        dispatcher: Dispatcher,
        heartbeat_interval_s: float,
        backoff: Backoff,
        register_timeout_s: float = DEFAULT_REGISTER_TIMEOUT_S,
    ) -> None:
        self.headend = headend
        self.agent_id = agent_id
        self.site_id = site_id
        self.adapters = dict(adapters)
        self.sdk_version = sdk_version
        self.plugin_versions = dict(plugin_versions)
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.heartbeat_interval_s = heartbeat_interval_s
        self.backoff = backoff
        self.register_timeout_s = register_timeout_s
        self.stats = LinkStats()
        self.accepted_asset_ids: tuple[str, ...] = ()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._started = time.monotonic()
        self._registered = False
        self._local_unacked: dict[str, pb.AgentMessage] = {}  # command id -> LocalDispatch
        outbox.add_listener(self._wake.set)
        dispatcher.add_local_listener(self._on_local_dispatch)

    async def wait_connected(self) -> None:
        """Return once the agent is registered on a live stream."""
        await self._connected.wait()

    @property
    def unacked_local_dispatches(self) -> int:
        """Local command reports the headend has not acknowledged yet."""
        return len(self._local_unacked)

    def _on_local_dispatch(self, report: codec.LocalDispatchReport) -> None:
        self._local_unacked[report.command_id] = codec.agent_local_dispatch(report)
        while len(self._local_unacked) > MAX_UNACKED_LOCAL_DISPATCHES:
            dropped = next(iter(self._local_unacked))
            del self._local_unacked[dropped]
            log.warning(
                "%d local command reports await the headend; dropped the oldest, %s",
                MAX_UNACKED_LOCAL_DISPATCHES,
                dropped,
            )
        self._wake.set()

    # ------------------------------------------------------------------ reconnect loop

    async def run(self) -> None:
        """Connect, serve the stream, reconnect on failure; forever, until cancelled."""
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
            finally:
                self.stats.connected = False
                self._connected.clear()
            if self._registered:
                attempt = 1  # a good register resets the backoff
                what = "connection lost"
            else:
                self.stats.failed_attempts += 1
                what = "refused registration" if level == logging.ERROR else "unreachable"
            delay = self.backoff.delay(attempt)
            log.log(
                level,
                "headend %s %s (attempt %d): %s; retrying in %.1f s",
                self.headend,
                what,
                attempt,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self) -> None:
        """Register and serve one stream; ends by raising (stream end is StreamEnded)."""
        self._registered = False
        channel = grpc.aio.insecure_channel(self.headend, options=_CHANNEL_OPTIONS)
        call: Any = None
        try:
            call = pb_grpc.AgentLinkStub(channel).Stream()  # type: ignore[no-untyped-call]
            stream = _Stream(call=call)
            register = codec.agent_register(
                agent_id=self.agent_id,
                site_id=self.site_id,
                assets=self.adapters,
                sdk_version=self.sdk_version,
                plugins=self.plugin_versions,
            )
            try:
                async with asyncio.timeout(self.register_timeout_s):
                    await call.write(register)
                    first = await call.read()
                    # Tolerate a headend that queues a setpoint before its RegisterAck:
                    # keep it and apply it once registered, in order.
                    while first is not grpc.aio.EOF and first.WhichOneof("msg") == "setpoint":
                        stream.setpoints.put_nowait(first.setpoint)
                        first = await call.read()
            except TimeoutError:
                raise StreamEnded(f"no RegisterAck within {self.register_timeout_s:g} s") from None
            self._on_register_ack(first)
            self._registered = True
            await self._serve(stream)
        finally:
            if call is not None:
                call.cancel()
            await channel.close()

    def _on_register_ack(self, message: Any) -> None:
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
        resend = ""
        if self.stats.registrations:
            self.stats.reconnects += 1
            resend = f"; {len(self.outbox)} unacknowledged sample(s) to send" if self.outbox else ""
        self.stats.registrations += 1
        self.stats.connected = True
        self.stats.last_ack_seq = 0
        self._connected.set()
        log.info(
            "registered with headend %s as agent %s: %d asset(s) accepted, %d refused%s",
            self.headend,
            self.agent_id,
            len(ack.accepted_asset_ids),
            len(ack.refused),
            resend,
        )

    async def _serve(self, stream: _Stream) -> None:
        # The reader first: when the stream ends, its error says why; a failed write
        # racing it says less.
        tasks = [
            asyncio.create_task(self._reader(stream), name="der-agent-link-reader"),
            asyncio.create_task(self._writer(stream), name="der-agent-link-writer"),
            asyncio.create_task(self._dispatch_worker(stream), name="der-agent-link-dispatch"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
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
        heartbeat_due = loop.time() + self.heartbeat_interval_s
        while True:
            self._wake.clear()
            while stream.acks:
                await stream.call.write(stream.acks.popleft())
            for command_id, report in list(self._local_unacked.items()):
                if command_id not in stream.local_sent:
                    await stream.call.write(report)
                    stream.local_sent.add(command_id)
            if loop.time() >= heartbeat_due:
                await stream.call.write(
                    codec.agent_heartbeat(
                        self.agent_id, utc_now(), time.monotonic() - self._started
                    )
                )
                heartbeat_due = loop.time() + self.heartbeat_interval_s
            batch = self.outbox.after(stream.last_sent_batch)
            if batch is not None:
                stream.seq += 1
                await stream.call.write(codec.agent_telemetry(stream.seq, batch.samples))
                stream.in_flight[stream.seq] = batch.number
                stream.last_sent_batch = batch.number
                self.stats.batches_sent += 1
                continue
            try:
                async with asyncio.timeout(max(0.0, heartbeat_due - loop.time())):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ reader

    async def _reader(self, stream: _Stream) -> None:
        while True:
            message = await stream.call.read()
            if message is grpc.aio.EOF:
                raise StreamEnded("headend closed the stream")
            kind = message.WhichOneof("msg")
            if kind == "setpoint":
                stream.setpoints.put_nowait(message.setpoint)
            elif kind == "telemetry_ack":
                self._on_telemetry_ack(stream, message.telemetry_ack.seq)
            elif kind == "local_dispatch_ack":
                self._local_unacked.pop(message.local_dispatch_ack.command_id, None)
            else:
                log.debug("ignoring headend message %s on an open stream", kind)

    def _on_telemetry_ack(self, stream: _Stream, seq: int) -> None:
        acked = [s for s in stream.in_flight if s <= seq]
        if acked:
            self.outbox.ack_through(max(stream.in_flight[s] for s in acked))
            for s in acked:
                del stream.in_flight[s]
        self.stats.last_ack_seq = max(self.stats.last_ack_seq, seq)

    async def _dispatch_worker(self, stream: _Stream) -> None:
        while True:
            setpoint = await stream.setpoints.get()
            outcome = await self.dispatcher.handle(
                setpoint.command_id,
                asset_id=setpoint.asset_id if setpoint.HasField("asset_id") else None,
                site_id=setpoint.site_id if setpoint.HasField("site_id") else None,
                mw=setpoint.mw,
                duration_s=setpoint.duration_s if setpoint.HasField("duration_s") else None,
            )
            stream.acks.append(
                codec.agent_setpoint_ack(
                    outcome.command_id, outcome.status, outcome.allocations, outcome.reason
                )
            )
            self._wake.set()
