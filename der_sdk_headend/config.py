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
``INGEST_WRITERS``      ``2``                       concurrent telemetry writes, where the
                                                    storage has the connections (PostgreSQL;
                                                    SQLite always uses 1)
``MAX_AGENT_STREAMS``   ``10000``                   agent streams served at once; more are
                                                    refused with RESOURCE_EXHAUSTED and retry
``HEADEND_STREAM_WINDOW_KB`` ``4``                  each agent stream's flow-control window
                                                    (4..1024): what gRPC reads ahead of the
                                                    headend per stream; it also caps one
                                                    stream's rate at a window per round trip
``HEADEND_TLS_CERT``    (none)                      PEM certificate chain: serve gRPC and REST
``HEADEND_TLS_KEY``     (none)                      over TLS (both or neither)
``HEADEND_CLIENT_CA``   (none)                      PEM CA bundle: require agent client
                                                    certificates signed by it (mutual TLS)
``HEADEND_MTLS_MODE``   ``front``                   who runs the mutual TLS handshake:
                                                    ``front``, the headend's auditing TLS
                                                    front, or ``native``, gRPC's own TLS
                                                    (faster; refused handshakes not audited)
``AGENT_IDENTITY``      ``fingerprint``             how a client certificate names an agent:
                                                    ``fingerprint`` (SHA-256) or ``subject``
``HEADEND_AUTH``        ``auto``                    REST bearer tokens: ``on``, ``off``, or
                                                    ``auto`` (on unless REST is on loopback
                                                    and no token exists)
``HEADEND_TOKENS_FILE`` ``der-data/tokens.json``    the REST token store (hashes only)
``METRICS_AUTH``        ``viewer``                  ``/metrics`` needs a viewer token, or
                                                    ``open``
``HEADEND_INSECURE``    off                         allow a non-loopback address without TLS
``HEADEND_ID``          ``HOSTNAME:GRPC_PORT``      this headend's id, kept on its sessions;
                                                    when set, a start closes only its own
                                                    sessions left open (and those with no
                                                    id); unset, a start closes every open one
``CONSOLE_CONFIRM_SHARE`` ``0.5``                  the operator console asks for a
                                                    confirmation before a dispatch that moves
                                                    an asset by more than this share of its
                                                    capacity (0..1; 0: confirm every change); site
                                                    dispatches are always confirmed
``HEADEND_EXPORTERS``   (none)                      continuous exporters to run, comma-
                                                    separated ``NAME`` or ``NAME=TYPE``
                                                    (``der_exporters``; docs/export.md)
``HEADEND_EXPORTER_<NAME>_<OPTION>``                an option of exporter ``NAME``
``HEADEND_EXPORT_BATCH_ROWS`` ``10000``             samples per exporter batch
``HEADEND_EXPORT_INTERVAL_S`` ``5``                 seconds between an exporter's reads when
                                                    it has caught up
``HEADEND_EXPORT_MAX_DAYS`` ``31``                  the longest range ``GET /telemetry/export``
                                                    serves, in days
======================  ==========================  ==========================================

The split policy name is checked against the installed policies when the headend starts
(:meth:`der_sdk_headend.service.Headend.start`), because only then are plugins loaded.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from der_sdk.bus.contract import BusOptions
from der_sdk.errors import DerSdkError
from der_sdk.split import DEFAULT_SPLIT_POLICY
from der_sdk.storage.contract import DEFAULT_DATABASE_URL

__all__ = [
    "DEFAULT_GRPC_ADDR",
    "DEFAULT_HTTP_ADDR",
    "ExporterConfig",
    "HeadendConfig",
    "default_headend_id",
    "is_loopback",
    "split_host_port",
]

DEFAULT_GRPC_ADDR = "127.0.0.1:50051"
DEFAULT_HTTP_ADDR = "127.0.0.1:3001"
DEFAULT_INGEST_QUEUE_MAX_SAMPLES = 50_000
DEFAULT_INGEST_WRITERS = 2
DEFAULT_MAX_AGENT_STREAMS = 10_000
DEFAULT_STREAM_WINDOW_KB = 4
"""Each agent stream's HTTP/2 flow-control window, KB. Small enough that gRPC reads each
connection into 8 KiB buffers instead of 64 KiB ones: about 16 to 40 KB a loaded stream
at 5,000 streams, against 70 with 16 KB (docs/performance.md, "Memory per loaded stream,
a fourth pass")."""
DEFAULT_TOKENS_FILE = "der-data/tokens.json"

AgentIdentityMode = Literal["fingerprint", "subject"]
MtlsMode = Literal["front", "native"]
AuthMode = Literal["auto", "on", "off"]
MetricsAuth = Literal["viewer", "open"]

HEADEND_ID_MAX_LEN = 128
_HEADEND_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{HEADEND_ID_MAX_LEN - 1}}}")
_NOT_IN_HEADEND_ID = re.compile(r"[^A-Za-z0-9._-]+")

_EXPORTER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind, or ``localhost``) only reaches this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def default_headend_id(grpc_addr: str) -> str:
    """``HOSTNAME:PORT``: this machine's host name and the port of ``grpc_addr`` (the
    configured one, ``0`` included). A headend restarted on the same machine and port gets
    the same id, so it finds the sessions it left open."""
    _, port = split_host_port(grpc_addr, "HEADEND_GRPC_ADDR")
    host = _NOT_IN_HEADEND_ID.sub("-", socket.gethostname()).strip("-._") or "localhost"
    suffix = f":{port}"
    return host[: HEADEND_ID_MAX_LEN - len(suffix)] + suffix


def _path(env: Mapping[str, str], variable: str) -> Path | None:
    raw = env.get(variable, "").strip()
    return Path(raw) if raw else None


def _choice(env: Mapping[str, str], variable: str, choices: tuple[str, ...]) -> str:
    """The value of ``variable`` (the first choice when unset), one of ``choices``."""
    raw = env.get(variable, "").strip().lower()
    if not raw:
        return choices[0]
    if raw not in choices:
        raise DerSdkError(f"{variable}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _int(env: Mapping[str, str], variable: str, default: int) -> int:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise DerSdkError(f"{variable}={raw!r} is not a whole number") from None


def _float(env: Mapping[str, str], variable: str, default: float) -> float:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise DerSdkError(f"{variable}={raw!r} is not a number") from None


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
class ExporterConfig:
    """One continuous exporter to run: ``NAME`` or ``NAME=TYPE`` in ``HEADEND_EXPORTERS``."""

    name: str
    """The instance's name: the key of its cursor in storage and of its options."""
    type: str
    """The ``der_exporters`` name of what to run (default: the instance's name)."""
    options: dict[str, str]
    """``HEADEND_EXPORTER_<NAME>_<OPTION>`` by lower-case option name."""


def _exporters(env: Mapping[str, str]) -> tuple[ExporterConfig, ...]:
    """The exporters of ``HEADEND_EXPORTERS`` with their options.

    :raises DerSdkError: a malformed or repeated name, naming the variable.
    """
    raw = env.get("HEADEND_EXPORTERS", "").strip()
    found: dict[str, ExporterConfig] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        name, _, kind = (text.strip() for text in entry.partition("="))
        if not _EXPORTER_NAME.fullmatch(name) or (kind == "" and "=" in entry):
            raise DerSdkError(
                f"HEADEND_EXPORTERS={raw!r}: {entry!r} is not NAME or NAME=TYPE (NAME: "
                "lower-case letters, digits, '-' and '_'; for example files=parquet-folder)"
            )
        if name in found:
            raise DerSdkError(f"HEADEND_EXPORTERS={raw!r} names exporter {name!r} twice")
        prefix = f"HEADEND_EXPORTER_{name.upper().replace('-', '_')}_"
        options = {
            variable.removeprefix(prefix).lower(): value
            for variable, value in env.items()
            if variable.startswith(prefix) and len(variable) > len(prefix)
        }
        found[name] = ExporterConfig(name=name, type=kind or name, options=options)
    return tuple(found.values())


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
    ingest_writers: int = DEFAULT_INGEST_WRITERS
    max_agent_streams: int = DEFAULT_MAX_AGENT_STREAMS
    stream_window_kb: int = DEFAULT_STREAM_WINDOW_KB
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    mtls_mode: MtlsMode = "front"
    agent_identity: AgentIdentityMode = "fingerprint"
    auth: AuthMode = "auto"
    tokens_path: Path = Path(DEFAULT_TOKENS_FILE)
    metrics_auth: MetricsAuth = "viewer"
    insecure: bool = False
    headend_id: str = ""
    """Empty: :func:`default_headend_id` of ``grpc_addr``, filled in when built."""
    bus_url: str | None = None
    """``HEADEND_BUS_URL``: the message bus shared by the replicas of a cluster
    (``nats://127.0.0.1:4222``); ``None`` runs one headend alone (docs/cluster.md)."""
    bus_namespace: str = "der"
    """``HEADEND_BUS_NAMESPACE``: the prefix of every name this cluster uses on the bus."""
    bus_presence_max_age_s: float = 15.0
    """``HEADEND_BUS_PRESENCE_MAX_AGE_S``: seconds a replica's presence entries outlive it."""
    bus_telemetry_max_bytes: int = 1024**3
    """``HEADEND_BUS_TELEMETRY_MAX_BYTES``: bytes of telemetry the bus holds for the writers."""
    bus_telemetry_max_messages: int = 1_000_000
    """``HEADEND_BUS_TELEMETRY_MAX_MESSAGES``: telemetry messages the bus holds."""
    bus_ack_wait_s: float = 30.0
    """``HEADEND_BUS_ACK_WAIT_S``: seconds before a telemetry message a writer took and did
    not acknowledge (it died) goes to another writer."""
    bus_dispatch_reconcile_s: float = 2.0
    """``HEADEND_BUS_DISPATCH_RECONCILE_S``: seconds between a replica's reads of the open
    dispatches in storage, to deliver what its agents serve (a nudge that was lost)."""
    console_confirm_share: float = 0.5
    """``CONSOLE_CONFIRM_SHARE``: the console confirms a dispatch changing an asset's
    setpoint by more than this share of its capacity, the larger absolute value of
    ``min_mw`` and ``max_mw`` (docs/headend.md, der_sdk_headend/console/dispatch.py)."""
    comms_loss_alarm_s: float = 30.0
    """``HEADEND_COMMS_LOSS_ALARM_S``: seconds an agent may stay away before a
    ``comms_loss`` alarm is raised for each of its assets (docs/alarms.md)."""
    alarm_debounce_s: float = 10.0
    """``HEADEND_ALARM_DEBOUNCE_S``: a condition raised again this soon after it cleared
    re-activates the same alarm, and notifications wait this long (docs/alarms.md)."""
    exporters: tuple[ExporterConfig, ...] = ()
    """``HEADEND_EXPORTERS``: the continuous exporters this headend runs (docs/export.md)."""
    export_batch_rows: int = 10_000
    """``HEADEND_EXPORT_BATCH_ROWS``: samples an exporter is given at most at a time."""
    export_interval_s: float = 5.0
    """``HEADEND_EXPORT_INTERVAL_S``: seconds between an exporter's reads once caught up."""
    export_max_days: float = 31.0
    """``HEADEND_EXPORT_MAX_DAYS``: the longest range ``GET /telemetry/export`` serves."""
    headend_id_configured: bool = False
    """Whether ``headend_id`` was given (``HEADEND_ID``) rather than derived; set when
    built. Only a configured id scopes the closing of sessions at start: a derived one
    changes with the host name (a container's, at every restart) and would leave the
    sessions of earlier runs open for ever."""

    def __post_init__(self) -> None:
        if self.ingest_queue_max_samples < 1:
            raise DerSdkError(
                f"INGEST_QUEUE_MAX_SAMPLES={self.ingest_queue_max_samples} must be at least 1"
            )
        if not 1 <= self.ingest_writers <= 16:
            raise DerSdkError(f"INGEST_WRITERS={self.ingest_writers} must be 1..16")
        if self.max_agent_streams < 1:
            raise DerSdkError(f"MAX_AGENT_STREAMS={self.max_agent_streams} must be at least 1")
        if not 4 <= self.stream_window_kb <= 1024:
            raise DerSdkError(
                f"HEADEND_STREAM_WINDOW_KB={self.stream_window_kb} must be 4..1024 (KB per "
                "agent stream; 4 by default)"
            )
        split_host_port(self.grpc_addr, "HEADEND_GRPC_ADDR")
        split_host_port(self.http_addr, "HEADEND_HTTP_ADDR")
        object.__setattr__(self, "headend_id_configured", bool(self.headend_id))
        if not self.headend_id:
            object.__setattr__(self, "headend_id", default_headend_id(self.grpc_addr))
        elif not _HEADEND_ID.fullmatch(self.headend_id):
            raise DerSdkError(
                f"HEADEND_ID={self.headend_id!r} is not a headend id: use 1 to "
                f"{HEADEND_ID_MAX_LEN} letters, digits, '.', '_', ':' or '-', starting with a "
                "letter or digit (for example headend-a)"
            )
        if self.bus_url is not None:
            self.bus_options()  # the bounds, named by variable
        if not 0 < self.bus_dispatch_reconcile_s <= 3600:
            raise DerSdkError(
                f"HEADEND_BUS_DISPATCH_RECONCILE_S={self.bus_dispatch_reconcile_s:g} must be "
                "more than 0 and at most 3600 seconds"
            )
        if not 0 < self.comms_loss_alarm_s <= 86_400:
            raise DerSdkError(
                f"HEADEND_COMMS_LOSS_ALARM_S={self.comms_loss_alarm_s:g} must be more than 0 "
                "and at most 86400 seconds (default 30)"
            )
        if not 0 <= self.alarm_debounce_s <= 3600:
            raise DerSdkError(
                f"HEADEND_ALARM_DEBOUNCE_S={self.alarm_debounce_s:g} must be 0 to 3600 "
                "seconds (default 10; 0 turns the de-bounce off)"
            )
        if not 0 <= self.console_confirm_share <= 1:
            raise DerSdkError(
                f"CONSOLE_CONFIRM_SHARE={self.console_confirm_share:g} must be a share from 0 "
                "to 1 (0.5: confirm a change larger than half an asset's capacity)"
            )
        if not 1 <= self.export_batch_rows <= 1_000_000:
            raise DerSdkError(
                f"HEADEND_EXPORT_BATCH_ROWS={self.export_batch_rows} must be 1..1000000"
            )
        if not 0 < self.export_interval_s <= 3600:
            raise DerSdkError(
                f"HEADEND_EXPORT_INTERVAL_S={self.export_interval_s:g} must be more than 0 and "
                "at most 3600 seconds (default 5)"
            )
        if not 0 < self.export_max_days <= 3660:
            raise DerSdkError(
                f"HEADEND_EXPORT_MAX_DAYS={self.export_max_days:g} must be more than 0 and at "
                "most 3660 days (default 31)"
            )
        if not self.split_policy:
            raise DerSdkError("SPLIT_POLICY is empty; leave it unset for capacity_weighted")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise DerSdkError(
                "HEADEND_TLS_CERT and HEADEND_TLS_KEY go together: set both to serve TLS, "
                "or neither"
            )
        if self.client_ca is not None and self.tls_cert is None:
            raise DerSdkError(
                "HEADEND_CLIENT_CA (mutual TLS) needs HEADEND_TLS_CERT and HEADEND_TLS_KEY"
            )
        if self.mtls_mode not in ("front", "native"):
            raise DerSdkError(f"HEADEND_MTLS_MODE={self.mtls_mode!r} is not one of front, native")
        if self.mtls_mode == "native" and self.client_ca is None:
            raise DerSdkError(
                "HEADEND_MTLS_MODE=native chooses how mutual TLS is served, and needs "
                "HEADEND_CLIENT_CA (with HEADEND_TLS_CERT and HEADEND_TLS_KEY); without "
                "mutual TLS leave it unset"
            )

    @property
    def clustered(self) -> bool:
        """Whether this headend is a replica of a cluster (``HEADEND_BUS_URL`` is set)."""
        return self.bus_url is not None

    def bus_options(self) -> BusOptions:
        """The bus options of ``HEADEND_BUS_*``.

        :raises DerSdkError: a value is out of range; the message names the variable.
        """
        variables: dict[str, tuple[str, object]] = {
            "presence_max_age_s": (
                "HEADEND_BUS_PRESENCE_MAX_AGE_S",
                self.bus_presence_max_age_s,
            ),
            "telemetry_max_bytes": (
                "HEADEND_BUS_TELEMETRY_MAX_BYTES",
                self.bus_telemetry_max_bytes,
            ),
            "telemetry_max_messages": (
                "HEADEND_BUS_TELEMETRY_MAX_MESSAGES",
                self.bus_telemetry_max_messages,
            ),
            "telemetry_ack_wait_s": ("HEADEND_BUS_ACK_WAIT_S", self.bus_ack_wait_s),
        }
        try:
            return BusOptions(
                namespace=self.bus_namespace,
                presence_max_age_s=self.bus_presence_max_age_s,
                telemetry_max_bytes=self.bus_telemetry_max_bytes,
                telemetry_max_messages=self.bus_telemetry_max_messages,
                telemetry_ack_wait_s=self.bus_ack_wait_s,
            )
        except ValueError as exc:
            text = str(exc)
            if text.startswith("bus namespace"):
                raise DerSdkError(f"HEADEND_BUS_NAMESPACE: {text}") from None
            field = text.removeprefix("BusOptions.").split(" ", 1)[0]
            variable, value = variables.get(field, ("HEADEND_BUS_*", "?"))
            raise DerSdkError(f"{variable}={value!r} must be more than 0") from None

    @property
    def tls(self) -> bool:
        """Whether gRPC and REST are served over TLS."""
        return self.tls_cert is not None

    @property
    def mtls(self) -> bool:
        """Whether agents must present a client certificate signed by ``client_ca``."""
        return self.client_ca is not None

    @property
    def tls_front(self) -> bool:
        """Whether the headend's own TLS front serves the agent port (mutual TLS in
        ``front`` mode), rather than gRPC's TLS or plaintext."""
        return self.mtls and self.mtls_mode == "front"

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
            ingest_writers=_int(env, "INGEST_WRITERS", DEFAULT_INGEST_WRITERS),
            max_agent_streams=_int(env, "MAX_AGENT_STREAMS", DEFAULT_MAX_AGENT_STREAMS),
            stream_window_kb=_int(env, "HEADEND_STREAM_WINDOW_KB", DEFAULT_STREAM_WINDOW_KB),
            tls_cert=_path(env, "HEADEND_TLS_CERT"),
            tls_key=_path(env, "HEADEND_TLS_KEY"),
            client_ca=_path(env, "HEADEND_CLIENT_CA"),
            mtls_mode=_choice(env, "HEADEND_MTLS_MODE", ("front", "native")),  # type: ignore[arg-type]
            agent_identity=_choice(env, "AGENT_IDENTITY", ("fingerprint", "subject")),  # type: ignore[arg-type]
            auth=_choice(env, "HEADEND_AUTH", ("auto", "on", "off")),  # type: ignore[arg-type]
            tokens_path=_path(env, "HEADEND_TOKENS_FILE") or Path(DEFAULT_TOKENS_FILE),
            metrics_auth=_choice(env, "METRICS_AUTH", ("viewer", "open")),  # type: ignore[arg-type]
            insecure=_flag(env, "HEADEND_INSECURE"),
            headend_id=env.get("HEADEND_ID", "").strip(),
            bus_url=env.get("HEADEND_BUS_URL", "").strip() or None,
            bus_namespace=env.get("HEADEND_BUS_NAMESPACE", "").strip() or "der",
            bus_presence_max_age_s=_float(env, "HEADEND_BUS_PRESENCE_MAX_AGE_S", 15.0),
            bus_telemetry_max_bytes=_int(env, "HEADEND_BUS_TELEMETRY_MAX_BYTES", 1024**3),
            bus_telemetry_max_messages=_int(env, "HEADEND_BUS_TELEMETRY_MAX_MESSAGES", 1_000_000),
            bus_ack_wait_s=_float(env, "HEADEND_BUS_ACK_WAIT_S", 30.0),
            bus_dispatch_reconcile_s=_float(env, "HEADEND_BUS_DISPATCH_RECONCILE_S", 2.0),
            console_confirm_share=_float(env, "CONSOLE_CONFIRM_SHARE", 0.5),
            comms_loss_alarm_s=_float(env, "HEADEND_COMMS_LOSS_ALARM_S", 30.0),
            alarm_debounce_s=_float(env, "HEADEND_ALARM_DEBOUNCE_S", 10.0),
            exporters=_exporters(env),
            export_batch_rows=_int(env, "HEADEND_EXPORT_BATCH_ROWS", 10_000),
            export_interval_s=_float(env, "HEADEND_EXPORT_INTERVAL_S", 5.0),
            export_max_days=_float(env, "HEADEND_EXPORT_MAX_DAYS", 31.0),
        )
