"""The agent's ``der`` commands (``agent``, ``commission``, ``launch``), registered through the
``der_commands`` hook from the ``der_sdk`` entry point group. The agent itself is imported
only when one of them runs, so ``der --help`` stays quick.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
from typing import Any

from der_sdk.cli import env_with, run_async, wait_for_stop_signal
from der_sdk.errors import DerSdkError
from der_sdk.extensions import CommandType
from der_sdk.plugins import hookimpl

__all__ = ["der_commands"]

log = logging.getLogger("der.cli")

_HEADEND_HELP = (
    "headend gRPC host:port, or several separated by commas: the agent moves to the next "
    "when one fails (env HEADEND_GRPC)"
)


def _agent_env(ns: argparse.Namespace) -> dict[str, str]:
    """The environment ``der agent`` and ``der commission`` read, with the flags on top."""
    from der_sdk_agent.headends import parse_headend_addresses

    if ns.headend is not None:  # checked here too, so that an error names the flag
        parse_headend_addresses(ns.headend, source="--headend")
    return env_with(
        {
            "HEADEND_GRPC": ns.headend,
            "ASSETS_PATH": ns.assets,
            "ASSET_ID": ns.asset_id,
            "GATEWAY_SITE_ID": ns.site_id,
            "GATEWAY_ID": ns.gateway_id,
            "AGENT_CONFIG": ns.config,
        }
    )


def cmd_agent(ns: argparse.Namespace) -> int:
    from der_sdk_agent.launch import run_agent
    from der_sdk_agent.settings import AgentSettings

    run_async(run_agent(AgentSettings.from_env(_agent_env(ns))))
    return 0


def cmd_commission(ns: argparse.Namespace) -> int:
    import msgspec

    from der_sdk_agent.commission import commission, render_text

    report = run_async(
        commission(_agent_env(ns), read_timeout_s=ns.timeout, probe_timeout_s=ns.timeout)
    )
    if ns.json:
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        print(render_text(report), end="")
    return 0 if report.ok else 1


def _add_agent_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--headend", help=_HEADEND_HELP)
    p.add_argument("--assets", help="inventory YAML (env ASSETS_PATH)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--asset-id", help="single-asset mode (env ASSET_ID)")
    mode.add_argument("--site-id", help="gateway mode for a site (env GATEWAY_SITE_ID)")
    p.add_argument("--gateway-id", help="gateway agent id (env GATEWAY_ID)")
    p.add_argument("--config", help="agent config YAML: adapters per asset (env AGENT_CONFIG)")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _add_commission_arguments(p: argparse.ArgumentParser) -> None:
    _add_agent_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as a JSON document")
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to wait for each device read and each headend (default 10)",
    )


def cmd_launch(ns: argparse.Namespace) -> int:
    from der_sdk.agent_config import load_agent_config
    from der_sdk.inventory import load_inventory
    from der_sdk.plugins import load_plugins
    from der_sdk_agent.headends import parse_headend_addresses
    from der_sdk_agent.launch import launch
    from der_sdk_agent.settings import DEFAULT_HEADEND_GRPC

    assets = ns.assets or os.environ.get("ASSETS_PATH")
    if not assets:
        raise DerSdkError("no inventory: pass --assets FILE or set ASSETS_PATH")
    if ns.headend is not None:
        raw, source = ns.headend, "--headend"
    else:
        raw, source = os.environ.get("HEADEND_GRPC") or DEFAULT_HEADEND_GRPC, "HEADEND_GRPC"
    headend = ",".join(parse_headend_addresses(raw, source=source))
    plugins = load_plugins()
    inventory = load_inventory(assets, asset_types=plugins.asset_types.names())
    config = load_agent_config(ns.config or os.environ.get("AGENT_CONFIG"))

    security = _launch_security(config)

    async def run() -> None:
        agents = await launch(
            inventory,
            headend=headend,
            mode=ns.mode,
            config=config,
            plugins=plugins,
            security=security,
        )
        log.info("launched %d %s agent(s) against %s", len(agents), ns.mode, headend)
        try:
            await wait_for_stop_signal(ns.duration)
        finally:
            await asyncio.gather(*(a.stop() for a in agents))

    run_async(run())
    return 0


def _launch_security(config: Any) -> Any:
    """TLS settings for ``der launch`` from ``AGENT_TLS_*`` / ``AGENT_TOKEN`` and the agent
    config's ``tls:``, shared by every launched agent (docs/security.md)."""
    from der_sdk_agent.settings import AgentSettings
    from der_sdk_agent.tls import LinkSecurity

    env = os.environ
    settings = AgentSettings(
        assets_path=env.get("ASSETS_PATH", "-"),
        tls_ca=env.get("AGENT_TLS_CA") or None,
        tls_cert=env.get("AGENT_TLS_CERT") or None,
        tls_key=env.get("AGENT_TLS_KEY") or None,
        tls_server_name=env.get("AGENT_TLS_SERVER_NAME") or None,
        token=env.get("AGENT_TOKEN") or None,
    )
    return LinkSecurity.from_settings(settings, config)


def _add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", help="inventory YAML (env ASSETS_PATH)")
    p.add_argument("--headend", help=_HEADEND_HELP)
    p.add_argument("--mode", choices=["site", "asset"], default="site")
    p.add_argument("--config", help="agent config YAML (env AGENT_CONFIG)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")


@hookimpl
def der_commands() -> list[CommandType]:
    return [
        CommandType(
            name="agent",
            help="run an edge agent (one asset, or a site gateway)",
            description="Run an edge agent that dials out to the headend. "
            "Flags override the environment.",
            add_arguments=_add_agent_arguments,
            run=cmd_agent,
        ),
        CommandType(
            name="commission",
            help="check a site before going live: config, plugins, devices, headend",
            description="Check what der agent would run, without running it: the agent "
            "config against the inventory and the installed plugins, one read of every "
            "device, and which assets the headend would accept (a probe that opens no "
            "session). Prints a pass/fail table per asset with what to fix; exit status 1 "
            "when anything failed. Takes the flags and environment of der agent.",
            add_arguments=_add_commission_arguments,
            run=cmd_commission,
        ),
        CommandType(
            name="launch",
            help="test harness: agents for every site or asset, one process",
            description="Start one agent per site (gateway) or per asset of an "
            "inventory, all in this process. For testing, not production.",
            add_arguments=_add_launch_arguments,
            run=cmd_launch,
        ),
    ]
