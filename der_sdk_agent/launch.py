"""Running agents: one from environment settings (:func:`run_agent`, the ``der agent``
command), or many in one process as a test harness (:func:`launch`, :func:`run_launch`).

The harness starts one gateway agent per site or one agent per asset, all in this process
and event loop. It is for demos and load tests, not production: in the field each agent is
its own process, near its devices. Its agents keep their buffers in memory unless the
agent config sets ``buffer.path``, which must then contain ``{agent_id}`` (one file each).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Sequence
from typing import Any, Literal

from der_sdk.agent_config import AgentConfig, validate_agent_config
from der_sdk.errors import DerSdkError
from der_sdk.inventory import Inventory
from der_sdk.plugins import Plugins, load_plugins
from der_sdk_agent.agent import Agent
from der_sdk_agent.settings import AgentSettings
from der_sdk_agent.tls import LinkSecurity

__all__ = ["GC_GEN0_THRESHOLD", "launch", "run_agent", "run_launch", "tune_gc", "wait_for_signal"]

log = logging.getLogger("der.agent.launch")

GC_GEN0_THRESHOLD = 2_000
"""Allocations between young-generation collections once an agent runs (Python: 700)."""


def tune_gc() -> None:
    """Once the agents of this process have started: move what they hold for good (their
    adapters, device maps, connections, modules) out of the cycle collector's reach, and
    collect the young generation less often.

    Polling allocates a few objects per device per poll, most of which live until the
    next poll; they survive the young collections, and each time a quarter as many as the
    older generation holds have done so CPython runs a full collection, which scanned
    every adapter's long-lived objects again: at 2,000 Modbus devices about a third of
    the agent's CPU went to the collector, in pauses of up to 200 ms
    (docs/performance.md). After :func:`gc.freeze` a full collection scans only what was
    allocated since. Objects freed by their reference count (nearly all) are freed at
    once, frozen or not.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GC_GEN0_THRESHOLD, gen0), gen1, gen2)


async def wait_for_signal(*also: asyncio.Future[Any]) -> None:
    """Return on SIGINT or SIGTERM (or when one of ``also`` finishes)."""
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, received.set)
    waiter = asyncio.create_task(received.wait())
    try:
        await asyncio.wait([waiter, *also], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
    if received.is_set():
        log.info("stop signal received")


async def run_agent(settings: AgentSettings, plugins: Plugins | None = None) -> None:
    """Run one agent until SIGINT or SIGTERM, then stop it cleanly.

    :raises DerSdkError: the settings, inventory or agent config are invalid (before any
        connection is attempted), or an edge service failed to start.
    """
    agent = Agent.from_settings(settings, plugins)
    await agent.start()
    tune_gc()
    stopped = asyncio.create_task(agent.wait_stopped())
    try:
        await wait_for_signal(stopped)
    finally:
        stopped.cancel()
        await agent.stop()


async def launch(
    inventory: Inventory,
    *,
    headend: str | Sequence[str],
    mode: Literal["site", "asset"],
    config: AgentConfig,
    plugins: Plugins | None = None,
    security: LinkSecurity | None = None,
) -> list[Agent]:
    """Start one gateway agent per site (``mode="site"``) or one agent per asset
    (``mode="asset"``) of ``inventory``, all in this process. Returns them started.

    ``headend`` is one address or several; with several, each agent shuffles its own
    order, so the agents spread over the headends. ``security`` (TLS, client certificate,
    token) is shared by every agent: under mutual TLS its certificate must then be bound
    to every site served.

    Agent ids are ``gateway-<site_id>`` and ``asset-<asset_id>``. If any agent fails to
    start, the others are stopped and the error is raised.
    """
    plugins = plugins if plugins is not None else load_plugins()
    validate_agent_config(config, plugins, inventory, list(inventory.assets))
    agents = _build(
        inventory, headend=headend, mode=mode, config=config, plugins=plugins, security=security
    )
    path = config.buffer.path
    if path is not None and "{agent_id}" not in path and len(agents) > 1:
        raise DerSdkError(
            f"agent config buffer.path {path!r} would be shared by {len(agents)} agents; "
            "put {agent_id} in it (e.g. der-data/agent-{agent_id}.sqlite3)"
        )
    results = await asyncio.gather(*(a.start() for a in agents), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await asyncio.gather(*(a.stop() for a in agents))
        raise failures[0]
    log.info("launched %d %s agent(s) against %s", len(agents), mode, headend)
    return agents


def _build(
    inventory: Inventory,
    *,
    headend: str | Sequence[str],
    mode: Literal["site", "asset"],
    config: AgentConfig,
    plugins: Plugins,
    security: LinkSecurity | None,
) -> list[Agent]:
    agents: list[Agent] = []
    if mode == "site":
        for site_id in sorted(inventory.sites):
            assets = inventory.assets_for_site(site_id)
            if not assets:
                log.warning("site %s has no assets; no gateway agent for it", site_id)
                continue
            agents.append(
                Agent(
                    agent_id=f"gateway-{site_id}",
                    site_id=site_id,
                    assets=assets,
                    headend=headend,
                    config=config,
                    plugins=plugins,
                    security=security,
                )
            )
    elif mode == "asset":
        for asset_id in sorted(inventory.assets):
            asset = inventory.assets[asset_id]
            agents.append(
                Agent(
                    agent_id=f"asset-{asset_id}",
                    site_id=asset.site_id,
                    assets=[asset],
                    headend=headend,
                    config=config,
                    plugins=plugins,
                    security=security,
                )
            )
    else:
        raise ValueError(f"mode must be 'site' or 'asset', got {mode!r}")
    return agents


async def run_launch(
    inventory: Inventory,
    *,
    headend: str | Sequence[str],
    mode: Literal["site", "asset"],
    config: AgentConfig,
    plugins: Plugins | None = None,
) -> None:
    """:func:`launch`, then wait for SIGINT or SIGTERM and stop every agent."""
    agents = await launch(inventory, headend=headend, mode=mode, config=config, plugins=plugins)
    tune_gc()
    try:
        await wait_for_signal()
    finally:
        await asyncio.gather(*(a.stop() for a in agents))
