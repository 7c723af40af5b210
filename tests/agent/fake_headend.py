"""A small scripted headend for agent tests: a real ``grpc.aio`` server on 127.0.0.1.

It records every message an agent sends, answers ``Register`` (accepting everything, or
refusing as told), acknowledges telemetry batches (unless ``auto_ack`` is off), and lets a
test push setpoints, close streams, and stop and restart the server on the same port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
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
    def batches(self) -> list[pb.TelemetryBatch]:
        return self._of("telemetry")

    @property
    def heartbeats(self) -> list[pb.Heartbeat]:
        return self._of("heartbeat")

    @property
    def setpoint_acks(self) -> list[pb.SetpointAck]:
        return self._of("setpoint_ack")

    def samples(self) -> list[TelemetrySample]:
        return [s for b in self.batches for s in codec.samples_from_batch(b)]

    def ack(self, seq: int) -> None:
        self.outgoing.put_nowait(codec.headend_telemetry_ack(seq))

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
                        stream.outgoing.put_nowait(
                            codec.headend_register_ack([], {}, headend.refuse_message)
                        )
                        stream.close()
                        continue
                    for early in headend.before_register_ack:
                        stream.outgoing.put_nowait(early)
                    accepted = [a for a in ids if a not in headend.refuse]
                    refused = {a: r for a, r in headend.refuse.items() if a in ids}
                    stream.outgoing.put_nowait(codec.headend_register_ack(accepted, refused))
                elif kind == "telemetry" and headend.auto_ack:
                    stream.ack(message.telemetry.seq)
        finally:
            stream.close()


class FakeHeadend:
    """A scriptable AgentLink server. ``async with FakeHeadend() as headend: ...``"""

    def __init__(
        self,
        *,
        auto_ack: bool = True,
        accept: bool = True,
        refuse: Mapping[str, str] | None = None,
        refuse_message: str = "agent not allowed",
        before_register_ack: Sequence[pb.HeadendMessage] = (),
    ) -> None:
        self.auto_ack = auto_ack
        self.accept = accept
        self.refuse = dict(refuse or {})
        self.refuse_message = refuse_message
        self.before_register_ack = list(before_register_ack)
        self.port = 0
        self.streams: list[FakeStream] = []
        self._server: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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

    async def setpoint(
        self,
        command_id: str,
        mw: float,
        *,
        asset_id: str | None = None,
        site_id: str | None = None,
        duration_s: float | None = None,
        stream: FakeStream | None = None,
        within: float = DEFAULT_WITHIN_S,
    ) -> pb.SetpointAck:
        """Push a Setpoint down ``stream`` (default: the latest) and wait for its ack."""
        target = stream or self.latest
        target.outgoing.put_nowait(
            codec.headend_setpoint(
                command_id, mw, asset_id=asset_id, site_id=site_id, duration_s=duration_s
            )
        )

        def acked() -> pb.SetpointAck | None:
            return next((a for a in target.setpoint_acks if a.command_id == command_id), None)

        return await self.wait_for(acked, within)  # type: ignore[no-any-return]

    def close_streams(self) -> None:
        for stream in self.streams:
            if not stream.closed:
                stream.close()
