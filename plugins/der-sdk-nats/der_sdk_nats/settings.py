"""The bus URL of the NATS backend: servers, credentials and our parameters.

``nats://[USER:PASSWORD@|TOKEN@]HOST:PORT[,HOST:PORT...][?name=der-headend&replicas=3]``

Several servers of one NATS cluster are listed with commas; the credentials, given once,
apply to all of them. Every query parameter must be one of :data:`PARAMETERS`: an unknown
one is an error, so a misspelled setting does not pass unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from der_sdk.errors import DerSdkError
from der_sdk.url_parameters import ParameterParser, seconds, text, whole_number

__all__ = ["DEFAULT_PORT", "PARAMETERS", "SCHEMES", "NatsSettings", "redact"]

SCHEMES = ("nats",)
"""The URL schemes this backend serves."""

DEFAULT_PORT = 4222
_WHERE = "bus URL"


PARAMETERS: dict[str, ParameterParser] = {
    "name": text(_WHERE),
    "connect_timeout": seconds(_WHERE),
    "connect_attempts": whole_number(_WHERE, 1),
    "reconnect_wait": seconds(_WHERE),
    "request_timeout": seconds(_WHERE),
    "replicas": whole_number(_WHERE, 1),
}
"""The URL query parameters and their parsers (the names of :class:`NatsSettings` fields)."""


@dataclass(frozen=True, kw_only=True)
class NatsSettings:
    """A parsed ``nats://`` URL. Build it with :meth:`from_url`; each field's default is what
    an unset parameter means."""

    servers: tuple[str, ...]
    """``nats://HOST:PORT`` of every server, without credentials."""
    user: str | None = None
    password: str | None = None
    token: str | None = None

    name: str = "der-sdk"
    """The connection name the server shows (``nats server report connections``)."""
    connect_timeout: float = 2.0
    """Seconds one attempt to connect may take."""
    connect_attempts: int = 3
    """Attempts per server at start before ``connect()`` gives up; once connected, the bus
    reconnects for ever."""
    reconnect_wait: float = 1.0
    """Seconds between attempts to reach a server again."""
    request_timeout: float = 5.0
    """Seconds to wait for JetStream's answer (a publish acknowledgement, a presence write,
    a stream acknowledgement) before the call raises ``BusUnavailableError``."""
    replicas: int = 1
    """Copies of the stream and the presence table in a NATS cluster (1, 3 or 5; more
    than 1 needs a cluster of at least that many servers)."""

    @classmethod
    def from_url(cls, url: str) -> NatsSettings:
        """Parse ``url``.

        :raises DerSdkError: not a ``nats://`` URL, no server, or a parameter is unknown or
            malformed; the message names it.
        """
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in SCHEMES:
            raise DerSdkError(f"bus URL {redact(url)!r} is not a NATS URL; use nats://HOST:4222")
        location, _, query = rest.partition("?")
        location = location.rstrip("/")
        credentials, at, hosts = location.rpartition("@")
        user = password = token = None
        if at:
            first, colon, secret = credentials.partition(":")
            if colon:
                user, password = unquote(first), unquote(secret)
            else:
                token = unquote(first)
        servers = []
        for host in hosts.split(","):
            if not host.strip():
                raise DerSdkError(f"bus URL {redact(url)!r} names no server (HOST:PORT)")
            parts = urlsplit(f"nats://{host.strip()}")
            try:
                port = parts.port or DEFAULT_PORT
            except ValueError:
                raise DerSdkError(f"bus URL: {host!r} has no valid port") from None
            if not parts.hostname:
                raise DerSdkError(f"bus URL: {host!r} has no host name")
            servers.append(f"nats://{parts.hostname}:{port}")
        ours: dict[str, Any] = {}
        for name, raw in parse_qsl(query, keep_blank_values=True):
            parse = PARAMETERS.get(name)
            if parse is None:
                known = ", ".join(PARAMETERS)
                raise DerSdkError(f"bus URL: unknown parameter {name!r}; known: {known}")
            ours[name] = parse(name, raw)
        return cls(servers=tuple(servers), user=user, password=password, token=token, **ours)

    @property
    def target(self) -> str:
        """The servers, for messages (never the credentials)."""
        return ",".join(self.servers)


def redact(url: str) -> str:
    """``url`` with its credentials replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    credentials, at, _ = rest.partition("?")[0].rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}***@{rest[len(credentials) + 1 :]}"
