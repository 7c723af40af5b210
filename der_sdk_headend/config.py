"""The headend's configuration, read from the environment.

======================  ==========================  ==========================================
variable                default                     meaning
======================  ==========================  ==========================================
``ASSETS_PATH``         (required)                  the inventory YAML of sites and assets
``DATABASE_URL``        ``sqlite:///der-data/der.db``  storage backend by URL scheme
``HEADEND_GRPC_ADDR``   ``127.0.0.1:50051``         where agents dial in (port 0: any free)
``HEADEND_HTTP_ADDR``   ``127.0.0.1:3001``          the REST API (port 0: any free)
``RESET_DB``            off                         1/true/yes/on: delete stored data at start
``SPLIT_POLICY``        ``capacity_weighted``       policy for the per-asset preview of a
                                                    site dispatch
``INGEST_QUEUE_MAX_SAMPLES`` ``50000``              telemetry samples that may wait for
                                                    storage; then agent streams are not read
                                                    (flow control) until storage catches up
``MAX_AGENT_STREAMS``   ``10000``                   agent streams served at once; more are
                                                    refused with RESOURCE_EXHAUSTED and retry
======================  ==========================  ==========================================

The split policy name is checked against the installed policies when the headend starts
(:meth:`der_sdk_headend.service.Headend.start`), because only then are plugins loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from der_sdk.errors import DerSdkError
from der_sdk.split import DEFAULT_SPLIT_POLICY
from der_sdk.storage.contract import DEFAULT_DATABASE_URL

__all__ = [
    "DEFAULT_GRPC_ADDR",
    "DEFAULT_HTTP_ADDR",
    "HeadendConfig",
    "split_host_port",
]

DEFAULT_GRPC_ADDR = "127.0.0.1:50051"
DEFAULT_HTTP_ADDR = "127.0.0.1:3001"
DEFAULT_INGEST_QUEUE_MAX_SAMPLES = 50_000
DEFAULT_MAX_AGENT_STREAMS = 10_000

_TRUTHY = frozenset({"1", "true", "yes", "on"})
_FALSY = frozenset({"", "0", "false", "no", "off"})


def split_host_port(addr: str, variable: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as ``(host, port)``.

    :raises DerSdkError: the address has no port or the port is not 0..65535; the message
        names ``variable``.
    """
    host, sep, port_text = addr.strip().rpartition(":")
    if not sep or not host:
        raise DerSdkError(f"{variable}={addr!r} is not HOST:PORT (for example 127.0.0.1:3001)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise DerSdkError(f"{variable}={addr!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise DerSdkError(f"{variable}={addr!r}: port {port} is outside 0..65535")
    return host, port


def _int(env: Mapping[str, str], variable: str, default: int) -> int:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise DerSdkError(f"{variable}={raw!r} is not a whole number") from None


def _flag(env: Mapping[str, str], variable: str) -> bool:
    raw = env.get(variable, "").strip().lower()
    if raw in _TRUTHY:
        return True
    if raw in _FALSY:
        return False
    raise DerSdkError(
        f"{variable}={env[variable]!r} is not a yes/no value; use 1/true/yes/on or 0/false/no/off"
    )


@dataclass(frozen=True, kw_only=True)
class HeadendConfig:
    """Everything the headend needs to start. Build it with :meth:`from_env`."""

    assets_path: Path
    database_url: str = DEFAULT_DATABASE_URL
    grpc_addr: str = DEFAULT_GRPC_ADDR
    http_addr: str = DEFAULT_HTTP_ADDR
    reset_db: bool = False
    split_policy: str = DEFAULT_SPLIT_POLICY
    ingest_queue_max_samples: int = DEFAULT_INGEST_QUEUE_MAX_SAMPLES
    max_agent_streams: int = DEFAULT_MAX_AGENT_STREAMS

    def __post_init__(self) -> None:
        if self.ingest_queue_max_samples < 1:
            raise DerSdkError(
                f"INGEST_QUEUE_MAX_SAMPLES={self.ingest_queue_max_samples} must be at least 1"
            )
        if self.max_agent_streams < 1:
            raise DerSdkError(f"MAX_AGENT_STREAMS={self.max_agent_streams} must be at least 1")
        split_host_port(self.grpc_addr, "HEADEND_GRPC_ADDR")
        split_host_port(self.http_addr, "HEADEND_HTTP_ADDR")
        if not self.split_policy:
            raise DerSdkError("SPLIT_POLICY is empty; leave it unset for capacity_weighted")

    @property
    def http_host_port(self) -> tuple[str, int]:
        return split_host_port(self.http_addr, "HEADEND_HTTP_ADDR")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HeadendConfig:
        """Read the configuration from ``env`` (usually ``os.environ``).

        :raises DerSdkError: ``ASSETS_PATH`` is missing, or a value is malformed; the
            message names the variable.
        """
        assets = env.get("ASSETS_PATH", "").strip()
        if not assets:
            raise DerSdkError(
                "ASSETS_PATH is not set: point it at the inventory YAML of sites and assets "
                "(for example ASSETS_PATH=examples/assets.yaml)"
            )
        return cls(
            assets_path=Path(assets),
            database_url=env.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL,
            grpc_addr=env.get("HEADEND_GRPC_ADDR", "").strip() or DEFAULT_GRPC_ADDR,
            http_addr=env.get("HEADEND_HTTP_ADDR", "").strip() or DEFAULT_HTTP_ADDR,
            reset_db=_flag(env, "RESET_DB"),
            split_policy=env.get("SPLIT_POLICY", "").strip() or DEFAULT_SPLIT_POLICY,
            ingest_queue_max_samples=_int(
                env, "INGEST_QUEUE_MAX_SAMPLES", DEFAULT_INGEST_QUEUE_MAX_SAMPLES
            ),
            max_agent_streams=_int(env, "MAX_AGENT_STREAMS", DEFAULT_MAX_AGENT_STREAMS),
        )
