"""A small scripted headend for agent tests: a real ``grpc.aio`` server on 127.0.0.1.

It records every message an agent sends and answers ``Register`` (accepting everything, or
refusing as told; saying it reads telemetry by column unless ``telemetry_columns=False``,
as a headend older than columns). Like the real headend it acknowledges, each switchable
off so a test can withhold it and acknowledge by hand:

* telemetry (``auto_ack``): ``TelemetryAck(seq, stored_through)``, where
  ``stored_through`` is the contiguous watermark of the seqs stored for the agent's
  ``stream_id`` (across streams), lifted to ``floor_seq - 1`` as the headend does;
* final setpoint outcomes (``auto_outcome_ack``): ``SetpointOutcomeAck``;
* agent events (``auto_event_ack``): ``EventAck``;
* local command reports (``auto_local_ack``): ``LocalDispatchAck``.

A test can push setpoints (again, too), close streams, and stop and restart the server on
the same port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import grpc

from der_sdk.models import TelemetrySample
from der_sdk.wire import codec, pb, pb_grpc

DEFAULT_WITHIN_S = 5.0


class FakeStream:
    """One agent stream as the fake headend saw it."""

    def __init__(self) -> None:
        self.register: pb.Register | None = None
        self.messages: list[pb.AgentMessage] = []
        self.outgoing: asyncio.Queue[pb.HeadendMessage | None] = asyncio.Queue()
        self.closed = False

    def _of(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for m in self.messages if m.WhichOneof("msg") == kind]

    @property
    def stream_id(self) -> str:
        return self.register.stream_id if self.register is not None else ""

    @property
    def batches(self) -> list[pb.TelemetryBatch]:
        return self._of("telemetry")

    @property
    def seqs(self) -> list[int]:
        """Telemetry batch seqs in the order they arrived."""
        return [b.seq for b in self.batches]

    @property
    def heartbeats(self) -> list[pb.Heartbeat]:
        return self._of("heartbeat")

    @property
    def setpoint_acks(self) -> list[pb.SetpointAck]:
        return self._of("setpoint_ack")

    def final_acks(self, command_id: str | None = None) -> list[pb.SetpointAck]:
        """Setpoint acks with a final status (not ``acked``), of one command or all."""
        return [
            a
            for a in self.setpoint_acks
            if a.status != "acked" and (command_id is None or a.command_id == command_id)
        ]

    @property
    def events(self) -> list[pb.AgentEvent]:
        return self._of("event")

    @property
    def local_dispatches(self) -> list[pb.LocalDispatch]:
        return self._of("local_dispatch")

    def samples(self) -> list[TelemetrySample]:
        return [s for b in self.batches for s in codec.samples_from_batch(b)]

    def send(self, message: pb.HeadendMessage) -> None:
        self.outgoing.put_nowait(message)

    def ack(self, seq: int, stored_through: int = 0) -> None:
        self.send(codec.headend_telemetry_ack(seq, stored_through))

    def outcome_ack(self, command_id: str) -> None:
        self.send(codec.headend_outcome_ack(command_id))

    def event_ack(self, event_id: str) -> None:
        self.send(codec.headend_event_ack(event_id))

    def close(self) -> None:
        """End the stream from the headend side (status OK)."""
        self.outgoing.put_nowait(None)


class _Servicer(pb_grpc.AgentLinkServicer):
    def __init__(self, headend: FakeHeadend) -> None:
        self.headend = headend

    async def Stream(self, request_iterator: Any, context: Any) -> None:
        stream = FakeStream()
        self.headend.streams.append(stream)
        reader = asyncio.create_task(self._read(stream, context))
        try:
            while True:
                message = await stream.outgoing.get()
                if message is None:
                    return
                await context.write(message)
        finally:
            reader.cancel()
            stream.closed = True

    async def _read(self, stream: FakeStream, context: Any) -> None:
        headend = self.headend
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                stream.messages.append(message)
                kind = message.WhichOneof("msg")
                if kind == "register":
                    stream.register = message.register
                    ids = [a.asset_id for a in message.register.assets]
                    if not headend.accept:
                        stream.send(codec.headend_register_ack([], {}, headend.refuse_message))
                        stream.close()
                        continue
                    for early in headend.before_register_ack:
                        stream.send(early)
                    accepted = [a for a in ids if a not in headend.refuse]
                    refused = {a: r for a, r in headend.refuse.items() if a in ids}
                    ack = codec.headend_register_ack(accepted, refused)
                    ack.register_ack.telemetry_columns = headend.telemetry_columns
                    stream.send(ack)
                elif kind == "telemetry" and headend.auto_ack:
                    batch = message.telemetry
                    through = headend.store(stream.stream_id, batch.seq, batch.floor_seq)
                    stream.ack(batch.seq, through)
                elif kind == "setpoint_ack" and headend.auto_outcome_ack:
                    if message.setpoint_ack.status != "acked":
                        stream.outcome_ack(message.setpoint_ack.command_id)
                elif kind == "event" and headend.auto_event_ack:
                    stream.event_ack(message.event.event_id)
                elif kind == "local_dispatch" and headend.auto_local_ack:
                    stream.send(codec.headend_local_dispatch_ack(message.local_dispatch.command_id))
        finally:
            stream.close()


class FakeHeadend:
    """A scriptable AgentLink server. ``async with FakeHeadend() as headend: ...``"""

    def __init__(
        self,
        *,
        auto_ack: bool = True,
        auto_outcome_ack: bool = True,
        auto_event_ack: bool = True,
        auto_local_ack: bool = True,
        accept: bool = True,
        refuse: Mapping[str, str] | None = None,
        refuse_message: str = "agent not allowed",
        before_register_ack: Sequence[pb.HeadendMessage] = (),
        telemetry_columns: bool = True,
    ) -> None:
        self.auto_ack = auto_ack
        self.auto_outcome_ack = auto_outcome_ack
        self.auto_event_ack = auto_event_ack
        self.auto_local_ack = auto_local_ack
        self.accept = accept
        self.refuse = dict(refuse or {})
        self.refuse_message = refuse_message
        self.before_register_ack = list(before_register_ack)
        self.telemetry_columns = telemetry_columns  # False: a headend older than columns
        self.port = 0
        self.streams: list[FakeStream] = []
        self.stored: dict[str, set[int]] = {}  # stream_id -> seqs stored
        self.watermarks: dict[str, int] = {}  # stream_id -> stored_through
        self._server: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def store(self, stream_id: str, seq: int, floor_seq: int) -> int:
        """Record batch ``seq`` as stored; return the stream's new ``stored_through``."""
        stored = self.stored.setdefault(stream_id, set())
        stored.add(seq)
        mark = max(self.watermarks.get(stream_id, 0), floor_seq - 1)
        while mark + 1 in stored:
            mark += 1
        self.watermarks[stream_id] = mark
        return mark

    async def start(self) -> FakeHeadend:
        server = grpc.aio.server()
        pb_grpc.add_AgentLinkServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace=None)

    async def restart(self) -> None:
        """Start again on the same port (after :meth:`stop`)."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> FakeHeadend:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ waiting

    async def wait_for(self, predicate: Callable[[], Any], within: float = DEFAULT_WITHIN_S) -> Any:
        """Poll ``predicate`` until it returns something truthy; return that."""
        async with asyncio.timeout(within):
            while True:
                result = predicate()
                if result:
                    return result
                await asyncio.sleep(0.01)

    async def wait_stream(self, index: int = 0, within: float = DEFAULT_WITHIN_S) -> FakeStream:
        """The ``index``-th stream, once its agent has registered."""
        return await self.wait_for(  # type: ignore[no-any-return]
            lambda: (
                len(self.streams) > index
                and self.streams[index].register is not None
                and self.streams[index]
            ),
            within,
        )

    @property
    def latest(self) -> FakeStream:
        return self.streams[-1]

    # ------------------------------------------------------------------ commands

    def send_setpoint(
        self,
        command_id: str,
        mw: float,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        duration_s: float | None = None,
        expires_in_ms: int | None = None,
        expires_at: datetime | None = None,
        stream: FakeStream | None = None,
    ) -> FakeStream:
        """Push a Setpoint down ``stream`` (default: the latest); returns the stream."""
        target = stream or self.latest
        target.send(
            codec.headend_setpoint(
                command_id,
                mw,
                asset_id=asset_id,
                site_id=site_id,
                duration_s=duration_s,
                expires_in_ms=expires_in_ms,
                expires_at=expires_at,
            )
        )
        return target

    async def setpoint(
        self,
        command_id: str,
        mw: float,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        duration_s: float | None = None,
        expires_in_ms: int | None = None,
        expires_at: datetime | None = None,
        stream: FakeStream | None = None,
        within: float = DEFAULT_WITHIN_S,
    ) -> pb.SetpointAck:
        """Push a Setpoint and wait for the final ack that answers it."""
        target = stream or self.latest
        seen = len(target.final_acks(command_id))
        self.send_setpoint(
            command_id,
            mw,
            asset_id=asset_id,
            site_id=site_id,
            duration_s=duration_s,
            expires_in_ms=expires_in_ms,
            expires_at=expires_at,
            stream=target,
        )

        def answered() -> pb.SetpointAck | None:
            acks = target.final_acks(command_id)
            return acks[seen] if len(acks) > seen else None

        return await self.wait_for(answered, within)  # type: ignore[no-any-return]

    def close_streams(self) -> None:
        for stream in self.streams:
            if not stream.closed:
                stream.close()
