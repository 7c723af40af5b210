"""The bus connection of one replica, and the commands replicas send each other."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import msgspec

from der_sdk.backoff import Backoff
from der_sdk.bus.contract import (
    BusError,
    BusUnavailableError,
    MessageBus,
    Subscription,
    open_bus,
)
from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.plugins import Plugins
from der_sdk_headend.config import HeadendConfig

__all__ = ["Cluster", "CommandBody", "replica_name"]

log = logging.getLogger("der.headend.cluster")

CONNECT_RETRY_INITIAL_S = 1.0
"""First wait before connecting to an unreachable bus again at start; doubles, with
jitter, up to :data:`CONNECT_RETRY_MAX_S`."""
CONNECT_RETRY_MAX_S = 30.0

CommandBody = Callable[[bytes], Awaitable[bytes]]
"""Serves one kind of command between replicas: its body in, the reply out."""

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def replica_name(headend_id: str) -> str:
    """The bus name of the replica ``headend_id``: the id itself when the bus takes it
    as a name, else ``x`` and its UTF-8 in hex (``HEADEND_ID`` may hold ``.`` and ``:``)."""
    if _TOKEN.fullmatch(headend_id):
        return headend_id
    return "x" + headend_id.encode().hex()


class _Envelope(msgspec.Struct, frozen=True, array_like=True):
    kind: str
    body: bytes


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Envelope).decode


class Cluster:
    """This replica's bus connection and its command service.

    :param config: the headend's configuration; ``bus_url`` must be set.
    :param plugins: the loaded plugins, which provide the bus backend.
    :raises DerSdkError: no installed backend handles the URL, or a ``HEADEND_BUS_*``
        value is out of range.
    """

    def __init__(self, config: HeadendConfig, plugins: Plugins) -> None:
        if config.bus_url is None:
            raise ValueError("Cluster needs HEADEND_BUS_URL")
        self.replica_id = config.headend_id
        """This replica's ``HEADEND_ID``: what its sessions record."""
        self.replica = replica_name(config.headend_id)
        """Its name on the bus: where the other replicas send it commands."""
        self.url = config.bus_url
        try:
            self.bus: MessageBus = open_bus(config.bus_url, plugins, config.bus_options())
        except UnknownNameError as exc:
            raise DerSdkError(f"HEADEND_BUS_URL: {exc}") from None
        except ValueError as exc:
            raise DerSdkError(f"HEADEND_BUS_URL: {exc}") from None
        self._handlers: dict[str, CommandBody] = {}
        self._serving: Subscription | None = None

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, on_retry: Callable[[], Awaitable[None]] | None = None) -> None:
        """Connect to the bus, retrying with jittered backoff while it is unreachable.

        :param on_retry: awaited after the first failed attempt (the headend brings REST
            up early then, so ``/healthz`` says why it waits).
        :raises DerSdkError: the bus refused what it was asked to set up (the message says
            what); an unreachable bus is retried, not raised.
        """
        backoff = Backoff(CONNECT_RETRY_INITIAL_S, CONNECT_RETRY_MAX_S, multiplier=2.0)
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.bus.connect()
                log.info(
                    "connected to the message bus %s as replica %s", self.bus.name, self.replica
                )
                return
            except BusUnavailableError as exc:
                delay = backoff.delay(attempt)
                log.warning(
                    "message bus %s not available (attempt %d): %s; retrying in %.1fs",
                    self.bus.name,
                    attempt,
                    exc,
                    delay,
                )
            except BusError as exc:
                raise DerSdkError(f"HEADEND_BUS_URL: {exc}") from None
            if attempt == 1 and on_retry is not None:
                await on_retry()
            await asyncio.sleep(delay)

    async def serve(self) -> None:
        """Start serving the commands registered with :meth:`on_command` (once every
        part registered its own)."""
        if self._serving is None:
            self._serving = await self.bus.serve_commands(self.replica, self._handle)

    async def close(self) -> None:
        """Stop serving commands and close the bus connection; idempotent."""
        if self._serving is not None:
            await self._serving.close()
            self._serving = None
        await self.bus.close()

    # ------------------------------------------------------------------ status

    @property
    def connected(self) -> bool:
        return self.bus.state == "connected"

    def health_reason(self) -> str | None:
        """Why ``/healthz`` should say degraded because of the bus, or ``None``."""
        state = self.bus.state
        if state == "connected":
            return None
        return f"message bus {self.bus.name} is {state}: commands for agents on other replicas wait"

    # ------------------------------------------------------------------ commands

    def on_command(self, kind: str, handler: CommandBody) -> None:
        """Serve commands of ``kind`` sent to this replica with ``handler``."""
        if kind in self._handlers:
            raise ValueError(f"cluster command {kind!r} already has a handler")
        self._handlers[kind] = handler

    async def send(self, replica: str, kind: str, body: bytes, *, timeout_s: float = 5.0) -> bytes:
        """Send a command of ``kind`` to ``replica`` (its bus name); its handler's reply.

        Raises what :meth:`der_sdk.bus.MessageBus.send_command` raises.
        """
        return await self.bus.send_command(
            replica, _encode(_Envelope(kind, body)), timeout_s=timeout_s
        )

    async def _handle(self, payload: bytes) -> bytes:
        envelope = _decode(payload)
        handler = self._handlers.get(envelope.kind)
        if handler is None:
            raise ValueError(f"replica {self.replica} serves no command {envelope.kind!r}")
        return await handler(envelope.body)
