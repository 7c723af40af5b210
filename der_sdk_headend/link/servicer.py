"""The ``AgentLink.Stream`` handler: one bidirectional stream per agent.

The life of a stream:

1. The first message must be ``Register`` within :data:`REGISTER_TIMEOUT_S`, else the
   stream is aborted with ``INVALID_ARGUMENT``.

2. Where the inventory binds agents to the Register's site (or the headend requires
   client certificates), the agent's identity (certificate or token) must be bound to
   that site and every asset it names must be of that site
   (:mod:`der_sdk_headend.link.identity`). Else the whole stream is refused
   (``PERMISSION_DENIED`` or ``UNAUTHENTICATED``): logged, audited (``agent.refused``),
   recorded as one ``registration_refused`` event, answered with
   ``RegisterAck(accepted=False)``; nothing else is written.
3. Each asset in it must be in the inventory and belong to the Register's ``site_id``.
   Refusals are logged, recorded as ``registration_refused`` events and listed in the
   ``RegisterAck``. When nothing is accepted the agent gets ``RegisterAck(accepted=False)``
   and the stream is aborted with ``PERMISSION_DENIED``.
4. Accepted: ``RegisterAck``, sessions opened, pending dispatches for its assets sent.
   A ``Register`` with ``probe`` set (``der commission``) stops before this step: after
   the identity check of step 2 (whose refusals are recorded as usual: a refused
   certificate is worth an audit record, probe or not) it is answered with a
   ``RegisterAck`` (``probe`` set) naming the assets that would be accepted and refused,
   and the stream ends with ``OK``. No session is opened, no command sent, no per-asset
   refusal recorded: a probe never disturbs the agent serving the site.
5. Then ``TelemetryBatch`` → space reserved in the ingest queue for its raw sample count
   (while the queue is full the reader waits with the batch undecoded, which is the
   stream's flow control) → a turn to decode (:mod:`der_sdk_headend.ingest.turns`: one
   pass of the event loop decodes at most about 2 ms of telemetry, so what is not
   telemetry never waits behind a burst of it) → decoded (a sample that does not decode
   is logged with its asset and skipped) → the ingest queue (acknowledged once stored),
   ``Heartbeat`` → stored once per served asset through the same writer (a clock out of
   range is logged and replaced by the headend's), ``SetpointAck`` → dispatcher (a final
   outcome is answered with ``SetpointOutcomeAck``), ``LocalDispatch`` → recorded by the
   dispatcher (source ``local``), then acknowledged with ``LocalDispatchAck``,
   ``AgentEvent`` → stored as an event, then acknowledged with ``EventAck``.

Ingest, dispatch and presence see only :mod:`der_sdk.models`: this module decodes what
the agent sends through :mod:`der_sdk.wire.codec`, and encodes what the stream's outbox
holds (domain acks and commands, or a reply it built itself) as it writes it.

The handler coroutine is the stream's only writer: it drains the stream's outbox, so
messages from ingest, dispatch and registration never interleave. A reader task handles
what the agent sends. Whatever ends the stream, ``finally`` closes its sessions.

The stream is read as bytes (:func:`add_agent_link`) and parsed here, so that bytes which
are not an ``AgentMessage``, first or later, end the stream with ``INVALID_ARGUMENT`` and a
one-line reason, logged as one WARNING (naming the agent once it registered), instead of
grpc's deserializer failing (an ERROR traceback, then ``UNKNOWN``, or ``OK`` once
registered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, NoReturn, TypeVar, cast

import grpc

from der_sdk.errors import UnknownNameError
from der_sdk.inventory import Inventory
from der_sdk.models import AgentHeartbeat, Asset, Event, utc_now
from der_sdk.storage.contract import StorageBackend
from der_sdk.wire import codec, pb
from der_sdk_headend.audit import Actor, Auditor
from der_sdk_headend.config import AgentIdentityMode
from der_sdk_headend.dispatch import Dispatcher
from der_sdk_headend.ingest import TelemetryIngest
from der_sdk_headend.ingest.turns import DecodeTurns
from der_sdk_headend.link.identity import (
    AgentAuthorizer,
    FrontPeer,
    Refusal,
    certificate_not_after,
    front_peer,
)
from der_sdk_headend.presence import AgentStream, Presence

__all__ = ["REGISTER_TIMEOUT_S", "AgentLinkService", "add_agent_link"]

log = logging.getLogger("der.headend.link")

REGISTER_TIMEOUT_S = 10.0
"""How long a new stream may take to send its ``Register``."""
HELD_READ_S = 0.05
"""How long a stream's reader keeps queue space it took before reading the stream's next
message (the ingest queue was full) when that message does not come: then it gives the
space back, so an agent with nothing more to send holds none."""


def add_agent_link(link: AgentLinkService, server: grpc.aio.Server) -> None:
    """Serve ``link`` as ``der.v1.AgentLink`` on ``server``.

    Unlike the generated ``add_AgentLinkServicer_to_server``, requests reach the handler
    as bytes: a message that does not parse is then the handler's to refuse.
    """
    service = pb.DESCRIPTOR.services_by_name["AgentLink"].full_name
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            link.Stream,
            request_deserializer=None,
            response_serializer=pb.HeadendMessage.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class AgentLinkService:
    """The ``der.v1.AgentLink`` servicer of the headend.

    :param auditor: writes ``agent.refused`` records; default: one on ``storage``.
    :param mtls: the headend requires client certificates (identity from the certificate).
    :param agent_identity: how a client certificate names an agent.
    :param front: the TLS front's connections (:mod:`der_sdk_headend.link.tls_front`):
        when given, every stream must have come through the front; the agent's address
        and certificate are taken from there, and a stream that did not (someone dialling
        the internal port) is refused and audited.
    """

    def __init__(
        self,
        *,
        inventory: Inventory,
        storage: StorageBackend,
        presence: Presence,
        ingest: TelemetryIngest,
        dispatcher: Dispatcher,
        register_timeout_s: float = REGISTER_TIMEOUT_S,
        auditor: Auditor | None = None,
        mtls: bool = False,
        agent_identity: AgentIdentityMode = "fingerprint",
        front: dict[int, FrontPeer] | None = None,
    ) -> None:
        self._inventory = inventory
        self._storage = storage
        self._presence = presence
        self._ingest = ingest
        self._turns = DecodeTurns()
        self._dispatcher = dispatcher
        self._register_timeout_s = register_timeout_s
        self._auditor = auditor if auditor is not None else Auditor(storage)
        self._front = front
        self._mtls = mtls
        self.authorizer = AgentAuthorizer(
            inventory, mtls=mtls, identity_mode=agent_identity, front=front
        )
        self._closing = False
        self._handlers = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def close_all(self, grace_s: float) -> None:
        """End every live stream, refuse new ones, and wait up to ``grace_s`` for the
        handlers to finish (headend stopping)."""
        self._closing = True
        for stream in self._presence.streams():
            stream.end()
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "%d agent stream(s) still open after %gs; cancelling", self._handlers, grace_s
            )

    async def Stream(
        self,
        request_iterator: AsyncIterator[bytes],  # not used: see _next_message
        context: Any,
    ) -> None:
        peer = str(context.peer())
        came_in: FrontPeer | None = None
        if self._front is not None:
            came_in = front_peer(peer, self._front)
            if came_in is None:
                await self._refuse_bypass(context, peer)
            peer = came_in.peer
        cert_not_after = (
            certificate_not_after(context, came_in, self._front) if self._mtls else None
        )
        if self._closing:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the headend is shutting down")
        self._handlers += 1
        self._idle.clear()
        try:
            await self._serve(context, peer, cert_not_after)
        finally:
            self._handlers -= 1
            if not self._handlers:
                self._idle.set()

    async def _serve(self, context: Any, peer: str, cert_not_after: datetime | None) -> None:
        register = await self._first_register(context, peer)
        await self._authorize(register, context, peer)
        if register.probe:
            await self._answer_probe(register, context, peer)
            return
        accepted, refused = await self._check_register(register, peer)
        if not accepted:
            message = f"no asset accepted for agent {register.agent_id}; see refused"
            await context.write(codec.headend_register_ack([], refused, message))
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"registration refused: {_refusals(refused)}",
            )

        # Accepted assets all belong to the Register's site; take its canonical id.
        stream = AgentStream(
            agent_id=register.agent_id,
            site_id=accepted[0].site_id,
            peer=peer,
            telemetry_stream=register.stream_id,
            certificate_not_after=cert_not_after,
        )
        reader: asyncio.Task[str | None] | None = None
        try:
            await self._presence.attach(stream, accepted)
            if self._closing:  # the headend began stopping while this stream registered
                stream.end()
            message = "accepted" if not refused else f"accepted; refused: {_refusals(refused)}"
            stream.send(
                codec.headend_register_ack([a.asset_id for a in accepted], refused, message)
            )
            log.info(
                "agent %s connected: site %s, assets %s, peer %s",
                stream.agent_id,
                stream.site_id,
                ", ".join(stream.asset_ids),
                peer,
            )
            await self._dispatcher.deliver_pending(stream)
            reader = asyncio.create_task(
                self._read(context, stream), name=f"agent-link-read-{stream.agent_id}"
            )
            while True:
                outgoing = await stream.outbox.get()
                if outgoing is None:
                    break
                wire = codec.headend_message(outgoing)
                if isinstance(wire, pb.HeadendMessage):  # for the agent's clock offset
                    wire.sent_at_us = time.time_ns() // 1000
                await context.write(wire)
            if reader.done() and not reader.cancelled() and (refusal := reader.result()):
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, refusal)
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            assets = ", ".join(stream.asset_ids) or "-"
            await self._presence.detach(stream)
            await self._dispatcher.on_stream_end(stream)
            log.info(
                "agent %s disconnected: site %s, assets %s, peer %s",
                stream.agent_id,
                stream.site_id,
                assets,
                peer,
            )

    # ------------------------------------------------------------------ register

    async def _first_register(self, context: Any, peer: str) -> pb.Register:
        try:
            async with asyncio.timeout(self._register_timeout_s):
                raw = await _next_message(context)
        except TimeoutError:
            log.warning(
                "stream from %s sent no Register within %gs", peer, self._register_timeout_s
            )
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first message must be Register, within {self._register_timeout_s:g} s",
            )
        if raw is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "stream ended before Register")
        try:
            first = codec.parse_agent_message(raw)
        except ValueError as exc:
            reason = f"the first message must be Register; got {exc}"
            log.warning("stream from %s refused (INVALID_ARGUMENT): %s", peer, reason)
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, reason)
        if first.WhichOneof("msg") != "register":
            log.warning("stream from %s began with %s, not Register", peer, first.WhichOneof("msg"))
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first message must be Register, got {first.WhichOneof('msg') or 'nothing'}",
            )
        register: pb.Register = first.register
        if not register.agent_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "Register.agent_id is empty")
        return register

    async def _answer_probe(self, register: pb.Register, context: Any, peer: str) -> None:
        """Say which assets a real Register would get accepted; open nothing."""
        accepted, refused = await self._check_register(register, peer, record=False)
        ids = [a.asset_id for a in accepted]
        log.info(
            "commissioning probe from agent %s (peer %s), site %s: would accept %s; refuse %s",
            register.agent_id,
            peer,
            register.site_id or "-",
            ", ".join(ids) or "none",
            _refusals(refused) if refused else "none",
        )
        message = (
            "probe: nothing opened" if not refused else f"probe; refused: {_refusals(refused)}"
        )
        await context.write(codec.headend_register_ack(ids, refused, message, probe=True))

    async def _check_register(
        self, register: pb.Register, peer: str, *, record: bool = True
    ) -> tuple[list[Asset], dict[str, str]]:
        """The accepted assets and the refused ones (asset id → reason); each refusal
        logged and stored as an event unless ``record`` is false (a probe)."""
        accepted: list[Asset] = []
        refused: dict[str, str] = {}
        site_id = register.site_id
        site_known = True
        try:
            site_id = self._inventory.site(register.site_id).site_id
        except UnknownNameError:
            site_known = False
        for served in register.assets:
            reason = None
            asset = None
            if not site_known:
                reason = f"site {register.site_id or '<empty>'} is not in the inventory"
            else:
                try:
                    asset = self._inventory.asset(served.asset_id)
                except UnknownNameError:
                    reason = "not in the inventory"
                else:
                    if asset.site_id != site_id:
                        reason = f"belongs to site {asset.site_id}, not {site_id}"
                    elif any(a.asset_id == asset.asset_id for a in accepted):
                        reason = "listed twice in Register"
            if reason is None and asset is not None:
                accepted.append(asset)
                continue
            reason = reason or "refused"
            refused[served.asset_id] = reason
            if record:
                await self._refuse(register, peer, served.asset_id, reason)
        if not register.assets:
            refused[""] = "Register lists no assets"
            if record:
                await self._refuse(register, peer, "", "Register lists no assets")
        return accepted, refused

    async def _refuse(self, register: pb.Register, peer: str, asset_id: str, reason: str) -> None:
        log.warning(
            "registration refused: agent %s, peer %s, site %s, asset %s: %s",
            register.agent_id,
            peer,
            register.site_id,
            asset_id or "-",
            reason,
        )
        await self._storage.append_event(
            Event(
                ts=utc_now(),
                kind="registration_refused",
                message=f"agent {register.agent_id} ({peer}) may not serve asset "
                f"{asset_id or '-'}: {reason}",
                asset_id=asset_id or None,
                site_id=register.site_id or None,
                data={"agent_id": register.agent_id, "peer": peer, "reason": reason},
            )
        )

    # ------------------------------------------------------------------ identity

    async def _refuse_bypass(self, context: Any, peer: str) -> NoReturn:
        """A stream on the internal port that did not come through the TLS front."""
        reason = "the connection did not come through the headend's TLS front"
        log.warning("agent stream refused (PERMISSION_DENIED): peer %s: %s", peer, reason)
        await self._auditor.record(
            "agent.refused",
            actor=Actor(kind="agent", name="unknown (not through the TLS front)"),
            source=peer,
            outcome="refused",
            message=f"agent stream from {peer} refused: {reason}",
            reason=reason,
            code=grpc.StatusCode.PERMISSION_DENIED.name,
            auth="mtls",
            stage="front",
        )
        await _abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)

    async def _authorize(self, register: pb.Register, context: Any, peer: str) -> None:
        """Return when the agent may serve the Register's site; else refuse the stream."""
        verdict = self.authorizer.check(register, context)
        if isinstance(verdict, Refusal):
            await self._refuse_stream(register, context, peer, verdict)
        if verdict.identity is not None:
            log.info(
                "agent %s (peer %s) proved %s for site %s",
                register.agent_id,
                peer,
                verdict.identity,
                register.site_id,
            )

    async def _refuse_stream(
        self, register: pb.Register, context: Any, peer: str, refusal: Refusal
    ) -> NoReturn:
        """Log, audit and record the refusal, tell the agent why, and end the stream."""
        assets = [a.asset_id for a in register.assets]
        log.warning(
            "agent stream refused (%s): identity %s, peer %s, agent %s, claimed site %s, "
            "assets %s: %s",
            refusal.code.name,
            refusal.identity,
            peer,
            register.agent_id or "-",
            register.site_id or "-",
            ", ".join(assets) or "-",
            refusal.reason,
        )
        site_id = self.authorizer.canonical_site_id(register.site_id)
        probe = " (commissioning probe)" if register.probe else ""
        message = f"agent {register.agent_id or '-'} ({peer}){probe} refused: {refusal.reason}"
        await self._auditor.record(
            "agent.refused",
            actor=Actor(kind="agent", name=refusal.identity),
            source=peer,
            outcome="refused",
            message=message,
            site_id=site_id,
            reason=refusal.reason,
            code=refusal.code.name,
            assets=assets,
            **refusal.details,
        )
        event = Event(
            ts=utc_now(),
            kind="registration_refused",
            message=message,
            site_id=site_id,
            data={
                "agent_id": register.agent_id,
                "peer": peer,
                "reason": refusal.reason,
                "identity": refusal.identity,
                "assets": assets,
            },
        )
        try:
            await self._storage.append_event(event)
        except Exception as exc:  # the refusal stands; a storage failure must not hide it
            log.error("registration_refused event not stored: %s: %s", type(exc).__name__, exc)
        text = f"{refusal.code.name}: {refusal.reason}"
        with contextlib.suppress(Exception):  # the agent may be gone; the abort says it all
            await context.write(
                codec.headend_register_ack([], {"": refusal.reason}, text, probe=register.probe)
            )
        await _abort(context, refusal.code, text)

    # ------------------------------------------------------------------ after register

    async def _read(self, context: Any, stream: AgentStream) -> str | None:
        """Handle what the agent sends until its stream ends; return why the stream must
        be refused (``INVALID_ARGUMENT``), or ``None``.

        While the ingest queue is full, the reader does not read the stream's next
        message until it holds queue space for it (as much as the stream's last batch):
        what the agent sends meanwhile waits in gRPC, within the stream's flow-control
        window, not a second time in the headend's own memory.
        """
        expected = 0  # samples in this stream's last telemetry batch
        held = 0  # queue space held for the next message, not handed on yet
        try:
            while True:
                if expected and self._ingest.would_wait(expected):
                    await self._ingest.reserve(stream, expected)
                    held = expected
                raw, held = await self._next(context, held)
                if raw is None:
                    break
                space, held = held, 0  # _receive owns it now
                refusal, samples = await self._receive(stream, raw, space)
                if refusal is not None:
                    return refusal
                if samples is not None:
                    expected = samples
                del raw  # an idle stream holds nothing of what it read last
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as exc:
            log.info("stream of %s broke: %s", stream.describe(), exc)
        except Exception:
            log.exception("stream of %s failed; closing it", stream.describe())
        finally:
            if held:
                self._ingest.unreserve(held)
            stream.end()
        return None

    async def _next(self, context: Any, held: int) -> tuple[bytes | None, int]:
        """The stream's next message (``None`` at its end) and the queue space still held
        for it. What was ``held`` is given back if the message takes longer than
        :data:`HELD_READ_S` to come: an agent with nothing more to send must not keep
        queue space from the others."""
        if not held:
            return await _next_message(context), 0
        read = asyncio.ensure_future(_next_message(context))
        try:
            done, _ = await asyncio.wait((read,), timeout=HELD_READ_S)
            if not done:
                self._ingest.unreserve(held)
                held = 0
            return await read, held
        except BaseException:
            read.cancel()
            if held:
                self._ingest.unreserve(held)
            raise

    async def _receive(
        self, stream: AgentStream, raw: bytes, held: int = 0
    ) -> tuple[str | None, int | None]:
        """Handle one message, with ``held`` samples of queue space already held for it
        (the caller's no longer); return why the stream must be refused (or ``None``)
        and, for a telemetry batch, its raw sample count.

        A telemetry batch first gets ingest queue space for its raw sample count, then a
        turn to decode (:class:`~der_sdk_headend.ingest.turns.DecodeTurns`). While it
        waits for either, the reader holds only the batch's bytes (its parsed form, about
        twice their size, is dropped and parsed again) and reads nothing more from its
        stream, so gRPC flow control holds the agent back; then the batch is decoded into
        the space held.
        """
        try:
            message = codec.parse_agent_message(raw)
        except ValueError as exc:
            if held:
                self._ingest.unreserve(held)
            log.warning("%s refused (INVALID_ARGUMENT): %s", stream.describe(), exc)
            return str(exc), None
        if message.WhichOneof("msg") != "telemetry":
            if held:
                self._ingest.unreserve(held)
            await self._handle(stream, message)
            return None, None
        samples = codec.batch_sample_count(message.telemetry)
        reserved = samples
        parsed: pb.AgentMessage | None = message
        del message
        if held >= samples:
            reserved = held  # queue_batch gives back what the batch does not use
        else:
            if held:
                self._ingest.unreserve(held)
            if not self._ingest.try_reserve(stream, reserved):
                parsed = None  # only the bytes wait
                await self._ingest.reserve(stream, reserved)
        if not self._turns.free:
            parsed = None
            try:
                await self._turns.take()
            except BaseException:
                self._ingest.unreserve(reserved)
                raise
        started = time.perf_counter()
        try:
            if parsed is None:
                parsed = codec.parse_agent_message(raw)  # parsed once already: cannot fail
            self._telemetry(stream, parsed.telemetry, reserved)
        except ValueError as exc:  # columns that do not fit together: nothing was taken
            problem = f"telemetry batch {parsed.telemetry.seq if parsed else '?'}: {exc}"
            log.warning("%s refused (INVALID_ARGUMENT): %s", stream.describe(), problem)
            return problem, None
        finally:
            self._turns.spent(time.perf_counter() - started)
        return None, samples

    async def _handle(self, stream: AgentStream, message: pb.AgentMessage) -> None:
        """Any message but telemetry (:meth:`_receive` handles that)."""
        kind = message.WhichOneof("msg")
        if kind == "heartbeat":
            self._ingest.submit_heartbeat(stream, self._heartbeat(stream, message.heartbeat))
        elif kind == "event":
            self._agent_event(stream, message.event)
        elif kind == "setpoint_ack":
            self._presence.touch(stream)
            try:
                ack = codec.setpoint_ack_from_pb(message.setpoint_ack)
            except ValueError as exc:
                ack = codec.setpoint_ack_from_pb(_with_our_clock(stream, message.setpoint_ack, exc))
            await self._dispatcher.on_ack(stream, ack)
        elif kind == "local_dispatch":
            self._presence.touch(stream)
            try:
                report = codec.local_dispatch_from_pb(message.local_dispatch)
            except ValueError as exc:
                report = codec.local_dispatch_from_pb(
                    _with_our_clock(
                        stream,
                        message.local_dispatch,
                        f"local command {message.local_dispatch.command_id!r}: {exc}",
                    )
                )
            try:
                await self._dispatcher.record_local(stream, report)
            except Exception:  # not acknowledged: the agent sends it again on its next stream
                log.exception(
                    "recording local command %s from %s failed; not acknowledged",
                    report.command_id,
                    stream.describe(),
                )
            else:
                stream.send(codec.headend_local_dispatch_ack(report.command_id))
        elif kind == "register":
            log.warning("%s sent a second Register; ignored", stream.describe())
        else:
            log.warning("%s sent an empty or unknown message; ignored", stream.describe())

    def _telemetry(self, stream: AgentStream, message: pb.TelemetryBatch, reserved: int) -> None:
        """Decode a batch into the ingest queue space ``reserved`` for it."""
        try:
            batch, skipped = codec.telemetry_batch_from_pb(message)
        except BaseException:
            self._ingest.unreserve(reserved)
            raise
        for asset_id, reason in skipped:
            log.warning(
                "skipped a sample from %s for asset %s: %s",
                stream.describe(),
                asset_id or "<none>",
                reason,
            )
        self._ingest.queue_batch(stream, batch, reserved)

    @staticmethod
    def _heartbeat(stream: AgentStream, message: pb.Heartbeat) -> AgentHeartbeat:
        try:
            return codec.agent_heartbeat_from_pb(message)
        except ValueError as exc:  # still proof that the agent is alive
            return codec.agent_heartbeat_from_pb(_with_our_clock(stream, message, exc))

    def _agent_event(self, stream: AgentStream, message: pb.AgentEvent) -> None:
        self._presence.touch(stream)
        if not message.event_id:
            log.warning("%s sent an event without an id; ignored", stream.describe())
            return
        if message.event_id in stream.events_seen:  # sent again before our ack arrived
            stream.send(codec.headend_event_ack(message.event_id))
            return
        if not _in_range(message.ts_us):
            message = _with_our_clock(
                stream, message, f"event {message.event_id!r}: its time is out of range"
            )
        try:
            record = codec.event_from_pb(message)
        except ValueError as exc:
            log.warning(
                "%s sent a malformed event: %s; stored without data", stream.describe(), exc
            )
            record = codec.AgentEventRecord(
                event_id=message.event_id,
                ts=codec.datetime_from_us(message.ts_us),
                kind=message.kind,
                message=message.message,
            )
        stream.events_seen.add(message.event_id)
        asset_id = record.asset_id
        if asset_id is not None and not stream.serves(asset_id):
            asset_id = None
        event = Event(
            ts=min(record.ts, utc_now()),
            kind=record.kind or "agent_event",
            message=record.message or record.kind,
            asset_id=asset_id,
            site_id=stream.site_id,
            data={**record.data, "agent_id": stream.agent_id, "event_id": record.event_id},
        )
        log.info("event from %s: %s: %s", stream.describe(), event.kind, event.message)
        self._ingest.submit_event(event, ack=(stream, record.event_id))


def _refusals(refused: dict[str, str]) -> str:
    return "; ".join(f"{asset or '-'}: {reason}" for asset, reason in refused.items())


async def _next_message(context: Any) -> bytes | None:
    """The stream's next message, ``None`` once the agent closed its side.

    Read with ``context.read()``, never the request iterator: grpc aio's iterator is an
    async generator that keeps the last message it yielded until the next one arrives, so
    every stream waiting (for queue space, or for its agent) before its next read kept its
    last batch, about 8 KB by column, 40 MB at 5,000 streams (docs/performance.md, "Memory
    per loaded stream, a third pass")."""
    message = await context.read()
    if message is grpc.aio.EOF:
        return None
    return cast(bytes, message)


async def _abort(context: Any, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover


_TimedMessage = TypeVar(
    "_TimedMessage", pb.Heartbeat, pb.SetpointAck, pb.LocalDispatch, pb.AgentEvent
)


def _in_range(ts_us: int) -> bool:
    try:
        codec.datetime_from_us(ts_us)
    except ValueError:
        return False
    return True


def _with_our_clock(
    stream: AgentStream, message: _TimedMessage, problem: ValueError | str
) -> _TimedMessage:
    """A copy of ``message`` stamped with the headend's clock, for an agent whose clock
    is beyond what a datetime holds: the message is kept and acknowledged, so the agent
    does not send it again on every stream (one WARNING)."""
    log.warning("%s: %s; kept with the headend's clock", stream.describe(), problem)
    stamped = type(message)()
    stamped.CopyFrom(message)
    stamped.ts_us = codec.datetime_to_us(utc_now())
    return stamped
