"""``der demo``: the headend on the embedded SQLite default, with one gateway agent of
simulated batteries per site of the inventory, in one process."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("der.demo")


def _banner(http_url: str, grpc_addr: str, db_url: str, site_id: str, asset_id: str) -> str:
    return f"""
der-sdk demo is running (Ctrl-C to stop)

  REST API     {http_url}
  OpenAPI      {http_url}/schema/openapi.json   (browse: {http_url}/schema/swagger)
  agent gRPC   {grpc_addr}
  storage      {db_url}

Try:
  curl {http_url}/agents
  curl {http_url}/telemetry/{asset_id}
  curl -X POST {http_url}/dispatch -H 'content-type: application/json' \\
       -d '{{"asset_id": "{asset_id}", "mw": 0.5}}'
  curl -X POST {http_url}/dispatch -H 'content-type: application/json' \\
       -d '{{"site_id": "{site_id}", "mw": -2.0, "duration_s": 600}}'
  curl '{http_url}/dispatch/history?limit=5'
  curl '{http_url}/telemetry/{asset_id}/history?limit=3'
"""


async def run_demo(ns: argparse.Namespace) -> None:
    """Start the headend and the agents, print what to try, run until a stop signal."""
    from der_sdk.agent_config import load_agent_config
    from der_sdk.cli import wait_for_stop_signal
    from der_sdk.inventory import load_inventory
    from der_sdk.plugins import load_plugins
    from der_sdk_agent.launch import launch
    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import Headend

    assets_path = Path(ns.assets)
    plugins = load_plugins()
    inventory = load_inventory(str(assets_path), asset_types=plugins.asset_types.names())
    db_url = f"sqlite:///{Path(ns.data_dir) / 'der.db'}"
    env = {"ASSETS_PATH": str(assets_path), "DATABASE_URL": db_url}
    if ns.http_addr:
        env["HEADEND_HTTP_ADDR"] = ns.http_addr
    if ns.grpc_addr:
        env["HEADEND_GRPC_ADDR"] = ns.grpc_addr
    if ns.reset_db:
        env["RESET_DB"] = "1"
    headend = Headend(HeadendConfig.from_env(env), plugins=plugins)
    await headend.start()
    agents = []
    try:
        grpc_addr = f"127.0.0.1:{headend.grpc_port}"
        agents = await launch(
            inventory,
            headend=grpc_addr,
            mode="site",
            config=load_agent_config(ns.config),
            plugins=plugins,
        )
        site = next(iter(inventory.sites.values()))
        first_asset = inventory.assets_for_site(site.site_id)[0]
        print(
            _banner(headend.http_url, grpc_addr, db_url, site.site_id, first_asset.asset_id),
            flush=True,
        )
        await wait_for_stop_signal(ns.duration)
    finally:
        for agent in agents:
            await agent.stop()
        await headend.stop()
        log.info("demo stopped; data kept in %s", db_url)
