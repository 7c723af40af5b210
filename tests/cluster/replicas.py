"""Real headend replicas as processes, for the cluster tests (issue 17).

A :class:`ReplicaCluster` runs N ``der headend`` processes (:class:`Replica`, ids ``a``,
``b``, ``c`` ...) in bus mode against one PostgreSQL database of the test's own and one
NATS namespace of the test's own, with in-process agents (:class:`CountingAgent`) that
dial any subset of them. It can kill -9 and restart a replica, put a TCP proxy between
the replicas and PostgreSQL (:attr:`ReplicaCluster.pg_proxy`: cut it to make the database
unreachable for the replicas only; the server is shared by the whole machine), and run a
private ``nats-server`` (:class:`NatsServer`) that a test may kill and start again (the
machine's NATS is shared too).

Every replica's output goes to ``<tmp>/<id>.log``; :meth:`ReplicaCluster.log_tails` is
what a failing test prints. Nothing here is a mock: the replicas are the real command,
the agents the real agent, the storage and the bus the real servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import shutil
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from der_sdk.agent_config import load_agent_config
from der_sdk.extensions import SetpointResult
from der_sdk.inventory import Inventory, load_inventory
from der_sdk.models import TERMINAL_DISPATCH_STATES, TelemetrySample
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing import free_port, services_required
from der_sdk.testing.faults import HeadendProcess, TcpProxy
from der_sdk_agent.agent import Agent

__all__ = [
    "ASSETS",
    "SITES",
    "CountingAgent",
    "NatsServer",
    "Replica",
    "ReplicaCluster",
    "eventually",
    "open_cluster",
    "settle_dispatch",
    "site_assets",
]

log = logging.getLogger("tests.cluster")

T = TypeVar("T")

# Three sites of two batteries each, and a lone asset served by a single-asset agent.
SITES = [f"5170000{n}-0000-4000-8000-000000000000" for n in (1, 2, 3)]
LONE_SITE = "51700009-0000-4000-8000-000000000000"
LONE = "a5000009-0000-4000-8000-000000000001"


def site_assets(site: str) -> list[str]:
    """The two asset ids of site ``site`` (one of :data:`SITES`)."""
    n = SITES.index(site) + 1
    return [f"a500000{n}-0000-4000-8000-00000000000{k}" for k in (1, 2)]


ASSETS = [asset for site in SITES for asset in site_assets(site)] + [LONE]


def _inventory_yaml() -> str:
    lines = ["sites:"]
    for n, site in enumerate([*SITES, LONE_SITE], start=1):
        lines.append(f"  - {{site_id: {site}, name: Yard {n}}}")
    lines.append("assets:")
    for site in SITES:
        for k, asset in enumerate(site_assets(site), start=1):
            lines.append(
                f"  - {{asset_id: {asset}, site_id: {site}, name: B{SITES.index(site) + 1}{k}, "
                "capacity_mwh: 4, max_mw: 2, min_mw: -2}"
            )
    lines.append(
        f"  - {{asset_id: {LONE}, site_id: {LONE_SITE}, name: Lone, capacity_mwh: 2, "
        "max_mw: 1, min_mw: -1}"
    )
    return "\n".join(lines) + "\n"


AGENT_CONFIG = """
telemetry_interval_s: {interval}
heartbeat_interval_s: 0.5
reconnect_initial_s: 0.1
reconnect_max_s: 0.5
"""


async def eventually(
    probe: Callable[[], Awaitable[T]], *, within: float, what: str, every: float = 0.1
) -> T:
    """Await ``probe`` until it returns something truthy; fail after ``within`` seconds
    with ``what`` and the last thing it returned (or raised)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while True:
        try:
            last = await probe()
        except (AssertionError, httpx.TransportError) as exc:
            last = exc
        else:
            if last:
                return last
        if loop.time() >= deadline:
            pytest.fail(f"timed out after {within:g} s waiting until {what}; last: {last!r}")
        await asyncio.sleep(every)


# ----------------------------------------------------------------------------- NATS


class NatsServer:
    """A ``nats-server`` of the test's own, with JetStream on a file store in ``store``,
    on a free loopback port that stays the same across :meth:`kill` and :meth:`start`.

    Skips the test when ``nats-server`` is not installed (fails under
    ``DER_SDK_REQUIRE_SERVICES=1``).
    """

    def __init__(self, store: Path, log_path: Path) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            reason = "nats-server is not installed (apt-get install nats-server)"
            if services_required():
                pytest.fail(f"{reason}; DER_SDK_REQUIRE_SERVICES=1 requires it", pytrace=False)
            pytest.skip(reason)
        self.binary = binary
        self.store = store
        self.log_path = log_path
        self.port = free_port()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start it (again) and wait until it accepts connections."""
        self.store.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self._process = await asyncio.create_subprocess_exec(
                self.binary,
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        for _ in range(250):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return
        await self.kill()
        pytest.fail(f"nats-server did not listen on {self.port} within 5 s", pytrace=False)

    async def kill(self) -> None:
        """SIGKILL (an outage: clients see their connection drop)."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


# ----------------------------------------------------------------------------- replicas


class Replica(HeadendProcess):
    """One ``der headend`` of the cluster: :class:`HeadendProcess` with the bus settings,
    ``HEADEND_ID`` and REST without tokens."""

    def __init__(self, cluster: ReplicaCluster, replica_id: str, env: Mapping[str, str]) -> None:
        workdir = cluster.tmp / replica_id
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            cluster.assets_path,
            cluster.replica_database_url,
            workdir,
            env=env,
            name=f"replica-{replica_id}",
            log_path=cluster.tmp / f"{replica_id}.log",
            # DER_SDK_REPLICA_LOG_LEVEL=DEBUG: every line of the replicas, for a hunt
            log_level=os.environ.get("DER_SDK_REPLICA_LOG_LEVEL", "INFO"),
        )
        self.replica_id = replica_id
        self.cluster = cluster

    def settings(self) -> dict[str, str | None]:
        cluster = self.cluster
        return {
            **super().settings(),
            "HEADEND_ID": self.replica_id,
            "HEADEND_BUS_URL": cluster.bus_url,
            "HEADEND_BUS_NAMESPACE": cluster.namespace,
            "HEADEND_BUS_PRESENCE_MAX_AGE_S": str(cluster.presence_max_age_s),
            "HEADEND_BUS_ACK_WAIT_S": str(cluster.ack_wait_s),
            "HEADEND_AUTH": "off",
            "METRICS_AUTH": "open",
            "HEADEND_TOKENS_FILE": str(self.workdir / "tokens.json"),
        }

    async def get(self, path: str, **params: Any) -> httpx.Response:
        """``GET path`` on this replica's REST API."""
        return await self.cluster.http.get(f"{self.http_url}{path}", params=params or None)

    async def json(self, path: str, **params: Any) -> Any:
        """The JSON of ``GET path``; fails the test unless it answered 200."""
        response = await self.get(path, **params)
        assert response.status_code == 200, (self.replica_id, path, response.text)
        return response.json()

    async def post(self, path: str, body: Any) -> httpx.Response:
        return await self.cluster.http.post(f"{self.http_url}{path}", json=body)

    async def health(self) -> dict[str, Any]:
        """``GET /healthz`` (200 or 503) as JSON."""
        response = await self.get("/healthz")
        assert response.status_code in (200, 503), (self.replica_id, response.text)
        result: dict[str, Any] = response.json()
        return result

    async def metric(self, name: str) -> float | None:
        """The value of the unlabelled metric ``name`` in ``GET /metrics``."""
        text = (await self.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return None

    async def connected_assets(self) -> set[str]:
        """The asset ids ``GET /agents`` says are connected."""
        return {row["asset_id"] for row in await self.json("/agents") if row["connected"]}


# ----------------------------------------------------------------------------- agents


class CountingAgent(Agent):
    """A real in-process agent that counts what it sampled per asset (:attr:`sampled`:
    the highest sample ``seq``, which is also how many) and every setpoint written to a
    device (:attr:`device_writes`: asset id to the MW values, in order)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampled: dict[str, int] = {a.asset_id: 0 for a in self.assets}
        self.device_writes: dict[str, list[float]] = {a.asset_id: [] for a in self.assets}
        for asset_id, runtime in self.adapters.items():
            runtime.adapter.apply_setpoint = self._counting(  # type: ignore[method-assign]
                asset_id, runtime.adapter.apply_setpoint
            )

    def _counting(
        self, asset_id: str, write: Callable[[float, float | None], Awaitable[SetpointResult]]
    ) -> Callable[[float, float | None], Awaitable[SetpointResult]]:
        async def counted(mw: float, duration_s: float | None = None) -> SetpointResult:
            self.device_writes[asset_id].append(mw)
            return await write(mw, duration_s)

        return counted

    async def sample_once(self) -> list[TelemetrySample]:
        samples = await super().sample_once()
        for sample in samples:
            self.sampled[sample.asset_id] = max(self.sampled[sample.asset_id], sample.seq)
        return samples


class _InOrder(random.Random):
    """Random numbers as usual (backoff jitter), but a "shuffle" of the headend list that
    keeps the order given (:class:`der_sdk_agent.headends.HeadendRotation`)."""

    def sample(self, population: Sequence[T], k: int, **_: Any) -> list[T]:  # type: ignore[override]
        return list(population)[:k]


# ----------------------------------------------------------------------------- the cluster


class ReplicaCluster:
    """N headend replicas, their database, their bus namespace and their agents.

    :param tmp: a directory of the test's own (logs, inventory, buffers).
    :param database_url: an empty PostgreSQL database of the test's own.
    :param bus_url: the NATS server (the shared one, or a :class:`NatsServer`'s).
    :param replica_ids: one replica each, started by :meth:`start`.
    :param pg_proxy: route the replicas' database connections through a :class:`TcpProxy`
        (:attr:`pg_proxy`) so that a test can cut them without touching the server.
    :param presence_max_age_s, ack_wait_s: ``HEADEND_BUS_PRESENCE_MAX_AGE_S`` and
        ``HEADEND_BUS_ACK_WAIT_S``, short for fast tests.
    :param env: more environment for every replica.
    :param telemetry_interval_s: the agents' sampling period.
    """

    def __init__(
        self,
        tmp: Path,
        *,
        database_url: str,
        bus_url: str,
        replica_ids: Sequence[str] = ("a", "b", "c"),
        pg_proxy: bool = False,
        presence_max_age_s: float = 3.0,
        ack_wait_s: float = 2.0,
        env: Mapping[str, str] | None = None,
        telemetry_interval_s: float = 0.1,
        namespace: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.bus_url = bus_url
        self.namespace = namespace or f"test-{secrets.token_hex(5)}"
        self._complete_through: dict[str, int] = {}  # per asset, by wait_stored
        self.presence_max_age_s = presence_max_age_s
        self.ack_wait_s = ack_wait_s
        self.assets_path = tmp / "assets.yaml"
        self.assets_path.write_text(_inventory_yaml())
        self.agent_config_path = tmp / "agent.yaml"
        self.agent_config_path.write_text(
            textwrap.dedent(AGENT_CONFIG.format(interval=telemetry_interval_s))
        )
        self.inventory: Inventory = load_inventory(str(self.assets_path))
        self.plugins: Plugins = load_plugins()
        self.pg_proxy: TcpProxy | None = None
        self._want_pg_proxy = pg_proxy
        self.replica_database_url = database_url
        self._replica_ids = list(replica_ids)
        self._env = dict(env or {})
        self.replicas: dict[str, Replica] = {}
        self.nats: NatsServer | None = None
        """The cluster's own NATS server (``open_cluster(private_nats=True)``), or ``None``."""
        self.agents: list[CountingAgent] = []
        self.http = httpx.AsyncClient(timeout=5.0)
        self._closed = False

    # -- life cycle

    async def start(self) -> ReplicaCluster:
        """Start every replica at once; return once each answers ``/healthz``."""
        if self._want_pg_proxy:
            parts = urlsplit(self.database_url)
            self.pg_proxy = await TcpProxy(
                parts.hostname or "127.0.0.1", parts.port or 5432
            ).start()
            netloc = parts.netloc.rsplit("@", 1)
            host = f"127.0.0.1:{self.pg_proxy.port}"
            netloc[-1] = host
            self.replica_database_url = urlunsplit(parts._replace(netloc="@".join(netloc)))
        for replica_id in self._replica_ids:
            self.replicas[replica_id] = Replica(self, replica_id, self._env)
        await asyncio.gather(*(r.start(timeout_s=60) for r in self.replicas.values()))
        return self

    async def wait_healthy(self, *ids: str, within: float = 30.0) -> None:
        """Until ``/healthz`` answers 200 on the replicas ``ids`` (default: every one)."""
        for replica in self.pick(ids):

            async def ok(replica: Replica = replica) -> bool:
                return await replica.healthz() == 200

            await eventually(ok, within=within, what=f"replica {replica.replica_id} is healthy")

    def pick(self, ids: Iterable[str] = ()) -> list[Replica]:
        """The replicas ``ids`` (default: every one), in order."""
        chosen = list(ids) or list(self.replicas)
        return [self.replicas[i] for i in chosen]

    def __getitem__(self, replica_id: str) -> Replica:
        return self.replicas[replica_id]

    async def kill(self, replica_id: str) -> None:
        """SIGKILL replica ``replica_id``: no clean-up of any kind runs."""
        await self.replicas[replica_id].kill()

    async def restart(self, replica_id: str) -> None:
        """Start a replica that was killed or stopped again, same id and ports."""
        await self.replicas[replica_id].restart(timeout_s=60)

    async def close(self) -> None:
        """Stop the agents, then every replica (SIGTERM, then SIGKILL after 10 s), then
        the proxy and the HTTP client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for agent in self.agents:
            with contextlib.suppress(Exception):
                await agent.stop()
        await asyncio.gather(
            *(r.terminate(10) for r in self.replicas.values() if r.running),
            return_exceptions=True,
        )
        if self.pg_proxy is not None:
            await self.pg_proxy.close()
        await self.http.aclose()

    async def __aenter__(self) -> ReplicaCluster:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
        if exc_type is not None:
            print(self.log_tails())

    def log_tails(self, lines: int = 60) -> str:
        """The last ``lines`` of every replica's log, for a failing test's output."""
        parts = []
        for replica in self.replicas.values():
            parts.append(f"--- last {lines} lines of {replica.log_path} ({replica!r}) ---")
            parts.append(replica.log_tail(lines))
        return "\n".join(parts)

    # -- agents

    def addrs(self, ids: Iterable[str] = ()) -> str:
        """``HEADEND_GRPC`` of an agent that may use the replicas ``ids`` (default: all)."""
        return ",".join(r.grpc_addr for r in self.pick(ids))

    def replica_at(self, grpc_addr: str | None) -> str | None:
        """The id of the replica listening on ``grpc_addr`` (an agent's ``headend``)."""
        for replica in self.replicas.values():
            if replica.grpc_addr == grpc_addr:
                return replica.replica_id
        return None

    async def start_agent(
        self,
        *,
        site: str | None = None,
        asset: str | None = None,
        on: Iterable[str] = (),
        connect: bool = True,
        seed: int | None = None,
        in_order: bool = False,
    ) -> CountingAgent:
        """Start an in-process agent: a gateway of ``site`` (agent id ``gw-<site>``) or a
        single-asset agent of ``asset``, dialling the replicas ``on`` (default: every
        one); with ``connect``, return once it registered.

        The agent shuffles its list (seeded with ``seed``) and starts at the first; with
        ``in_order`` it keeps the order of ``on``: it starts at ``on[0]`` and moves to
        the next when that one fails.
        """
        if (site is None) == (asset is None):
            raise ValueError("give exactly one of site and asset")
        if site is not None:
            assets = self.inventory.assets_for_site(site)
            site_id, agent_id = site, f"gw-{site[:8]}"
        else:
            assert asset is not None
            assets = [self.inventory.assets[asset]]
            site_id, agent_id = assets[0].site_id, f"asset-{asset[:8]}"
        agent = CountingAgent(
            agent_id=agent_id,
            site_id=site_id,
            assets=assets,
            headend=self.addrs(on),
            config=load_agent_config(str(self.agent_config_path)),
            plugins=self.plugins,
            buffer_path=str(self.tmp / f"{agent_id}-{len(self.agents)}.sqlite3"),
            rng=_InOrder(seed) if in_order else random.Random(seed),
        )
        await agent.start()
        self.agents.append(agent)
        if connect:
            try:
                async with asyncio.timeout(20):
                    await agent.wait_connected()
            except TimeoutError:
                pytest.fail(f"agent {agent_id} did not register: {agent.stats()}")
        return agent

    def replica_of(self, agent: Agent) -> str | None:
        """The id of the replica ``agent`` is registered with now, or ``None``."""
        stats = agent.stats()
        return self.replica_at(stats.headend) if stats.connected else None

    # -- what PostgreSQL holds

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(self.database_url)  # directly, not through the proxy
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def stored_seqs(self) -> dict[str, list[int]]:
        """Every stored telemetry row's sample ``seq`` per asset, sorted (duplicates kept)."""
        rows = await self._fetch("SELECT asset_id, seq FROM telemetry ORDER BY asset_id, seq")
        result: dict[str, list[int]] = {}
        for asset_id, seq in rows:
            result.setdefault(str(asset_id), []).append(int(seq))
        return result

    async def newest_stored(self, asset_id: str) -> datetime | None:
        """The ``ts`` of the newest stored sample of ``asset_id``."""
        rows = await self._fetch("SELECT max(ts) FROM telemetry WHERE asset_id = $1", asset_id)
        value = rows[0][0]
        return value if isinstance(value, datetime) else None

    async def open_sessions(self) -> list[tuple[str, str]]:
        """``(asset_id, headend_id)`` of every session not closed."""
        rows = await self._fetch(
            "SELECT asset_id, headend_id FROM agent_sessions WHERE disconnected_at IS NULL"
        )
        return [(str(a), str(h)) for a, h in rows]

    async def wait_stored(self, agents: Iterable[CountingAgent], *, within: float) -> None:
        """Until PostgreSQL holds every sample the ``agents`` took so far: each asset's
        seqs ``1..n`` all stored, not just its newest.

        The newest alone is not enough: after a stall each stream writer retries with its
        own backoff, so a newer message can be stored while an older one still waits for
        its writer's next attempt; a test that then counts rows would see a sample "lost"
        that is only late. On a timeout the message names the seqs still missing.
        """
        wanted = {a: n for agent in agents for a, n in agent.sampled.items()}

        async def caught_up() -> dict[str, int] | None:
            stored = await self.stored_seqs()
            missing: dict[str, list[int]] = {}
            for asset_id, n in wanted.items():
                absent = sorted(set(range(1, n + 1)) - set(stored.get(asset_id, ())))
                if absent:
                    missing[asset_id] = absent
            if not missing:
                for asset_id, n in wanted.items():
                    self._complete_through[asset_id] = max(
                        self._complete_through.get(asset_id, 0), n
                    )
                return wanted
            raise AssertionError(
                "seqs not stored yet: "
                + "; ".join(f"{a}: {len(s)}, first {s[:10]}" for a, s in missing.items())
            )

        try:
            await eventually(
                caught_up, within=within, what="PostgreSQL holds every sample taken", every=0.25
            )
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc.msg}\nbus: {await self.bus_state()}")

    async def bus_state(self) -> str:
        """The telemetry stream's and its writers' consumer's state, for a failure message."""
        import nats

        try:
            client = await nats.connect(self.bus_url, connect_timeout=2, max_reconnect_attempts=0)
        except Exception as exc:
            return f"unreachable ({exc!r})"
        try:
            js = client.jetstream()
            stream = await js.stream_info(f"{self.namespace}-telemetry")
            consumer = await js.consumer_info(f"{self.namespace}-telemetry", "writers")
            return (
                f"stream messages={stream.state.messages} first_seq={stream.state.first_seq} "
                f"last_seq={stream.state.last_seq}; consumer ack_pending="
                f"{consumer.num_ack_pending} pending={consumer.num_pending} redelivered="
                f"{consumer.num_redelivered} waiting={consumer.num_waiting} delivered="
                f"{consumer.delivered} ack_floor={consumer.ack_floor}"
            )
        except Exception as exc:
            return f"no state ({exc!r})"
        finally:
            await client.close()

    async def assert_exactly_once(self, agents: Iterable[CountingAgent]) -> dict[str, int]:
        """Fail unless every asset of ``agents`` has its samples ``1..n`` stored once
        each, where ``n`` is what the last :meth:`wait_stored` saw complete (call it
        first), and no sample stored twice or beyond what was sampled; returns the rows
        per asset. Samples taken since may be stored out of order (a writer still in its
        backoff holds an older message while a newer one is stored), so those are not
        counted as missing yet."""
        agents = list(agents)
        stored = await self.stored_seqs()
        counts: dict[str, int] = {}
        for agent in agents:
            for asset_id, sampled in agent.sampled.items():
                seqs = stored.get(asset_id, [])
                twice = sorted(seq for seq, n in Counter(seqs).items() if n > 1)
                assert not twice, f"{asset_id}: samples stored twice: {twice[:20]}"
                top = seqs[-1] if seqs else 0
                complete = self._complete_through.get(asset_id, 0)
                missing = sorted(set(range(1, complete + 1)) - set(seqs))
                assert not missing, f"{asset_id}: samples missing in PostgreSQL: {missing[:20]}"
                assert top <= sampled, f"{asset_id}: stored seq {top} beyond sampled {sampled}"
                counts[asset_id] = len(seqs)
        return counts


async def settle_dispatch(
    replica: Replica, dispatch_id: str, *, within: float = 15.0
) -> dict[str, Any]:
    """Until ``GET /dispatch/{id}`` on ``replica`` shows a final state; the record."""

    async def final() -> dict[str, Any] | None:
        record: dict[str, Any] = await replica.json(f"/dispatch/{dispatch_id}")
        return record if record["state"] in TERMINAL_DISPATCH_STATES else None

    return await eventually(
        final, within=within, what=f"dispatch {dispatch_id} reaches a final state"
    )


@asynccontextmanager
async def open_cluster(
    tmp: Path,
    *,
    replicas: int = 3,
    private_nats: bool = False,
    start: bool = True,
    **options: Any,
) -> AsyncIterator[ReplicaCluster]:
    """A started :class:`ReplicaCluster` of ``replicas`` replicas (ids ``a``, ``b``,
    ``c``, ...) on a temporary PostgreSQL database and a fresh NATS namespace, both
    removed afterwards; skips without PostgreSQL or NATS (fails under
    ``DER_SDK_REQUIRE_SERVICES=1``).

    :param private_nats: run a :class:`NatsServer` of the test's own (yielded cluster's
        :attr:`ReplicaCluster.nats`) instead of the machine's shared server.
    :param start: start the replicas (else call :meth:`ReplicaCluster.start`).
    :param options: more :class:`ReplicaCluster` arguments.

    When the body fails, the tail of every replica's log is printed (pytest shows it
    with the failure).
    """
    postgres = pytest.importorskip("der_sdk_postgres.testing", reason="needs der-sdk-postgres")
    nats_testing = pytest.importorskip("der_sdk_nats.testing", reason="needs der-sdk-nats")
    from der_sdk_nats import NatsBus

    from der_sdk.bus import BusOptions

    nats: NatsServer | None = None
    if private_nats:
        nats = NatsServer(tmp / "nats-store", tmp / "nats.log")
        await nats.start()
        bus_url = nats.url
    else:
        bus_url = nats_testing.require_nats()
    try:
        async with postgres.temporary_database() as database_url:
            ids = [chr(ord("a") + i) for i in range(replicas)]
            cluster = ReplicaCluster(
                tmp, database_url=database_url, bus_url=bus_url, replica_ids=ids, **options
            )
            cluster.nats = nats
            try:
                if start:
                    await cluster.start()
                yield cluster
            except BaseException:
                await cluster.close()
                print(cluster.log_tails())
                raise
            finally:
                await cluster.close()
                if nats is None or nats.running:
                    with contextlib.suppress(Exception):
                        cleaner = NatsBus.from_url(bus_url, BusOptions(namespace=cluster.namespace))
                        await cleaner.connect()
                        await cleaner.destroy()
                        await cleaner.close()
    finally:
        if nats is not None:
            await nats.kill()
