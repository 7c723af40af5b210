"""Helpers for the cluster dispatch tests: replicas as in-process headends sharing one
PostgreSQL database and one NATS namespace, and in-process agents on any of them.

Every test gets a database and a bus namespace of its own, dropped and destroyed after.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from der_sdk.agent_config import AgentConfig, AssetAdapterConfig
from der_sdk.bus import BusOptions, open_bus
from der_sdk.bus.contract import BusUnavailableError
from der_sdk.models import Dispatch, DispatchEvent
from der_sdk.plugins import Plugins
from der_sdk.testing import free_port, services_required
from der_sdk.testing.waits import wait_until
from der_sdk_agent.agent import Agent
from der_sdk_agent.testing import FAST_AGENT_SETTINGS
from der_sdk_headend.cluster.dispatch import ClusterDispatcher
from der_sdk_headend.service import Headend
from tests.headend.headend_kit import INVENTORY_YAML, make_config

__all__ = ["ClusterRig", "OwnNats", "Replica", "cluster_rig"]


@dataclass
class Replica:
    """One replica: its headend and a REST client to it."""

    name: str
    headend: Headend
    http: httpx.AsyncClient

    @property
    def dispatcher(self) -> ClusterDispatcher:
        dispatcher = self.headend.dispatcher
        assert isinstance(dispatcher, ClusterDispatcher), "not a replica of a cluster"
        return dispatcher

    @property
    def bus_name(self) -> str:
        cluster = self.headend.cluster
        assert cluster is not None
        return cluster.replica

    async def dispatch(self, **body: Any) -> Dispatch:
        response = await self.http.post("/dispatch", json=body)
        assert response.status_code == 202, response.text
        return msgspec.json.decode(response.content, type=Dispatch)

    async def detail(self, dispatch_id: str) -> tuple[Dispatch, list[DispatchEvent]]:
        """``GET /dispatch/{id}`` on this replica: the record and its events."""
        response = await self.http.get(f"/dispatch/{dispatch_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        events = msgspec.convert(body.pop("events"), list[DispatchEvent])
        return msgspec.convert(body, Dispatch), events

    async def wait_state(self, dispatch_id: str, state: str, timeout_s: float = 10.0) -> Dispatch:
        async def probe() -> Dispatch | None:
            record, _ = await self.detail(dispatch_id)
            return record if record.state == state else None

        return await wait_until(
            probe, f"dispatch {dispatch_id} {state} on {self.name}", timeout_s=timeout_s
        )


@dataclass
class ClusterRig:
    """Replicas and agents of one test."""

    tmp_path: Path
    plugins: Plugins
    database_url: str
    bus_url: str
    namespace: str
    replicas: list[Replica] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)

    @property
    def inventory_path(self) -> Path:
        path = self.tmp_path / "assets.yaml"
        if not path.exists():
            path.write_text(INVENTORY_YAML)
        return path

    async def replica(self, name: str, *, reconcile_s: float = 0.5, locate: bool = True) -> Replica:
        """Start replica ``name`` (its ``HEADEND_ID``). With ``locate``, its dispatcher
        finds agents through the test rig's replicas (until cluster presence does)."""
        config = make_config(
            self.inventory_path,
            DATABASE_URL=self.database_url,
            HEADEND_ID=name,
            HEADEND_BUS_URL=self.bus_url,
            HEADEND_BUS_NAMESPACE=self.namespace,
            HEADEND_BUS_DISPATCH_RECONCILE_S=str(reconcile_s),
        )
        headend = Headend(config, plugins=self.plugins)
        await headend.start()
        http = httpx.AsyncClient(base_url=headend.http_url, timeout=10)
        replica = Replica(name, headend, http)
        self.replicas.append(replica)
        if locate and replica.dispatcher.locate is None:
            replica.dispatcher.locate = self.locate
        return replica

    def locate(self, asset_id: str) -> str | None:
        """The bus name of the replica whose presence holds ``asset_id``'s stream."""
        for replica in self.replicas:
            presence = replica.headend.presence_or_none
            if presence is not None and presence.stream_for(asset_id) is not None:
                return replica.bus_name
        return None

    async def agent(
        self,
        site_id: str,
        assets: Sequence[str],
        on: Sequence[Replica],
        *,
        agent_id: str = "gw-1",
        options: dict[str, Any] | None = None,
    ) -> Agent:
        """Start an agent serving ``assets`` with the ``test-device`` adapter (its
        ``options``), dialling the replicas ``on`` in that order (the next one when its
        own fails); return once it registered."""
        inventory = on[0].headend.inventory
        config = AgentConfig(
            default_adapter="test-device",
            assets={
                a: AssetAdapterConfig(adapter="test-device", options=dict(options or {}))
                for a in assets
            },
            **FAST_AGENT_SETTINGS,
        )
        agent = Agent(
            agent_id=agent_id,
            site_id=site_id,
            assets=[inventory.asset(a) for a in assets],
            headend=",".join(r.headend.grpc_addr for r in on),
            config=config,
            plugins=self.plugins,
            buffer_path=":memory:",
            rng=_InOrder(),
        )
        await agent.start()
        self.agents.append(agent)
        await wait_until(
            lambda: _registered(on, assets), f"agent {agent_id} registered", timeout_s=10
        )
        return agent

    async def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                await agent.stop()
        for replica in self.replicas:
            await replica.http.aclose()
            await replica.headend.stop()


class _InOrder(random.Random):
    """Keeps the agent's headend addresses in the order given (and jitters as usual)."""

    def sample(self, population: Sequence[Any], k: int, **_: Any) -> list[Any]:  # type: ignore[override]
        return list(population)[:k]


async def _registered(on: Sequence[Replica], assets: Sequence[str]) -> bool:
    return any(all(r.headend.presence.stream_for(a) is not None for a in assets) for r in on)


class OwnNats:
    """A ``nats-server`` of a test's own (JetStream on, file store in ``directory``), on
    a free loopback port, that the test can kill and start again on the same port."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            reason = "nats-server is not installed (apt-get install nats-server)"
            if services_required():
                pytest.fail(f"{reason}; DER_SDK_REQUIRE_SERVICES=1 requires it", pytrace=False)
            pytest.skip(reason)
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary,
            *("-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.directory)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await wait_until(listening, f"nats-server listening on {self.port}", timeout_s=5)

    async def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
            self.process = None


@contextlib.asynccontextmanager
async def cluster_rig(
    tmp_path: Path, plugins: Plugins, bus_url: str | None = None
) -> AsyncIterator[ClusterRig]:
    """A database and a bus namespace of its own (on the test NATS server, or
    ``bus_url``); replicas and agents stopped after."""
    from der_sdk_nats.testing import require_nats
    from der_sdk_postgres.testing import temporary_database

    bus_url = bus_url or require_nats()
    namespace = f"test-dispatch-{secrets.token_hex(4)}"
    async with temporary_database() as database_url:
        rig = ClusterRig(tmp_path, plugins, database_url, bus_url, namespace)
        try:
            yield rig
        finally:
            await rig.close()
            bus = open_bus(bus_url, plugins, BusOptions(namespace=namespace))
            with contextlib.suppress(BusUnavailableError):  # an own server already gone
                await bus.connect()
                try:
                    await bus.destroy()
                finally:
                    await bus.close()
