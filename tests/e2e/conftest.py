"""End-to-end fixtures: a real headend on ephemeral TCP ports and real agents, in process."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio

from der_sdk.agent_config import AgentConfig, load_agent_config
from der_sdk.inventory import Inventory, load_inventory
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing.services import require_tcp_service
from der_sdk_agent.agent import Agent
from der_sdk_headend.config import HeadendConfig
from der_sdk_headend.service import Headend

T = TypeVar("T")

SITE = "11111111-1111-4111-8111-111111111111"
OTHER_SITE = "22222222-2222-4222-8222-222222222222"
B1 = "aaaaaaaa-0000-4000-8000-000000000001"  # 2 MWh, ±0.5 MW: clamps first
B2 = "aaaaaaaa-0000-4000-8000-000000000002"  # 4 MWh, ±2 MW
B3 = "aaaaaaaa-0000-4000-8000-000000000003"  # 6 MWh, ±3 MW
LONE = "bbbbbbbb-0000-4000-8000-000000000001"  # the other site's only asset

INVENTORY = f"""
sites:
  - {{site_id: {SITE}, name: Test Yard}}
  - {{site_id: {OTHER_SITE}, name: Elsewhere}}
assets:
  - {{asset_id: {B1}, site_id: {SITE}, name: B1, capacity_mwh: 2, max_mw: 0.5, min_mw: -0.5}}
  - {{asset_id: {B2}, site_id: {SITE}, name: B2, capacity_mwh: 4, max_mw: 2, min_mw: -2}}
  - {{asset_id: {B3}, site_id: {SITE}, name: B3, capacity_mwh: 6, max_mw: 3, min_mw: -3}}
  - {{asset_id: {LONE}, site_id: {OTHER_SITE}, name: Lone, capacity_mwh: 1, max_mw: 1, min_mw: -1}}
"""

FAST_AGENT = """
telemetry_interval_s: 0.1
heartbeat_interval_s: 0.3
reconnect_initial_s: 0.05
reconnect_max_s: 0.3
"""


async def eventually(
    probe: Callable[[], Awaitable[T]], *, within: float = 10.0, what: str = "condition"
) -> T:
    """Await ``probe`` until it returns a truthy value or ``within`` seconds pass."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while True:
        try:
            last = await probe()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.05)


class Fleet:
    """Starts headends and agents for one test and stops them all afterwards."""

    def __init__(self, tmp: Path, database_url: str | None = None) -> None:
        self.tmp = tmp
        self.assets_path = tmp / "assets.yaml"
        self.assets_path.write_text(textwrap.dedent(INVENTORY))
        (tmp / "agent.yaml").write_text(FAST_AGENT)
        self.plugins: Plugins = load_plugins()
        self.inventory: Inventory = load_inventory(str(self.assets_path))
        self.agent_config: AgentConfig = load_agent_config(str(tmp / "agent.yaml"))
        self.database_url = database_url or f"sqlite:///{tmp / 'der.db'}"
        self.headends: list[Headend] = []
        self.agents: list[Agent] = []
        self.http = httpx.AsyncClient(timeout=5.0)

    async def start_headend(self, *, grpc_port: int = 0, http_port: int = 0) -> Headend:
        config = HeadendConfig.from_env(
            {
                "ASSETS_PATH": str(self.assets_path),
                "DATABASE_URL": self.database_url,
                "HEADEND_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
                "HEADEND_HTTP_ADDR": f"127.0.0.1:{http_port}",
                "HEADEND_TOKENS_FILE": str(self.tmp / "tokens.json"),  # none: no REST auth
            }
        )
        headend = Headend(config, plugins=self.plugins)
        await headend.start()
        self.headends.append(headend)
        self.http.base_url = httpx.URL(headend.http_url)
        return headend

    async def start_agent(
        self, headend: Headend, *, site_id: str | None = None, asset_id: str | None = None
    ) -> Agent:
        if asset_id is not None:
            assets = [self.inventory.assets[asset_id]]
            site = assets[0].site_id
            agent_id = f"asset-{asset_id}"
        else:
            assert site_id is not None
            assets = self.inventory.assets_for_site(site_id)
            site = site_id
            agent_id = f"gateway-{site_id}"
        agent = Agent(
            agent_id=agent_id,
            site_id=site,
            assets=assets,
            headend=f"127.0.0.1:{headend.grpc_port}",
            config=self.agent_config,
            plugins=self.plugins,
            buffer_path=str(self.tmp / f"agent-{agent_id}.sqlite3"),  # durable, in the tmp dir
        )
        await agent.start()
        self.agents.append(agent)
        return agent

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.http.get(path, params=params or None)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    async def connected_rows(self, n: int) -> list[dict[str, Any]] | None:
        rows = [r for r in await self.get("/agents") if r["connected"]]
        return rows if len(rows) == n else None

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()
        for headend in self.headends:
            await headend.stop()
        await self.http.aclose()


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The headend's storage: a SQLite file, or a PostgreSQL database of the test's own
    (skipped without a server or the der-sdk-postgres plugin)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'der.db'}"
        return
    require_tcp_service("PostgreSQL", "127.0.0.1", 5432)
    postgres = pytest.importorskip("der_sdk_postgres.testing", reason="needs der-sdk-postgres")
    async with postgres.temporary_database() as url:
        yield url


@pytest_asyncio.fixture
async def fleet(tmp_path: Path, database_url: str) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, database_url)
    try:
        yield f
    finally:
        await f.close()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
