"""Helpers for the cluster ingest tests: replicas on real NATS and real PostgreSQL.

Each test gets a temporary database and a bus namespace of its own (deleted afterwards);
replicas are in-process :class:`~der_sdk_headend.service.Headend` objects, agents are raw
gRPC streams (:class:`tests.headend.headend_kit.RawAgent`) so a test decides exactly which
batch is sent and sees each acknowledgement.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
import pytest_asyncio

from der_sdk.bus import BusOptions, MessageBus, open_bus
from der_sdk.plugins import Plugins, load_plugins
from der_sdk_headend.service import Headend
from tests.headend.headend_kit import INVENTORY_YAML, RawAgent, make_config

__all__ = [
    "ClusterKit",
    "cluster",
    "pg_refusing",
    "stored_count",
]


class ClusterKit:
    """Replicas sharing one database and one bus namespace; everything stops at the end."""

    def __init__(self, inventory: Path, database_url: str, nats_url: str, plugins: Plugins) -> None:
        self.inventory = inventory
        self.database_url = database_url
        self.nats_url = nats_url
        self.namespace = f"test-{secrets.token_hex(4)}"
        self.plugins = plugins
        self.stack = AsyncExitStack()
        self._replicas = 0

    async def replica(self, **env: str) -> Headend:
        """Start a replica (``HEADEND_*`` settings in ``env`` on top of the cluster's)."""
        self._replicas += 1
        settings = {
            "DATABASE_URL": self.database_url,
            "HEADEND_BUS_URL": self.nats_url,
            "HEADEND_BUS_NAMESPACE": self.namespace,
            "HEADEND_ID": f"replica-{self._replicas}",
            **env,
        }
        config = make_config(self.inventory, **settings)
        headend = Headend(config, plugins=self.plugins)
        await headend.start()
        self.stack.push_async_callback(headend.stop)
        return headend

    async def agent(self, headend: Headend, assets: list[str], agent_id: str) -> RawAgent:
        """A raw agent registered with ``headend``."""
        channel = grpc.aio.insecure_channel(headend.grpc_addr)
        self.stack.push_async_callback(channel.close, None)
        agent = RawAgent(channel)
        await agent.register(assets, agent_id=agent_id)
        return agent

    async def bus(self, **options: Any) -> MessageBus:
        """A bus connection of the test's own on the cluster's namespace."""
        bus = open_bus(self.nats_url, self.plugins, BusOptions(namespace=self.namespace, **options))
        await bus.connect()
        self.stack.push_async_callback(bus.close)
        return bus


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ClusterKit]:
    """A cluster on a temporary database and a namespace of its own."""
    from der_sdk_nats.testing import require_nats
    from der_sdk_postgres.testing import temporary_database

    nats_url = require_nats()
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(INVENTORY_YAML)
    plugins = load_plugins()
    async with temporary_database() as database_url:
        kit = ClusterKit(inventory, database_url, nats_url, plugins)
        try:
            yield kit
        finally:
            await kit.stack.aclose()
            cleanup = open_bus(nats_url, plugins, BusOptions(namespace=kit.namespace))
            await cleanup.connect()
            try:
                await cleanup.destroy()
            finally:
                await cleanup.close()


async def stored_count(database_url: str) -> tuple[int, int]:
    """(rows, distinct (asset_id, ts)) of the telemetry table."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT (asset_id, ts)) FROM telemetry")
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


class pg_refusing:
    """PostgreSQL refuses the test database: its connections are cut and new ones refused
    (``ALLOW_CONNECTIONS false``), as while the server is down; allowed again on exit."""

    def __init__(self, database_url: str) -> None:
        self.name = urlsplit(database_url).path.lstrip("/")
        from der_sdk_postgres.testing import admin_url

        self.admin = admin_url()

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def __aenter__(self) -> None:
        await self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        await self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{self.name}' AND pid <> pg_backend_pid()"
        )

    async def __aexit__(self, *_: object) -> None:
        await self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


async def within(
    check: Callable[[], Awaitable[bool]], seconds: float, what: str, every: float = 0.02
) -> float:
    """Wait until ``check()``; return the seconds it took; fail after ``seconds``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > seconds:
            pytest.fail(f"not within {seconds:g} s: {what}")
        await asyncio.sleep(every)
    return loop.time() - start
