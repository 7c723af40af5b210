"""Fixtures for the cluster tests: replicas (ordinary ``Headend`` objects in this process)
sharing one real NATS namespace and one real PostgreSQL database.

Every test gets its own temporary database and its own bus namespace (``test-`` and
random hex), deleted afterwards. Without NATS or PostgreSQL the tests skip with the
reason (they fail instead under ``DER_SDK_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import asyncio
import io
import secrets
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from der_sdk.bus import BusOptions, open_bus
from der_sdk.plugins import Plugins, load_plugins
from der_sdk_headend import Headend
from tests.headend.headend_kit import INVENTORY_YAML, RawAgent, make_config

StartReplica = Callable[..., Awaitable[Headend]]
"""``await start_replica("replica-a", HEADEND_BUS_PRESENCE_MAX_AGE_S="3")``: a started
replica with that ``HEADEND_ID``, stopped at teardown."""
ConnectAgent = Callable[[Headend], Awaitable[RawAgent]]
"""``await connect_agent(replica)``: a raw agent stream to that replica's gRPC port."""


@pytest.fixture
def nats_url() -> str:
    nats_testing = pytest.importorskip("der_sdk_nats.testing", reason="needs der-sdk-nats")
    url: str = nats_testing.require_nats()
    return url


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    postgres = pytest.importorskip("der_sdk_postgres.testing", reason="needs der-sdk-postgres")
    async with postgres.temporary_database("der_cluster_") as url:
        yield url


@pytest.fixture
def cluster_plugins() -> Plugins:
    return load_plugins(env={})


@pytest.fixture
async def namespace(nats_url: str, cluster_plugins: Plugins) -> AsyncIterator[str]:
    """This test's bus namespace; its stream and presence table are deleted afterwards."""
    name = f"test-{secrets.token_hex(4)}"
    yield name
    bus = open_bus(nats_url, cluster_plugins, BusOptions(namespace=name))
    await bus.connect()
    try:
        await bus.destroy()
    finally:
        await bus.close()


@pytest.fixture
def inventory_path(tmp_path: Path) -> Path:
    path = tmp_path / "assets.yaml"
    path.write_text(textwrap.dedent(INVENTORY_YAML))
    return path


@pytest.fixture
async def start_replica(
    nats_url: str,
    database_url: str,
    namespace: str,
    inventory_path: Path,
    cluster_plugins: Plugins,
) -> AsyncIterator[StartReplica]:
    started: list[Headend] = []

    async def start(headend_id: str, **env: str) -> Headend:
        settings = {
            "DATABASE_URL": database_url,
            "HEADEND_ID": headend_id,
            "HEADEND_BUS_URL": nats_url,
            "HEADEND_BUS_NAMESPACE": namespace,
            **env,
        }
        config = make_config(inventory_path, **settings)
        replica = Headend(config, plugins=cluster_plugins)
        started.append(replica)
        await replica.start()
        return replica

    yield start
    for replica in reversed(started):
        try:
            async with asyncio.timeout(STOP_LIMIT_S):
                await replica.stop()
        except TimeoutError:
            pytest.fail(
                f"{replica.config.headend_id} did not stop within {STOP_LIMIT_S:g} s; "
                f"its tasks:\n{_task_stacks()}"
            )


STOP_LIMIT_S = 60.0
"""A replica's stop takes seconds; past this it hangs, and the failure shows where."""


def _task_stacks() -> str:
    """Where every task of the loop waits: what a hung stop needs to be diagnosed."""
    out = io.StringIO()
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        task.print_stack(limit=8, file=out)
    return out.getvalue()


@pytest.fixture
async def connect_agent() -> AsyncIterator[ConnectAgent]:
    channels: list[grpc.aio.Channel] = []

    async def connect(replica: Headend) -> RawAgent:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica.grpc_port}")
        channels.append(channel)
        return RawAgent(channel)

    yield connect
    for channel in channels:
        await channel.close()


async def crash_replica(replica: Headend) -> None:
    """Stop ``replica`` as a kill would leave things: its presence entries not released
    and its agents' sessions left open in storage."""
    cluster_presence = replica.cluster_presence
    assert cluster_presence is not None and replica.cluster is not None
    await cluster_presence.close(release=False)
    await replica.cluster.bus.close()

    async def lost(session_id: str, disconnected_at: Any) -> None:
        pass  # a killed process writes nothing

    replica.storage.close_session = lost  # type: ignore[method-assign]
    await replica.stop()
