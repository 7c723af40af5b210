"""The TLS front of the agent port under mutual TLS.

gRPC's own TLS refuses a bad client certificate inside its C core, where the headend
cannot see it, so such refusals could not be audited. With ``HEADEND_CLIENT_CA`` set the
headend therefore terminates TLS itself, here, on ``HEADEND_GRPC_ADDR``:

1. accept the TCP connection and run the TLS handshake (TLS 1.2+, ALPN ``h2``, the
   client certificate checked against ``HEADEND_CLIENT_CA``) within
   :data:`HANDSHAKE_TIMEOUT_S`. OpenSSL's share of the handshake (the key exchange, the
   signature, the client chain's check: most of its CPU) runs on a small thread pool
   (:data:`HANDSHAKE_THREADS`), not on the event loop, and at most
   :data:`MAX_HANDSHAKES` handshakes are under way at once; the connections beyond wait
   their turn in arrival order, and their timeout starts with their turn. So in a
   reconnect storm the handshakes finish in the order they came, each quickly, rather
   than all of them slowly and the late ones past their timeout, and the event loop
   stays free for the agents already served. A thread of its own accepts the
   connections, so the kernel's accept queue is drained even while the event loop is
   busy (a full queue drops connections, which agents see as handshakes that time out);
2. a failed handshake (no chain to the CA, self-signed, expired, not yet valid, not TLS
   at all...) or a connection without a client certificate is refused: closed, logged
   and audited as ``agent.refused`` (``stage: tls``), at most one record and one log
   line per source address per :data:`REFUSAL_RECORD_INTERVAL_S`, the others counted in
   the next record's ``suppressed``;
3. an accepted connection is relayed, bytes both ways, to the real gRPC server, which
   listens in plaintext on a loopback port only the front uses. The front records which
   internal connection (its local port) carries which agent (:class:`FrontPeers`), so the
   servicer knows the agent's address and certificate.

HTTP/2 itself, keepalive pings included, passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography import x509

from der_sdk.certs import fingerprint, subject
from der_sdk_headend.audit import Actor, Auditor
from der_sdk_headend.link.identity import FrontPeer, FrontPeers

__all__ = [
    "HANDSHAKE_THREADS",
    "HANDSHAKE_TIMEOUT_S",
    "LISTEN_BACKLOG",
    "MAX_HANDSHAKES",
    "REFUSAL_RECORD_INTERVAL_S",
    "RefusalLimiter",
    "TlsFront",
    "front_ssl_context",
    "grpc_peer",
]

log = logging.getLogger("der.headend.link")

HANDSHAKE_TIMEOUT_S = 10.0
"""How long a new connection may take to finish its TLS handshake, from its turn (see
:data:`MAX_HANDSHAKES`); also how long it may take to send its first bytes."""

MAX_HANDSHAKES = 256
"""TLS handshakes under way at once; the connections beyond wait in arrival order."""

HANDSHAKE_THREADS = min(4, os.cpu_count() or 1)
"""Threads that run OpenSSL's handshake steps (it releases the GIL meanwhile)."""

LISTEN_BACKLOG = 65535
"""The listening socket's accept queue (the kernel caps it at ``net.core.somaxconn``)."""

REFUSAL_RECORD_INTERVAL_S = 1.0
"""At most one refusal record (and log line) per source address per this many seconds."""

CHUNK = 64 * 1024
UNKNOWN_ACTOR = "unknown (TLS handshake failed)"
NO_CERT_ACTOR = "unknown (no client certificate)"
_SECOND_SIDE_GRACE_S = 5.0
_LINGER_S = 1.0
_LIMITER_MAX_SOURCES = 10_000


def front_ssl_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """The server context: our certificate, TLS 1.2+, ALPN ``h2``, client certificates
    verified against ``client_ca`` (optional in the handshake, so that a connection
    without one can be audited; it is refused right after). No session tickets: agents
    (gRPC) keep no TLS session cache, and issuing the two tickets TLS 1.3 sends by default
    was about 40 % of the server's handshake CPU."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cafile=str(client_ca))
    context.set_alpn_protocols(["h2"])
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.num_tickets = 0
    return context


def grpc_peer(peername: object) -> str:
    """A socket's peer address as gRPC writes it: ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = str(peername[0]), peername[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return f"unknown:{peername}"


def _source_host(peer: str) -> str:
    return peer.rpartition(":")[0]


def _reason(exc: BaseException, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return f"TLS handshake not finished within {timeout_s:g} s"
    return f"TLS handshake failed: {type(exc).__name__}: {exc}".rstrip(": ")


class RefusalLimiter:
    """One record per source host per ``interval_s``; counts the ones it holds back."""

    def __init__(self, interval_s: float = REFUSAL_RECORD_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, source: str, now: float | None = None) -> int | None:
        """``None`` when this refusal is not to be recorded; else how many were held back
        since the last record from ``source``."""
        now = time.monotonic() if now is None else now
        last = self._last.get(source)
        if last is not None and now - last < self.interval_s:
            self._held[source] = self._held.get(source, 0) + 1
            return None
        if len(self._last) >= _LIMITER_MAX_SOURCES:
            self._forget(now)
        self._last[source] = now
        return self._held.pop(source, 0)

    def _forget(self, now: float) -> None:
        old = [s for s, t in self._last.items() if now - t >= self.interval_s]
        for source in old:
            del self._last[source]
        # a held-back count whose source was forgotten is lost: bounded memory first
        for source in [s for s in self._held if s not in self._last]:
            del self._held[source]
        if len(self._last) >= _LIMITER_MAX_SOURCES:  # a flood from many addresses
            self._last.clear()
            self._held.clear()


class TlsFront:
    """Terminates mutual TLS on the agent port and relays to the internal gRPC server.

    :param upstream_port: the internal gRPC server's loopback port.
    :param peers: shared with the servicer: internal connection's local port → agent.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        upstream_port: int,
        auditor: Auditor,
        peers: FrontPeers,
        *,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        max_handshakes: int = MAX_HANDSHAKES,
        handshake_threads: int = HANDSHAKE_THREADS,
        limiter: RefusalLimiter | None = None,
    ) -> None:
        self._ssl = ssl_context
        self.upstream_port = upstream_port
        self._auditor = auditor
        self.peers = peers
        self._handshake_timeout_s = handshake_timeout_s
        self._turns = asyncio.Semaphore(max_handshakes)
        self._pool = ThreadPoolExecutor(handshake_threads, thread_name_prefix="tls-handshake")
        self._limiter = limiter or RefusalLimiter()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (``port`` 0: any); the port.

        :raises OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            if sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                # "[::]" takes IPv4 too, as gRPC's own listener did
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.port = int(sock.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept_forever, args=(sock, loop), name="tls-front-accept", daemon=True
        )
        self._acceptor.start()
        return self.port

    def stop_accepting(self) -> None:
        """Close the listening socket (new connections are refused); relayed connections
        go on."""
        self._stopping.set()
        if self._listener is not None:
            # wakes the accepting thread, which closes the socket
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        """Stop accepting and end every connection."""
        self.stop_accepting()
        if self._acceptor is not None:
            await asyncio.to_thread(self._acceptor.join, 5.0)
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.peers.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ accepting

    def _accept_forever(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """The accepting thread: take every waiting connection off the kernel's queue and
        hand them to the event loop, until :meth:`stop_accepting`."""
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                if not selector.select(0.5):
                    continue
                batch = self._accept_waiting(sock)
                if batch:
                    try:
                        loop.call_soon_threadsafe(self._adopt, batch)
                    except RuntimeError:  # the loop is closed
                        _close_all(batch)
                        return
        finally:
            selector.close()
            sock.close()

    def _accept_waiting(self, sock: socket.socket) -> list[socket.socket]:
        batch: list[socket.socket] = []
        while len(batch) < 1024 and not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break
            except OSError as exc:
                if self._stopping.is_set():
                    break
                # out of file descriptors, most likely: let some connections end
                log.error("the TLS front cannot accept agent connections: %s", exc)
                time.sleep(1.0)
                break
            conn.setblocking(False)
            batch.append(conn)
        return batch

    def _adopt(self, batch: list[socket.socket]) -> None:
        """On the event loop: serve each accepted connection in a task of its own (so
        that :meth:`close` can end it)."""
        if self._stopping.is_set():
            _close_all(batch)
            return
        for conn in batch:
            handler = asyncio.ensure_future(self._serve_socket(conn))
            self._connections.add(handler)
            handler.add_done_callback(self._connections.discard)

    # ------------------------------------------------------------------ one connection

    async def _serve_socket(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=CHUNK)
        except OSError:  # gone already
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = grpc_peer(writer.get_extra_info("peername"))
        tls = _ServerTls(self._ssl, reader, writer, self._pool)
        try:
            # A connection that sends nothing takes no turn (a few idle connections
            # cannot hold up the others); then the handshake itself, in its turn.
            async with asyncio.timeout(self._handshake_timeout_s):
                await tls.first_bytes()
            async with self._turns:
                async with asyncio.timeout(self._handshake_timeout_s):
                    await tls.handshake()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            await _linger_and_close(reader, writer)
            await self._refused(peer, _reason(exc, self._handshake_timeout_s), UNKNOWN_ACTOR)
            return
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        der = tls.obj.getpeercert(binary_form=True)
        if not der:
            await tls.close_notify()
            await _linger_and_close(reader, writer)
            await self._refused(peer, "no client certificate", NO_CERT_ACTOR)
            return
        try:
            cert = x509.load_der_x509_certificate(der)  # parsed once, for both names
            agent = FrontPeer(
                peer=peer,
                fingerprint=fingerprint(cert),
                subject=subject(cert),
                not_after=cert.not_valid_after_utc,
            )
        except ValueError:  # verified by OpenSSL, so not expected
            writer.transport.abort()
            await self._refused(peer, "the client certificate could not be read", UNKNOWN_ACTOR)
            return
        await self._relay(tls, agent)

    async def _refused(self, peer: str, reason: str, actor: str) -> None:
        suppressed = self._limiter.admit(_source_host(peer))
        if suppressed is None:
            return
        more = f" ({suppressed} more from this address not recorded)" if suppressed else ""
        log.warning(
            "agent connection refused in the TLS handshake: peer %s: %s%s", peer, reason, more
        )
        await self._auditor.record(
            "agent.refused",
            actor=Actor(kind="agent", name=actor),
            source=peer,
            outcome="refused",
            message=f"agent connection from {peer} refused in the TLS handshake: {reason}",
            reason=reason,
            auth="mtls",
            stage="tls",
            suppressed=suppressed,
        )

    async def _relay(self, tls: _ServerTls, agent: FrontPeer) -> None:
        writer = tls.writer
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port, limit=CHUNK
            )
        except OSError as exc:
            log.error("the internal gRPC server is unreachable (%s); closing %s", exc, agent.peer)
            writer.transport.abort()
            return
        local_port = int(up_writer.get_extra_info("sockname")[1])
        self.peers[local_port] = agent
        pumps = [
            asyncio.ensure_future(_agent_to_upstream(tls, up_writer)),
            asyncio.ensure_future(_upstream_to_agent(up_reader, tls)),
        ]
        try:
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if pending:  # one side ended: give the other a moment to finish
                await asyncio.wait(pending, timeout=_SECOND_SIDE_GRACE_S)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self.peers.pop(local_port, None)
            for side in (writer, up_writer):
                with contextlib.suppress(Exception):
                    side.transport.abort()


class _ServerTls:
    """Server-side TLS over a plain stream pair, driven by hand (:class:`ssl.SSLObject`
    on memory BIOs) rather than by ``loop.start_tls``: a refused handshake is ours to
    audit and to close cleanly (a FIN after the client's data is read, not a reset).
    Handshake steps run on ``pool`` (one at a time per connection, so the object is
    never used by two threads at once); the relay's reads and writes on the loop."""

    def __init__(
        self,
        context: ssl.SSLContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pool: ThreadPoolExecutor,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.reader = reader
        self.writer = writer
        self._pool = pool
        self._eof = False

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _feed(self) -> None:
        if self._eof:
            raise ConnectionResetError("the connection closed")
        data = await self.reader.read(CHUNK)
        if data:
            self._incoming.write(data)
        else:
            self._eof = True
            self._incoming.write_eof()

    async def first_bytes(self) -> None:
        """Wait for the client's first bytes (or its end)."""
        await self._feed()

    async def handshake(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._pool, self.obj.do_handshake)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._feed()
            # On ssl.SSLError the alert stays unsent, as gRPC's own TLS does: under TLS 1.3
            # the client has finished its side of the handshake by then, and gRPC reports
            # an alert as corrupted data but a clean close as "Socket closed", which the
            # agent explains (der_sdk_agent.tls).
            else:
                await self._flush()
                return

    async def recv(self) -> bytes:
        """Decrypted bytes; ``b""`` at the end."""
        while True:
            try:
                return self.obj.read(CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()
                if self._eof:
                    return b""
                await self._feed()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def send(self, data: bytes) -> None:
        self.obj.write(data)  # a memory BIO takes it all
        await self._flush()

    async def close_notify(self) -> None:
        """Tell the client that TLS ends here (the connection stays open)."""
        with contextlib.suppress(ssl.SSLError, OSError):
            self.obj.unwrap()
        with contextlib.suppress(ssl.SSLError, OSError):
            await self._flush()

    async def close(self) -> None:
        """Send close_notify and close the connection."""
        await self.close_notify()
        self.writer.close()


def _close_all(conns: list[socket.socket]) -> None:
    for conn in conns:
        conn.close()


async def _linger_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close a refused connection cleanly: our side first, then read what the client still
    sends for a moment (closing with unread data would reset the connection, which gRPC
    reports less clearly)."""
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_LINGER_S):
                while await reader.read(CHUNK):
                    pass
    writer.transport.abort()


async def _agent_to_upstream(tls: _ServerTls, sink: asyncio.StreamWriter) -> None:
    """The agent's bytes to the gRPC server (waiting while it is full); then its EOF."""
    try:
        while data := await tls.recv():
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (OSError, ssl.SSLError, RuntimeError):
        sink.transport.abort()


async def _upstream_to_agent(source: asyncio.StreamReader, tls: _ServerTls) -> None:
    """The gRPC server's bytes to the agent (waiting while it is full); then close_notify."""
    try:
        while data := await source.read(CHUNK):
            await tls.send(data)
        await tls.close()
    except (OSError, ssl.SSLError, RuntimeError):
        tls.writer.transport.abort()
