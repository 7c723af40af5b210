"""The browser tests' headend: a real reference headend with ``HEADEND_AUTH=on`` serving
a demo inventory (by default the battery example, ``examples/assets.yaml``: two sites, five
batteries, each on ``sim-bess``; or the mixed fleet of ``examples/mixed/`` with its agent
config), one in-process gateway agent per site, and one REST token per role.

The pytest-playwright fixtures are synchronous (Playwright's sync API), so the headend and
its agents run on their own event loop in a background thread; the tests reach them over
127.0.0.1 like a person at a browser would, and :meth:`ConsoleStack.call` runs a
coroutine on that loop when a test needs to look at the headend directly.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from der_sdk.plugins import load_plugins
from der_sdk.testing.waits import WAIT_S
from der_sdk_agent.testing import AgentLink, AgentRunner
from der_sdk_headend.testing import headend_config
from der_sdk_headend.tokens import ROLES, TokenFileStore

if TYPE_CHECKING:
    import httpx

    from der_sdk_headend.service import Headend

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
DEMO_INVENTORY = ROOT / "examples" / "assets.yaml"
MIXED_INVENTORY = ROOT / "examples" / "mixed" / "assets.yaml"
MIXED_AGENT_CONFIG = ROOT / "examples" / "mixed" / "agent.yaml"
SCREENSHOTS = ROOT / "docs" / "console"
"""Where the tests write their screenshots (docs/console.md embeds them)."""

TELEMETRY_INTERVAL_S = 0.25
"""The simulated batteries report four times a second: trends visibly grow in a test."""

START_TIMEOUT_S = 30.0


class ConsoleStack:
    """A started headend with the demo's agents, on a private event loop in a thread.

    ``url`` is the headend's base URL (the console is at ``/``); ``tokens`` maps each role
    (viewer, operator, admin) to a token secret; ``links`` are the agents, one per site.
    """

    def __init__(
        self,
        directory: Path,
        *,
        inventory: Path = DEMO_INVENTORY,
        agent_config: Path | None = None,
    ) -> None:
        """``inventory`` and ``agent_config`` (default: ``sim-bess`` for every asset) are
        copied and run as they are, but for the telemetry interval."""
        self.directory = directory
        self.inventory = inventory
        self.agent_config = agent_config
        self.tokens: dict[str, str] = {}
        self.links: list[AgentLink] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="console-headend", daemon=True
        )
        self._headend: Headend | None = None
        self._http: httpx.AsyncClient | None = None
        self._runner: AgentRunner | None = None

    @property
    def headend(self) -> Headend:
        assert self._headend is not None, "the console stack is not started"
        return self._headend

    @property
    def url(self) -> str:
        return self.headend.http_url

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = WAIT_S) -> T:
        """Run ``coro`` on the headend's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def start(self) -> None:
        """Write the inventory and tokens, start the headend and one agent per site, and
        wait until every agent has registered."""
        inventory = self.directory / "assets.yaml"
        shutil.copyfile(self.inventory, inventory)
        store = TokenFileStore(self.directory / "der-tokens.json")
        self.tokens = {role: store.create(role=role, name=f"browser {role}")[1] for role in ROLES}
        self._thread.start()
        self.call(self._start(inventory), START_TIMEOUT_S)

    async def _start(self, inventory: Path) -> None:
        import httpx

        from der_sdk_headend.service import Headend

        plugins = load_plugins()
        headend = Headend(headend_config(inventory, {"HEADEND_AUTH": "on"}), plugins=plugins)
        await headend.start()
        self._headend = headend
        self._http = httpx.AsyncClient(
            base_url=headend.http_url,
            timeout=WAIT_S,
            headers={"authorization": f"Bearer {self.tokens['admin']}"},
        )
        self._runner = AgentRunner(headend, plugins, self._http)
        config = None
        if self.agent_config is not None:
            from der_sdk.agent_config import load_agent_config

            loaded = load_agent_config(self.agent_config)
            config = msgspec.structs.replace(loaded, telemetry_interval_s=TELEMETRY_INTERVAL_S)
        for site_id in headend.inventory.sites:
            link = await self._runner(
                adapter_type="sim-bess",
                site_id=site_id,
                agent_id=f"gateway-{site_id}",
                config=config,
                telemetry_interval_s=TELEMETRY_INTERVAL_S,
            )
            self.links.append(link)
        for link in self.links:
            for asset_id in link.asset_ids:
                await link.wait_for_telemetry(asset_id)

    def stop(self) -> None:
        """Stop the agents and the headend, then the loop and its thread."""
        if self._thread.is_alive():
            try:
                self.call(self._stop(), START_TIMEOUT_S)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(START_TIMEOUT_S)
        self._loop.close()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.close()
        if self._http is not None:
            await self._http.aclose()
        if self._headend is not None:
            await self._headend.stop()
