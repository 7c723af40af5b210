"""The ``DATABASE_URL`` of the PostgreSQL backend: our tuning parameters and the DSN.

``postgresql://user:password@host:5432/dbname?pool_max=20&batch_size=10000``

The query parameters in :data:`PARAMETERS` belong to this plugin; they are removed before
the URL is handed to asyncpg, which would otherwise send them to the server as run-time
settings (and the server would refuse them). Every other query parameter is left in the
DSN: asyncpg understands ``sslmode`` and friends and passes the rest to the server as
settings, for example ``application_name=der-headend`` or ``search_path=der``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from der_sdk.errors import DerSdkError
from der_sdk.url_parameters import ParameterParser, seconds, whole_number

__all__ = ["PARAMETERS", "SCHEMES", "PostgresSettings", "redact"]

SCHEMES = ("postgresql", "postgres")
"""The URL schemes this backend serves."""


_WHERE = "DATABASE_URL"


@dataclass(frozen=True, kw_only=True)
class PostgresSettings:
    """A parsed ``postgresql://`` URL: where to connect and how to behave.

    Build it with :meth:`from_url`; each field's default is what an unset parameter means.
    """

    dsn: str
    """The URL without this plugin's parameters, as given to asyncpg."""

    pool_min: int = 1
    """Connections the pool opens at start and keeps."""
    pool_max: int = 10
    """Upper bound of pooled connections (concurrent ingest batches and queries)."""
    connect_timeout: float = 10.0
    """Seconds to establish one connection (and to wait for a pooled one)."""
    command_timeout: float = 30.0
    """Seconds any single statement may run before it is cancelled (0: no limit)."""
    statement_cache_size: int = 100
    """Prepared statements cached per connection (0: no cache)."""
    max_inactive_connection_lifetime: float = 300.0
    """Seconds an idle pooled connection lives before it is closed (0: forever)."""
    batch_size: int = 5000
    """Rows per COPY into the staging table; larger batches are sent in chunks of this size
    inside the one transaction of an ``append_telemetry`` call."""
    flush_interval_ms: int = 200
    """Reserved for the cross-call ingest buffer; accepted and checked, not used yet (every
    ``append_telemetry`` call is written and committed before it returns)."""
    retention_days: float | None = None
    """When set, a background job deletes telemetry and heartbeats older than this."""
    retention_interval_s: float = 3600.0
    """How often the retention job runs."""

    @classmethod
    def from_url(cls, url: str) -> PostgresSettings:
        """Split ``url`` into our parameters and the DSN for asyncpg.

        :raises DerSdkError: not a ``postgresql://`` URL, or a parameter is malformed; the
            message names the parameter.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in SCHEMES:
            raise DerSdkError(
                f"DATABASE_URL={redact(url)!r} is not a PostgreSQL URL; "
                "use postgresql://USER@HOST:PORT/DBNAME"
            )
        ours: dict[str, Any] = {}
        passed: list[tuple[str, str]] = []
        for name, raw in parse_qsl(parts.query, keep_blank_values=True):
            parse = PARAMETERS.get(name)
            if parse is None:
                passed.append((name, raw))
            else:
                ours[name] = parse(name, raw)
        settings = cls(dsn=urlunsplit(parts._replace(query=urlencode(passed))), **ours)
        if settings.pool_min > settings.pool_max:
            raise DerSdkError(
                f"DATABASE_URL: pool_min={settings.pool_min} is more than "
                f"pool_max={settings.pool_max}"
            )
        return settings

    @property
    def target(self) -> str:
        """``host:port/dbname`` for messages (never the password)."""
        parts = urlsplit(self.dsn)
        host = parts.hostname or "localhost"
        try:
            port = parts.port or 5432
        except ValueError:
            port = 5432
        database = unquote(parts.path.lstrip("/")) or parts.username or "postgres"
        return f"{host}:{port}/{database}"

    @property
    def command_timeout_or_none(self) -> float | None:
        return self.command_timeout or None


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


PARAMETERS: dict[str, ParameterParser] = {
    "pool_min": whole_number(_WHERE, 0),
    "pool_max": whole_number(_WHERE, 1),
    "connect_timeout": seconds(_WHERE),
    "command_timeout": seconds(_WHERE, allow_zero=True),
    "statement_cache_size": whole_number(_WHERE, 0),
    "max_inactive_connection_lifetime": seconds(_WHERE, allow_zero=True),
    "batch_size": whole_number(_WHERE, 1),
    "flush_interval_ms": whole_number(_WHERE, 0),
    "retention_days": seconds(_WHERE),
    "retention_interval_s": seconds(_WHERE),
}
"""This plugin's URL query parameters and their parsers (the names of
:class:`PostgresSettings` fields); all others are passed on to asyncpg."""
