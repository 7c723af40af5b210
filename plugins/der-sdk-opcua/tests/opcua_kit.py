"""Helpers of the OPC UA plugin's tests: certificates made at test time, an asyncua client
as a SCADA would use it, and waiting on a deadline rather than sleeping."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from der_sdk_opcua.certs import write_application_certificate
from der_sdk_opcua.simulator import BessSimulator

T = TypeVar("T")

CLIENT_URI = "urn:der-sdk:test:scada"
ROGUE_URI = "urn:der-sdk:test:rogue"
AGENT_URI = "urn:der-sdk:test:agent"
SERVER_URI = "urn:der-sdk:test:edge"


async def eventually(
    probe: Callable[[], Awaitable[T]], *, within: float = 15.0, what: str = "condition"
) -> T:
    """Await ``probe`` until it returns a truthy value (an AssertionError counts as not yet)
    or ``within`` seconds pass: a deadline, so a loaded machine is slower, not red."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while True:
        try:
            last = await probe()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Pki:
    """Certificates for one test: the server's, a trusted client's (in ``trust``), a rogue
    client's (not trusted), and the agent's (for the adapter)."""

    root: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    agent_cert: Path
    agent_key: Path
    trust: Path


def make_pki(root: Path) -> Pki:
    """Certificates made with the ``cryptography`` package into ``root``."""
    keys = root / "keys"
    server = write_application_certificate(keys, "edge", application_uri=SERVER_URI)
    client = write_application_certificate(keys, "scada", application_uri=CLIENT_URI)
    rogue = write_application_certificate(keys, "rogue", application_uri=ROGUE_URI)
    agent = write_application_certificate(keys, "agent", application_uri=AGENT_URI)
    trust = root / "trusted"
    trust.mkdir()
    (trust / "scada.der").write_bytes(client[0].read_bytes())
    return Pki(root, *server, *client, *rogue, *agent, trust)


async def secure_client(
    url: str,
    pki: Pki,
    *,
    rogue: bool = False,
    user: tuple[str, str] | None = None,
    mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
) -> Client:
    """An asyncua client (as a SCADA would be) set up for Basic256Sha256, not connected."""
    client = Client(url, timeout=5)
    client.application_uri = ROGUE_URI if rogue else CLIENT_URI
    cert, key = (pki.rogue_cert, pki.rogue_key) if rogue else (pki.client_cert, pki.client_key)
    await client.set_security(
        SecurityPolicyBasic256Sha256, cert.read_bytes(), _der_key(key), mode=mode
    )
    if user is not None:
        client.set_user(user[0])
        client.set_password(user[1])
    return client


def _der_key(path: Path) -> bytes:
    from der_sdk_opcua.certs import load_private_key_der

    return load_private_key_der(path)


class LoopThread:
    """An event loop in a thread of its own.

    Every async test has its own event loop; a server started on this one outlives them, so
    one server can serve the tests of a whole module (an asyncua server takes a second or
    more to start). Clients in the tests talk to it over loopback TCP as usual.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the thread's loop and block until done (for fixtures)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the thread's loop (awaited there if it returns a coroutine)."""

        async def call() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self._loop))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class SimulatorThread:
    """A :class:`BessSimulator` on a :class:`LoopThread`, for a module's tests."""

    def __init__(self, **options: Any) -> None:
        self._options = {"endpoint": "opc.tcp://127.0.0.1:0/der-sim/", "step_s": 0.05, **options}
        self._thread: LoopThread | None = None
        self.sim: BessSimulator | None = None
        self.endpoint_url = ""

    def start(self) -> None:
        self._thread = LoopThread("opcua-sim")
        self.sim = BessSimulator(**self._options)
        self._thread.wait(self.sim.start())
        self.endpoint_url = self.sim.endpoint_url

    def stop(self) -> None:
        if self._thread is None:
            return
        if self.sim is not None:
            self._thread.wait(self.sim.stop())
        self._thread.stop()

    async def run(self, fn: Callable[[BessSimulator], Any]) -> Any:
        """``fn(sim)`` in the simulator's thread (awaited there if it returns a coroutine)."""
        assert self._thread is not None and self.sim is not None
        sim = self.sim
        return await self._thread.call(lambda: fn(sim))

    async def restart(self) -> None:
        """Start a new simulator on the same endpoint (the old one must be stopped)."""
        assert self._thread is not None
        self.sim = BessSimulator(**{**self._options, "endpoint": self.endpoint_url})
        await self._thread.call(self.sim.start)
