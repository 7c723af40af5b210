"""The headend, assembled in one place: inventory, storage, presence, ingest, dispatch,
the gRPC agent link and the REST API.

``Headend(config).start()`` brings everything up in order; ``stop()`` takes it down in the
reverse order and may be called any number of times. :func:`run_headend` is the command
line's entry: start, run until SIGINT or SIGTERM, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Generator
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import grpc
import uvicorn
from litestar.exceptions import ServiceUnavailableException

from der_sdk.backoff import Backoff
from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.inventory import Inventory, load_inventory
from der_sdk.models import TelemetrySample, utc_now
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.storage.contract import StorageBackend, close_sessions_left_open, open_storage
from der_sdk_headend import gc_pauses
from der_sdk_headend.alarms import AlarmBook, CommsLossWatch
from der_sdk_headend.audit import Auditor
from der_sdk_headend.cluster import Cluster
from der_sdk_headend.cluster.dispatch import ClusterDispatcher
from der_sdk_headend.cluster.ingest import BusTelemetrySink, StreamWriters
from der_sdk_headend.cluster.presence import ClusterPresence
from der_sdk_headend.config import (
    DEFAULT_STREAM_WINDOW_KB,
    HeadendConfig,
    is_loopback,
    split_host_port,
)
from der_sdk_headend.dispatch import Dispatcher, PresenceRouter
from der_sdk_headend.exporters import ExporterRunner
from der_sdk_headend.ingest import TelemetryIngest
from der_sdk_headend.link import AgentLinkService, add_agent_link
from der_sdk_headend.link.identity import FrontPeers
from der_sdk_headend.link.tls_front import TlsFront, front_ssl_context
from der_sdk_headend.presence import Presence
from der_sdk_headend.programs import ProgramRunner
from der_sdk_headend.rest import create_app
from der_sdk_headend.rest.auth import RestAuth
from der_sdk_headend.tls import load_server_tls

if TYPE_CHECKING:
    from der_sdk_headend.console.events import LiveHub

__all__ = ["Headend", "check_exposure", "is_loopback", "run_headend"]

log = logging.getLogger("der.headend")

STREAM_GRACE_S = 1.0
"""How long agent streams get to end on their own when the headend stops."""
HTTP_STOP_TIMEOUT_S = 5.0
INGEST_DRAIN_S = 5.0
"""How long queued telemetry gets to reach storage when the headend stops."""
HTTP_START_TIMEOUT_S = 5.0
STORAGE_RETRY_INITIAL_S = 1.0
"""First wait before retrying storage that is unreachable at start; doubles each attempt
up to :data:`STORAGE_RETRY_MAX_S`."""
STORAGE_RETRY_MAX_S = 30.0

T = TypeVar("T")


KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
HALF_OPEN_DETECTION_S = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
"""Worst case for either side to notice a link that went silent (30 s, within 40 s)."""

STREAM_WINDOW_BYTES = DEFAULT_STREAM_WINDOW_KB * 1024
"""The default HTTP/2 flow-control window of each agent stream
(``HEADEND_STREAM_WINDOW_KB``): what gRPC reads ahead of the
headend (a telemetry batch of 100 samples by column is about 8 KB, as rows about 18 KB).
It also sets how much one read of a connection takes, and so gRPC's read buffers: once a
read takes more than about 5 KB, gRPC (grpcio 1.85) reads that connection into 64 KiB
blocks, each resident until its last byte is consumed (about 70 KB a loaded stream at
5,000 streams with 16 KB, 16 to 40 KB with 4 KB). It also bounds one stream's own rate to
about a window per round trip: over a WAN link with a 50 ms round trip about 80 KB/s,
some 1,000 samples/s by column (four times that at 16 KB) (docs/performance.md, "Memory
per loaded stream, a fourth pass")."""

TCP_READ_CHUNK_BYTES = 8 * 1024
"""The most gRPC's older TCP endpoint reads from an agent's connection at once. The
event-engine endpoint of grpcio 1.85 does not consult it: it reads into 64 KB buffers
once its own estimate of a read passes 12 KB, whatever this says (docs/performance.md,
"Memory per loaded stream, a third pass"). Kept: it costs nothing."""

GRPC_SERVER_OPTIONS = (
    # A busy port is an error, not a second headend silently sharing it.
    ("grpc.so_reuseport", 0),
    # Agents ping every 20 s (der_sdk_agent.link); gRPC's default would answer pings more
    # often than every 5 minutes with GOAWAY "too_many_pings" and drop the agent. Allow
    # one every 10 s, and never count strikes.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # The headend pings too: a ping unanswered for 10 s closes the stream, so a silent
    # (half-open) agent link is noticed within 20 + 10 = 30 s and its sessions closed.
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC waits for a ping's answer for grpc.http2.ping_timeout_ms (default 60 s), not
    # only keepalive_timeout_ms: without this a silent link took 80 s to notice.
    ("grpc.http2.ping_timeout_ms", 10_000),
    # Memory per loaded stream (docs/performance.md, "Ingest at fleet scale"): while the
    # ingest queue is full a stream's reader stops reading, and what its agent sent on
    # sits in gRPC core up to the stream's flow-control window. gRPC grows that window
    # from its bandwidth-delay probes, to hundreds of KB per stream on loopback; keep
    # it at HEADEND_STREAM_WINDOW_KB (grpc.http2.lookahead_bytes, set with the server)
    # so the agent's own buffer holds the rest.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.experimental.tcp_max_read_chunk_size", TCP_READ_CHUNK_BYTES),
)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the headend's owner handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Headend:
    """The reference headend: REST for operators, gRPC for agents, one storage backend.

    :param config: where to listen, the inventory file, the storage URL, the split policy.
    :param plugins: the loaded plugins; ``None`` loads them with :func:`load_plugins`.
    """

    def __init__(self, config: HeadendConfig, plugins: Plugins | None = None) -> None:
        self.config = config
        self.plugins = plugins if plugins is not None else load_plugins()
        self._inventory: Inventory | None = None
        self._storage: StorageBackend | None = None
        self._cluster: Cluster | None = None
        self._cluster_presence: ClusterPresence | None = None
        self._auditor: Auditor | None = None
        self._rest_auth: RestAuth | None = None
        self._presence: Presence | None = None
        self._ingest: TelemetryIngest | None = None
        self._stream_writers: StreamWriters | None = None  # cluster ingest (bus mode)
        self._dispatcher: Dispatcher | None = None
        self._alarms: AlarmBook | None = None
        self._server_certificate_not_after: datetime | None = None
        self._comms_loss: CommsLossWatch | None = None
        self._live_hub: LiveHub | None = None  # the console's live updates
        self._exporters: ExporterRunner | None = None
        self._programs: ProgramRunner | None = None
        self._link: AgentLinkService | None = None
        self._grpc_server: grpc.aio.Server | None = None
        self._grpc_port: int | None = None
        self._front: TlsFront | None = None
        self._http_socket: socket.socket | None = None
        self._http_server: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self._stop_lock = asyncio.Lock()

    # ------------------------------------------------------------------ parts

    @property
    def inventory(self) -> Inventory:
        return _started(self._inventory, "inventory")

    @property
    def storage(self) -> StorageBackend:
        return _started(self._storage, "storage")

    @property
    def presence(self) -> Presence:
        return _started(self._presence, "presence")

    @property
    def cluster(self) -> Cluster | None:
        """This replica's part in a cluster, or ``None`` for a headend alone (no
        ``HEADEND_BUS_URL``)."""
        return self._cluster

    @property
    def cluster_presence(self) -> ClusterPresence | None:
        """The cluster's view of presence (bus mode), or ``None`` for a headend alone or
        before it started."""
        return self._cluster_presence

    @property
    def ingest(self) -> TelemetryIngest:
        return _started(self._ingest, "ingest")

    @property
    def stream_writers(self) -> StreamWriters | None:
        """The writers that store the bus's telemetry stream (bus mode), or ``None``."""
        return self._stream_writers

    @property
    def auditor(self) -> Auditor:
        """Writes the audit trail (``GET /audit``)."""
        return _started(self._auditor, "audit trail")

    @property
    def rest_auth(self) -> RestAuth:
        """REST tokens and the authentication mode (``HEADEND_AUTH``)."""
        return _started(self._rest_auth, "REST authentication")

    @property
    def ingest_or_none(self) -> TelemetryIngest | None:
        """The ingest, or ``None`` while storage is not open yet (``/healthz``)."""
        return self._ingest

    @property
    def presence_or_none(self) -> Presence | None:
        return self._presence

    @property
    def dispatcher(self) -> Dispatcher:
        return _started(self._dispatcher, "dispatcher")

    @property
    def alarms(self) -> AlarmBook:
        """Alarms: conditions from agents and comms loss, acknowledged by operators."""
        return _started(self._alarms, "alarm book")

    @property
    def exporters(self) -> ExporterRunner | None:
        """The continuous exporters of ``HEADEND_EXPORTERS``, or ``None`` when none run."""
        return self._exporters

    @property
    def programs(self) -> ProgramRunner | None:
        """The northbound programs (``programs:`` in the inventory), or ``None`` before
        the headend started them."""
        return self._programs

    @property
    def live_hub(self) -> LiveHub:
        """Fans ingest and dispatch changes out to the console's streams
        (``/console/events``)."""
        return _started(self._live_hub, "console live hub")

    @property
    def grpc_port(self) -> int:
        """The port agents dial (the real one when configured with port 0)."""
        return _started(self._grpc_port, "gRPC port")

    @property
    def http_port(self) -> int:
        """The REST port (the real one when configured with port 0)."""
        sock = _started(self._http_socket, "HTTP socket")
        return int(sock.getsockname()[1])

    @property
    def http_url(self) -> str:
        """The REST base URL, e.g. ``http://127.0.0.1:3001``."""
        host, _ = self.config.http_host_port
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{host}:{self.http_port}"

    @property
    def grpc_addr(self) -> str:
        """Where agents dial, with the real port."""
        host = self.config.grpc_addr.rpartition(":")[0]
        return f"{host}:{self.grpc_port}"

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Load the inventory, open storage, restore state, then listen for agents and REST.

        :raises DerSdkError: bad configuration, storage that cannot be opened, or an
            address already in use; the message says which.
        """
        if self._started:
            raise RuntimeError("this Headend was already started; create a new one")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        check_exposure(config)
        try:
            self.plugins.split_policies.get(config.split_policy)
        except UnknownNameError as exc:
            raise DerSdkError(f"SPLIT_POLICY: {exc}") from None
        inventory = load_inventory(
            config.assets_path,
            asset_types=self.plugins.asset_types.names(),
            split_policies=self.plugins.split_policies.names(),
            program_sources={s.name: s.options for s in self.plugins.program_sources},
        )
        if inventory.programs and config.clustered:
            raise DerSdkError(
                f"{config.assets_path}: programs: a replica of a cluster (HEADEND_BUS_URL) "
                "does not run programs yet; run them on a headend alone (docs/programs.md)"
            )
        self._inventory = inventory
        await self._start_rest_auth()

        try:
            storage = open_storage(config.database_url, self.plugins)
        except UnknownNameError as exc:
            raise DerSdkError(f"DATABASE_URL={config.database_url!r}: {exc}") from None
        if config.clustered:
            if not storage.shared:
                raise DerSdkError(
                    f"HEADEND_BUS_URL is set, so this headend is a replica of a cluster, and "
                    f"replicas need a storage they share: DATABASE_URL={config.database_url!r} "
                    f"is {storage.name}, which one process owns. Use PostgreSQL "
                    "(DATABASE_URL=postgresql://...), or unset HEADEND_BUS_URL to run alone "
                    "(docs/cluster.md)"
                )
            self._cluster = Cluster(config, self.plugins)
        exporters = None
        if config.exporters:  # options are checked before anything opens
            exporters = ExporterRunner(
                storage,
                self.plugins,
                config.exporters,
                asset_type_of={a.asset_id: a.asset_type for a in inventory.assets.values()},
                batch_rows=config.export_batch_rows,
                interval_s=config.export_interval_s,
            )
            exporters.build()
        self._storage = storage  # set before open(): /healthz says degraded while it waits
        self._auditor = Auditor(storage)
        await self._open_storage(storage)
        if self._cluster is not None:
            await self._cluster.connect(on_retry=self._start_http_early)
        if config.reset_db:
            await storage.reset()
            log.warning("RESET_DB: deleted all stored data in %s", storage.name)
        await self.rest_auth.storage_ready(self.auditor)
        # With a configured id only this headend's: other headends sharing the storage keep
        # their agents' sessions. A derived id may differ from the last run's (a new host
        # name), so without one every session left open is closed, as by a lone headend.
        # A replica of a cluster always closes only its own (its id is unique in the
        # cluster; the sessions of a replica that died are closed by the others).
        scoped = config.headend_id_configured or config.clustered
        stale = await close_sessions_left_open(
            storage, utc_now(), config.headend_id if scoped else None
        )
        if stale:
            log.info(
                "closed %d session(s) left open by a previous run of headend %s",
                stale,
                config.headend_id,
            )

        self._presence = Presence(storage, self.plugins, config.headend_id)
        # --- cluster presence (issue 17): share this replica's agents on the bus, watch
        # the others'; before agents are accepted.
        if self._cluster is not None:
            self._cluster_presence = ClusterPresence(self._cluster, self._presence, storage)
            await self._cluster_presence.start()
        # --- end cluster presence
        writers = max(1, min(config.ingest_writers, storage.concurrent_writes))
        # --- cluster ingest (bus mode): agents are acknowledged once JetStream holds their
        # batches; this replica's stream writers store the stream into the database.
        bus = self._cluster.bus if self._cluster is not None else None
        self._ingest = TelemetryIngest(
            inventory,
            self.plugins,
            storage,
            self._presence,
            max_queued_samples=config.ingest_queue_max_samples,
            writers=writers,
            sink=BusTelemetrySink(bus, storage, self.plugins) if bus is not None else None,
        )
        await self._ingest.warm()
        # --- alarms (issue 21): condition events change alarms before they are stored
        # and acknowledged; a stream that stays away raises comms_loss for its assets.
        self._alarms = AlarmBook(
            storage, self.plugins, inventory, debounce_s=config.alarm_debounce_s
        )
        self._ingest.event_listener = self._alarms.on_event
        self._comms_loss = CommsLossWatch(
            self._alarms,
            self._presence,
            inventory,
            storage,
            grace_s=config.comms_loss_alarm_s,
            connected=self._asset_connected,
        )
        await self._comms_loss.start()
        if self._cluster_presence is not None:
            watch = self._comms_loss
            self._cluster_presence.on_agents_gone = lambda entries: watch.lost_elsewhere(
                (entry.agent_id, entry.asset_ids) for entry in entries
            )
        # --- end alarms
        self._ingest.start()
        if bus is not None:
            self._stream_writers = StreamWriters(
                bus, storage, self.plugins, self._ingest, writers=writers
            )
            self._stream_writers.start()
        # --- end cluster ingest
        if self._cluster is None:
            self._dispatcher = Dispatcher(
                inventory,
                self.plugins,
                storage,
                PresenceRouter(self._presence),
                config.split_policy,
            )
        else:
            # A replica: storage is the record, other replicas are nudged over the bus and
            # every replica reconciles from storage (der_sdk_headend/cluster/dispatch.py).
            # Registers its bus command, so before serve() below.
            self._dispatcher = ClusterDispatcher(
                inventory,
                self.plugins,
                storage,
                PresenceRouter(self._presence),
                config.split_policy,
                cluster=self._cluster,
                locate=(
                    self._cluster_presence.replica_of_asset
                    if self._cluster_presence is not None
                    else None
                ),
                reconcile_s=config.bus_dispatch_reconcile_s,
            )
        self._dispatcher.latest = self._ingest.latest  # available ranges for site splits
        reloaded = await self._dispatcher.load_open()
        if reloaded:
            log.info(
                "%d open dispatch(es) reloaded; delivered or settled when their agents connect",
                reloaded,
            )
        self._dispatcher.start()
        if exporters is not None:
            self._exporters = exporters
            exporters.start()
        # --- console live updates (issue 18): fed by ingest's latest samples (only while a
        # console listens) and by dispatch record changes; in bus mode other replicas'
        # dispatch changes are re-read from storage on a slow timer. (Imported here: the
        # console's package imports the REST app, which this module imports too.)
        from der_sdk_headend.console.events import LiveHub

        self._live_hub = LiveHub(
            attach=self._attach_live,
            storage=storage,
            poll_dispatches=self._cluster is not None,
        )
        self._dispatcher.on_record = self._live_hub.offer_dispatch
        # --- end console live updates
        if self._cluster is not None:
            await self._cluster.serve()

        await self._start_grpc()
        if self._http_server is None:
            await self._start_http()
        # --- programs (issue 23): northbound sources feeding scheduled dispatches, once
        # agents can connect and REST answers.
        self._programs = ProgramRunner(
            inventory,
            self.plugins,
            dispatcher=self._dispatcher,
            storage=storage,
            auditor=self.auditor,
            alarms=self._alarms,
            latest=self._ingest.latest,
        )
        self._programs.build()
        self._programs.start()
        # --- end programs

    def _asset_connected(self, asset_id: str) -> bool:
        """Whether an agent serves ``asset_id`` now: here, or in bus mode on any replica."""
        if self._presence is not None and self._presence.stream_for(asset_id) is not None:
            return True
        cluster = self._cluster_presence
        return cluster is not None and cluster.holder_of_asset(asset_id) is not None

    def _attach_live(self, listener: Callable[[TelemetrySample], None] | None) -> None:
        """Point ingest's latest-sample listener at the console's hub (or detach it)."""
        if self._ingest is not None:
            self._ingest.latest_listener = listener

    async def _start_rest_auth(self) -> None:
        """Read the REST token file and decide the authentication mode; before REST can
        answer (it may come up early, while storage is unreachable)."""
        self._rest_auth = RestAuth(self.config)
        await self._rest_auth.start()

    async def _open_storage(self, storage: StorageBackend) -> None:
        """Open storage, retrying with backoff while its server is unreachable.

        Backends raise ``ConnectionError`` (or ``TimeoutError``) when their server cannot be
        reached: each failed attempt is one log line, the REST API comes up early so
        ``/healthz`` answers 503 ``degraded``, and agents are not accepted until storage is
        open. Any other error ends the start with its message.
        """
        backoff = Backoff(STORAGE_RETRY_INITIAL_S, STORAGE_RETRY_MAX_S, multiplier=2.0, jitter=0.0)
        attempt = 0
        while True:
            attempt += 1
            delay = backoff.delay(attempt)
            try:
                await storage.open()
                return
            except (ConnectionError, TimeoutError) as exc:
                log.warning(
                    "storage %s not available (attempt %d): %s; retrying in %.1fs",
                    storage.name,
                    attempt,
                    exc,
                    delay,
                )
            except DerSdkError:
                raise
            except Exception as exc:
                raise DerSdkError(
                    f"cannot open storage DATABASE_URL={self.config.database_url!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            await self._start_http_early()
            await asyncio.sleep(delay)

    async def _start_http_early(self) -> None:
        """Bring REST up while storage or the bus is still unreachable, so that
        ``/healthz`` answers 503 ``degraded`` with the reason."""
        if self._http_server is None:
            await self._start_http()
            log.info(
                "REST is up at %s; /healthz reports degraded until the headend has started",
                self.http_url,
            )

    async def _start_grpc(self) -> None:
        assert self._inventory and self._storage and self._presence
        assert self._ingest and self._dispatcher
        tls = load_server_tls(self.config)
        if tls is not None:
            self._server_certificate_not_after = tls.certificate.not_valid_after_utc
        # Under mutual TLS the headend terminates TLS itself (der_sdk_headend.link.tls_front),
        # so that refused handshakes are audited; gRPC then listens on loopback only. In
        # HEADEND_MTLS_MODE=native gRPC's own TLS checks the client certificate instead.
        front_peers: FrontPeers | None = {} if tls is not None and self.config.tls_front else None
        self._link = AgentLinkService(
            inventory=self._inventory,
            storage=self._storage,
            presence=self._presence,
            ingest=self._ingest,
            dispatcher=self._dispatcher,
            auditor=self._auditor,
            mtls=self.config.mtls,
            agent_identity=self.config.agent_identity,
            front=front_peers,
        )
        self._link.authorizer.log_startup_warnings()
        # Without SO_REUSEPORT a second headend on the same port fails loudly instead of
        # silently sharing the agents.
        # A cap on concurrent streams bounds the memory a flood of agents can take; the
        # ones beyond it get RESOURCE_EXHAUSTED and retry with their backoff.
        # gRPC core refuses calls the Python side has not picked up yet beyond 1,000
        # waiting (all beyond 3,000), as CANCELLED or INTERNAL: in a reconnect storm of
        # 5,000 agents a third of the registers failed that way (docs/performance.md).
        # Let them wait in line up to the stream cap instead.
        streams = self.config.max_agent_streams
        server = grpc.aio.server(
            options=(
                *GRPC_SERVER_OPTIONS,
                ("grpc.http2.lookahead_bytes", self.config.stream_window_kb * 1024),
                ("grpc.server.max_pending_requests", streams),
                ("grpc.server.max_pending_requests_hard_limit", streams),
            ),
            maximum_concurrent_rpcs=streams,
        )
        add_agent_link(self._link, server)
        addr = self.config.grpc_addr
        listen = "127.0.0.1:0" if front_peers is not None else addr
        try:
            if tls is None or front_peers is not None:
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, tls.grpc_credentials())
        except RuntimeError as exc:
            raise DerSdkError(f"cannot listen for agents on {listen}: {exc}") from None
        if not port:
            raise DerSdkError(f"cannot listen for agents on {listen}: the address is not available")
        self._grpc_server = server
        await server.start()
        if front_peers is None:
            self._grpc_port = int(port)
            return
        config = self.config
        assert config.tls_cert and config.tls_key and config.client_ca
        try:
            context = front_ssl_context(config.tls_cert, config.tls_key, config.client_ca)
        except (OSError, ValueError) as exc:  # checked by load_server_tls; not expected
            raise DerSdkError(f"cannot set up TLS for the agent port: {exc}") from None
        front = TlsFront(context, int(port), self.auditor, front_peers)
        host, public_port = split_host_port(addr, "HEADEND_GRPC_ADDR")
        try:
            self._grpc_port = await front.start(host, public_port)
        except OSError as exc:
            raise DerSdkError(f"cannot listen for agents on {addr}: {exc}") from None
        self._front = front

    async def _start_http(self) -> None:
        host, port = self.config.http_host_port
        addr = self.config.http_addr
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise DerSdkError(f"cannot serve REST on {addr}: {exc}") from None
        try:
            if sys.platform != "win32":  # on Windows SO_REUSEADDR lets two servers share a port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise DerSdkError(f"cannot serve REST on {addr}: {exc}") from None
        self._http_socket = sock

        tls: dict[str, str] = {}
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            tls = {
                "ssl_certfile": str(self.config.tls_cert),
                "ssl_keyfile": str(self.config.tls_key),
            }
        uv_config = uvicorn.Config(
            create_app(self),
            **tls,  # type: ignore[arg-type]
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=2,
        )
        server = _EmbeddedUvicorn(uv_config)
        self._http_server = server
        self._http_task = asyncio.create_task(server.serve(sockets=[sock]), name="headend-http")
        # The socket already listens, so clients can connect; wait only to report a
        # server that could not start.
        async with asyncio.timeout(HTTP_START_TIMEOUT_S):
            while not server.started:
                if self._http_task.done():
                    self._http_task.result()
                    raise DerSdkError(f"the REST server on {addr} stopped while starting")
                await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Stop accepting, end agent streams, close sessions, stop REST, close storage.

        Safe to call more than once, and after a failed :meth:`start`.
        """
        async with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            if self._programs is not None:  # no program makes dispatches from here on
                await self._programs.close()
            if self._front is not None:  # no new agent connections; live ones end below
                self._front.stop_accepting()
            if self._live_hub is not None:  # console streams end with "bye"
                await self._live_hub.close()
            if self._link is not None:
                await self._link.close_all(STREAM_GRACE_S)
            if self._grpc_server is not None:
                await self._grpc_server.stop(grace=STREAM_GRACE_S)
            if self._front is not None:
                await self._front.close()
            if self._comms_loss is not None:  # a stopping headend raises no comms_loss
                await self._comms_loss.close()
            if self._presence is not None:
                await self._presence.detach_all()
            if self._ingest is not None:  # in bus mode: drains the queue into the stream
                await self._ingest.close(INGEST_DRAIN_S)
            if self._stream_writers is not None:  # unacknowledged messages are redelivered
                await self._stream_writers.close(INGEST_DRAIN_S)
            if self._dispatcher is not None:
                await self._dispatcher.close()
            if self._exporters is not None:
                await self._exporters.close()
            if self._alarms is not None:
                await self._alarms.close()
            if self._cluster_presence is not None:  # cluster presence (issue 17)
                try:
                    await self._cluster_presence.close()  # releases this replica's entries
                except Exception:
                    log.exception("closing the cluster presence failed")
            if self._cluster is not None:
                try:
                    await self._cluster.close()
                except Exception:
                    log.exception("closing the message bus failed")
            await self._stop_http()
            if self._rest_auth is not None:
                await self._rest_auth.close()
            if self._storage is not None:
                try:
                    await self._storage.close()
                except Exception:
                    log.exception("closing storage %s failed", self._storage.name)
            log.info("headend stopped")

    async def _stop_http(self) -> None:
        if self._http_server is not None and self._http_task is not None:
            self._http_server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._http_task), HTTP_STOP_TIMEOUT_S)
            except TimeoutError:
                self._http_server.force_exit = True
                self._http_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._http_task
            except Exception:
                log.exception("the REST server failed")
        if self._http_socket is not None:
            self._http_socket.close()

    # ------------------------------------------------------------------ status

    @property
    def agents_connected(self) -> int:
        """Agents connected: to this headend, or in bus mode to any replica."""
        if self._cluster_presence is not None:  # cluster presence (issue 17)
            return self._cluster_presence.agent_count()
        return len(self._presence.streams()) if self._presence else 0

    @property
    def server_certificate_not_after(self) -> datetime | None:
        """When the certificate the headend serves (``HEADEND_TLS_CERT``, read at start)
        expires; ``None`` without TLS or before the agent port is up."""
        return self._server_certificate_not_after

    @property
    def assets_connected(self) -> int:
        """Assets served by a connected agent: here, or in bus mode on any replica."""
        if self._cluster_presence is not None:  # cluster presence (issue 17)
            return self._cluster_presence.asset_count()
        return len(self._presence.connected_asset_ids()) if self._presence else 0


def _link_security(config: HeadendConfig) -> str:
    if config.mtls:
        return f"mutual TLS, {config.mtls_mode}"
    return "TLS" if config.tls else "plaintext"


def check_exposure(config: HeadendConfig) -> None:
    """Refuse to serve plaintext beyond this machine unless told to (``--insecure``).

    :raises DerSdkError: an address is not loopback, TLS is off and ``insecure`` is not
        set; the message names the variable and both ways out.
    """
    exposed = [
        (variable, addr)
        for variable, addr in (
            ("HEADEND_GRPC_ADDR", config.grpc_addr),
            ("HEADEND_HTTP_ADDR", config.http_addr),
        )
        if not is_loopback(split_host_port(addr, variable)[0])
    ]
    if not exposed or config.tls:
        return
    where = ", ".join(f"{variable}={addr}" for variable, addr in exposed)
    if not config.insecure:
        raise DerSdkError(
            f"{where} is not a loopback address and TLS is off: agents and operators would "
            "talk in plaintext. Set HEADEND_TLS_CERT and HEADEND_TLS_KEY (docs/security.md; "
            "`der certs` makes development certificates), or pass --insecure "
            "(HEADEND_INSECURE=1) to serve plaintext on purpose"
        )
    log.warning(
        "INSECURE: serving plaintext without TLS on %s (--insecure / HEADEND_INSECURE); "
        "anyone on the network can read and forge agent and operator traffic",
        where,
    )


class NotStartedError(ServiceUnavailableException, RuntimeError):
    """A part of the headend was used before start() made it: a RuntimeError in code, and
    a 503 (not a 500 with a traceback) when REST asks while storage is still unreachable."""


def _started(value: T | None, what: str) -> T:
    if value is None:
        raise NotStartedError(
            f"the headend's {what} is not available: the headend has not started yet "
            "(call start() first) or is waiting for its storage (see /healthz)"
        )
    return value


GC_GEN0_THRESHOLD = 2_000
"""Allocations between young-generation collections in ``der headend`` (Python: 700).

Each collection scans what was allocated since the last one, and with the freezer
(:class:`gc_pauses.GcFreezer`) a full collection scans little more than the young
generations, so this bounds every pause. At 5,000 loaded streams a full collection took
55 to 79 ms of CPU at 10,000 and 7 ms at 2,000, the longest young one 62 ms and 25 ms,
with no difference in stored samples/s that stood out of the noise
(docs/performance.md)."""


SWITCH_INTERVAL_S = 0.0002
"""How long ``der headend``'s event loop keeps the GIL when another thread asks for it
(Python: 5 ms). The storage thread takes the GIL back after every SQLite statement; each
time it waited for a busy loop to let go, so a dispatch's record, a few statements, waited
for several switch intervals behind ingest. On the 2-core reference machine at half the
SQLite ingest maximum, dispatch p99 was 147 ms at 5 ms, 102 ms at 1 ms and 47 ms at
0.2 ms, and SQLite ingest rose from 32,000 to 38,000 samples/s (docs/performance.md)."""


def _tune_interpreter() -> None:
    """``der headend``'s thread switch interval (:data:`SWITCH_INTERVAL_S`)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _tune_gc() -> None:
    """Once started: move everything loaded so far (modules, plugins, the inventory) out
    of the cycle collector's reach, and collect the young generation less often. Ingest
    allocates a few objects per sample; with the defaults the collector rescanned the
    same long-lived objects thousands of times a second (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gen0), gen1, gen2)


async def run_headend(config: HeadendConfig) -> None:
    """Run a headend until SIGINT or SIGTERM (the ``der headend`` command). SIGUSR2 runs
    a full garbage collection at once, timed like any other (``der_gc_pause_*``): how
    long one stalls this headend now. Unless ``GC_FREEZE=off``, what survives the young
    collections is frozen (:class:`gc_pauses.GcFreezer`), so full ones stay short.

    The signals are handled from the first moment: a stop asked for while the headend
    is still starting (waiting for its storage, say) ends the start cleanly.
    """
    freeze = gc_pauses.freeze_setting(os.environ)
    compact_growth = gc_pauses.compact_growth_setting(os.environ)
    headend = Headend(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    freezer: gc_pauses.GcFreezer | None = None
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
    try:
        starting = asyncio.create_task(headend.start(), name="headend-start")
        stopping = asyncio.create_task(stop.wait(), name="headend-stop-signal")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop signal received while starting; shutting down")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            stopping.cancel()
            return
        stopping.cancel()
        starting.result()
        _tune_gc()
        _tune_interpreter()
        gc_pauses.install()
        if freeze:
            freezer = gc_pauses.GcFreezer(loop, growth=compact_growth)
            freezer.start()
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGUSR2, gc_pauses.full_collection)
            handled.append(signal.SIGUSR2)
        log.info(
            "headend ready: REST %s (OpenAPI %s/schema/openapi.json), agents %s (%s), "
            "storage %s, headend id %s%s, %d sites, %d assets",
            headend.http_url,
            headend.http_url,
            headend.grpc_addr,
            _link_security(config),
            headend.storage.name,
            config.headend_id,
            f", replica on bus {headend.cluster.bus.name}" if headend.cluster else "",
            len(headend.inventory.sites),
            len(headend.inventory.assets),
        )
        await stop.wait()
        log.info("stop signal received; shutting down")
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if freezer is not None:
            freezer.stop()
        await headend.stop()
