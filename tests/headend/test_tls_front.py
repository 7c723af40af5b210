"""The TLS front under many connections at once: idle connections hold up no handshake,
a handshake waiting for its turn is not timed out by the wait, and a front that stopped
accepting refuses new connections while the relayed ones go on.

The front relays to a plain echo server here (it stands in for the internal gRPC
server: the front relays bytes, whatever they are)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest
from headend_kit import SITE_A, SITE_B
from test_tls import Pki

from der_sdk import certs
from der_sdk.storage.memory import MemoryStorage
from der_sdk_headend.audit import Auditor
from der_sdk_headend.link.tls_front import TlsFront, front_ssl_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The shape of the TLS tests' PKI: a CA, the headend's certificate, two agents'."""
    folder = tmp_path_factory.mktemp("front-pki")
    certs.init_ca(folder)
    agents = [
        certs.issue_agent(folder, site, agent_id=f"gw-{n}")
        for n, site in enumerate((SITE_A, SITE_B))
    ]
    return Pki(folder, certs.issue_headend(folder, ["localhost", "127.0.0.1"]), *agents)


def agent_context(pki: Pki) -> ssl.SSLContext:
    context = pki.ssl_context()
    context.load_cert_chain(str(pki.agent_a.cert_path), str(pki.agent_a.key_path))
    context.set_alpn_protocols(["h2"])
    return context


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def running_front(
    pki: Pki, **options: float
) -> AsyncIterator[tuple[TlsFront, MemoryStorage]]:
    upstream = await asyncio.start_server(_echo, "127.0.0.1", 0)
    storage = MemoryStorage()
    auditor = Auditor(storage)
    context = front_ssl_context(pki.headend.cert_path, pki.headend.key_path, pki.ca)
    port = upstream.sockets[0].getsockname()[1]
    front = TlsFront(context, port, auditor, {}, **options)  # type: ignore[arg-type]
    await front.start("127.0.0.1", 0)
    try:
        yield front, storage
    finally:
        await front.close()
        upstream.close()
        await upstream.wait_closed()


async def _agent(pki: Pki, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=agent_context(pki), server_hostname="localhost"
    )


async def _echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    assert await reader.readexactly(len(data)) == data


async def test_connections_that_send_nothing_hold_up_no_handshake(pki: Pki) -> None:
    async with running_front(pki, max_handshakes=1, handshake_timeout_s=5.0) as (front, _):
        idle = [await asyncio.open_connection("127.0.0.1", front.port) for _ in range(3)]
        async with asyncio.timeout(3.0):  # well before the idle ones time out
            reader, writer = await _agent(pki, front.port)
            await _echoes(reader, writer, b"register")
        assert [p.fingerprint for p in front.peers.values()] == [pki.agent_a.fingerprint]
        for _, idle_writer in [*idle, (reader, writer)]:
            idle_writer.close()


async def test_a_handshake_waiting_for_its_turn_gets_its_whole_timeout(pki: Pki) -> None:
    timeout_s = 0.6
    async with running_front(pki, max_handshakes=1, handshake_timeout_s=timeout_s) as (
        front,
        storage,
    ):
        # three connections that start a TLS record and stall take the one turn in turn
        stalled = []
        for _ in range(3):
            stalled.append(await asyncio.open_connection("127.0.0.1", front.port))
            stalled[-1][1].write(b"\x16\x03\x01\x00\x50")
            await asyncio.sleep(0.02)
        started = asyncio.get_running_loop().time()
        reader, writer = await _agent(pki, front.port)
        waited = asyncio.get_running_loop().time() - started
        await _echoes(reader, writer, b"register")
        assert waited > 2 * timeout_s, "it waited behind the stalled ones, beyond its timeout"
        records = await storage.events(kind="audit")
        assert records, "the stalled ones were refused and audited"
        assert f"not finished within {timeout_s:g} s" in records[-1].data["reason"]
        for _, stalled_writer in [*stalled, (reader, writer)]:
            stalled_writer.close()


async def test_a_front_that_stopped_accepting_refuses_new_connections_and_relays_on(
    pki: Pki,
) -> None:
    async with running_front(pki) as (front, _):
        reader, writer = await _agent(pki, front.port)
        await _echoes(reader, writer, b"before")
        front.stop_accepting()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", front.port)
        await _echoes(reader, writer, b"after")
        writer.close()
