"""The ``der`` command line: headend, agent, launch, demo, plugins, profiles, new-adapter,
check-config, sim, tokens.

User mistakes (bad config, unknown names, unreachable ports) exit 2 with one clear message
and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from der_sdk import __version__
from der_sdk.cli_tokens import add_tokens_parser
from der_sdk.errors import ConfigError, DerSdkError

if TYPE_CHECKING:
    from der_sdk.extensions import DeviceSimulatorType

__all__ = ["main"]

EXIT_USAGE = 2
log = logging.getLogger("der.cli")


# ----------------------------------------------------------------------------- helpers


def _run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed, else on the stdlib loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _env_with(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """The process environment with command-line flags layered on top."""
    env = dict(os.environ)
    env.update({k: v for k, v in overrides.items() if v is not None})
    return env


async def wait_for_stop_signal(duration_s: float | None = None) -> None:
    """Return on SIGINT/SIGTERM, or after ``duration_s`` seconds when given."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=duration_s)
    except TimeoutError:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# ----------------------------------------------------------------------------- commands


def cmd_plugins(ns: argparse.Namespace) -> int:
    from der_sdk.plugins import Registry, load_plugins

    plugins = load_plugins()
    rows = plugins.info()
    registries: dict[str, Registry[Any]] = {
        "adapter_types": plugins.adapter_types,
        "asset_types": plugins.asset_types,
        "split_policies": plugins.split_policies,
        "storage_backends": plugins.storage_backends,
        "device_profiles": plugins.device_profiles,
        "edge_services": plugins.edge_services,
        "device_simulators": plugins.device_simulators,
    }
    if ns.json:
        provided: dict[str, dict[str, list[str]]] = {}
        for kind, registry in registries.items():
            for name in registry.names():
                provided.setdefault(registry.provider(name), {}).setdefault(kind, []).append(name)
        out = [
            {**r.as_dict(), "provides": provided.get(r.package, {}) if not r.builtin else {}}
            for r in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    width = max(len(r.package) for r in rows)
    for r in rows:
        tag = " (built-in)" if r.builtin else ""
        print(f"{r.package:<{width}}  {r.version:<8} {r.name}{tag}")
        print(f"{'':<{width}}  hooks: {', '.join(r.hooks)}")
    print()
    for kind, registry in registries.items():
        print(f"{kind.replace('_', ' ')}: {', '.join(registry.names()) or '-'}")
    return 0


def cmd_profiles(ns: argparse.Namespace) -> int:
    from der_sdk.device_packs import format_profile_table, profile_rows
    from der_sdk.plugins import load_plugins

    rows = profile_rows(load_plugins())
    if ns.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_profile_table(rows))
    else:
        print("no device profiles installed; install a device pack (docs/device_packs.md)")
    return 0


def cmd_new_adapter(ns: argparse.Namespace) -> int:
    from der_sdk.scaffold import new_adapter

    project = new_adapter(
        ns.name,
        output=ns.output,
        vendor=ns.vendor,
        description=ns.description,
        author=ns.author,
        device_pack=ns.device_pack,
        no_input=ns.no_input,
    )
    print(f"created {project}")
    print(f"next: pip install -e {project} && pytest {project} && der plugins")
    return 0


def cmd_check_config(ns: argparse.Namespace) -> int:
    from der_sdk.agent_config import load_agent_config, validate_agent_config
    from der_sdk.inventory import load_inventory
    from der_sdk.plugins import load_plugins

    plugins = load_plugins()
    inventory = load_inventory(ns.file, asset_types=plugins.asset_types.names())
    print(f"{ns.file}: ok: {len(inventory.sites)} sites, {len(inventory.assets)} assets")
    if ns.agent_config:
        cfg = load_agent_config(ns.agent_config)
        validate_agent_config(cfg, plugins, inventory, list(inventory.assets))
        print(f"{ns.agent_config}: ok")
    return 0


def cmd_headend(ns: argparse.Namespace) -> int:
    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import run_headend

    env = _env_with(
        {
            "ASSETS_PATH": ns.assets,
            "DATABASE_URL": ns.database_url,
            "HEADEND_GRPC_ADDR": ns.grpc_addr,
            "HEADEND_HTTP_ADDR": ns.http_addr,
            "RESET_DB": "1" if ns.reset_db else None,
            "HEADEND_INSECURE": "1" if ns.insecure else None,
        }
    )
    _run_async(run_headend(HeadendConfig.from_env(env)))
    return 0


def cmd_agent(ns: argparse.Namespace) -> int:
    from der_sdk_agent.launch import run_agent
    from der_sdk_agent.settings import AgentSettings

    env = _env_with(
        {
            "HEADEND_GRPC": ns.headend,
            "ASSETS_PATH": ns.assets,
            "ASSET_ID": ns.asset_id,
            "GATEWAY_SITE_ID": ns.site_id,
            "GATEWAY_ID": ns.gateway_id,
            "AGENT_CONFIG": ns.config,
        }
    )
    _run_async(run_agent(AgentSettings.from_env(env)))
    return 0


def cmd_launch(ns: argparse.Namespace) -> int:
    from der_sdk.agent_config import load_agent_config
    from der_sdk.inventory import load_inventory
    from der_sdk.plugins import load_plugins
    from der_sdk_agent.launch import launch

    assets = ns.assets or os.environ.get("ASSETS_PATH")
    if not assets:
        raise DerSdkError("no inventory: pass --assets FILE or set ASSETS_PATH")
    headend = ns.headend or os.environ.get("HEADEND_GRPC", "127.0.0.1:50051")
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

    _run_async(run())
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


def cmd_demo(ns: argparse.Namespace) -> int:
    from der_sdk.demo import run_demo

    if not Path(ns.assets).is_file():
        raise DerSdkError(
            f"demo inventory {ns.assets} not found; run from the repository root "
            "or pass --assets FILE"
        )
    _run_async(run_demo(ns))
    return 0


def _simulator_parser(simulator: DeviceSimulatorType) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"der sim {simulator.name}", description=simulator.description or None
    )
    simulator.add_arguments(parser)
    return parser


def _installed_simulators() -> str:
    from der_sdk.plugins import load_plugins

    registry = load_plugins().device_simulators
    if not len(registry):
        return "installed simulators: none (install one, e.g. der-sdk-modbus)"
    width = max(len(name) for name in registry.names())
    rows = [
        f"  {sim.name:<{width}}  {sim.description} ({registry.provider(sim.name)})"
        for sim in registry
    ]
    return "installed simulators:\n" + "\n".join(rows)


class _SimulatorHelp(argparse.Action):
    """``der sim --help`` lists the installed simulators (loading plugins only then)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.print_help()
        try:
            print("\n" + _installed_simulators())
        except DerSdkError as exc:
            parser.exit(EXIT_USAGE, f"der sim: error: {exc}\n")
        parser.exit()


async def _serve_until_stopped(work: Awaitable[None]) -> None:
    """Await ``work`` until it ends or SIGINT/SIGTERM arrives, then cancel it."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(wait_for_stop_signal())
    done: set[asyncio.Future[None]] = set()
    try:
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stop):
            pending.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
    if task in done:
        task.result()


def cmd_sim(ns: argparse.Namespace) -> int:
    from der_sdk.plugins import load_plugins

    if ns.simulator is None:
        ns.sim_parser.print_help()
        print("\n" + _installed_simulators())
        return EXIT_USAGE
    simulator = load_plugins().device_simulators.get(ns.simulator)
    args = _simulator_parser(simulator).parse_args(ns.args)
    _run_async(_serve_until_stopped(simulator.run(args)))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="der",
        description="der-sdk: DER adapters as plugins, a reference headend and edge agent.",
    )
    parser.add_argument("--version", action="version", version=f"der-sdk {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging level (env LOG_LEVEL, default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "headend",
        help="run the reference headend (REST + agent gRPC)",
        description="Run the headend. Flags override the environment.",
    )
    p.add_argument("--assets", help="inventory YAML (env ASSETS_PATH)")
    p.add_argument(
        "--database-url", help="storage URL (env DATABASE_URL, default sqlite:///der-data/der.db)"
    )
    p.add_argument(
        "--grpc-addr",
        help="agent gRPC bind host:port (env HEADEND_GRPC_ADDR, default 127.0.0.1:50051)",
    )
    p.add_argument(
        "--http-addr", help="REST bind host:port (env HEADEND_HTTP_ADDR, default 127.0.0.1:3001)"
    )
    p.add_argument("--reset-db", action="store_true", help="clear stored data at start (RESET_DB)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow serving plaintext (no TLS) on a non-loopback address (HEADEND_INSECURE)",
    )
    p.set_defaults(func=cmd_headend)

    p = sub.add_parser(
        "agent",
        help="run an edge agent (one asset, or a site gateway)",
        description="Run an edge agent that dials out to the headend. "
        "Flags override the environment.",
    )
    p.add_argument("--headend", help="headend gRPC host:port (env HEADEND_GRPC)")
    p.add_argument("--assets", help="inventory YAML (env ASSETS_PATH)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--asset-id", help="single-asset mode (env ASSET_ID)")
    mode.add_argument("--site-id", help="gateway mode for a site (env GATEWAY_SITE_ID)")
    p.add_argument("--gateway-id", help="gateway agent id (env GATEWAY_ID)")
    p.add_argument("--config", help="agent config YAML: adapters per asset (env AGENT_CONFIG)")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "launch",
        help="test harness: agents for every site or asset, one process",
        description="Start one agent per site (gateway) or per asset of an "
        "inventory, all in this process. For testing, not production.",
    )
    p.add_argument("--assets", help="inventory YAML (env ASSETS_PATH)")
    p.add_argument("--headend", help="headend gRPC host:port (env HEADEND_GRPC)")
    p.add_argument("--mode", choices=["site", "asset"], default="site")
    p.add_argument("--config", help="agent config YAML (env AGENT_CONFIG)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser(
        "plugins",
        help="list installed plugins, versions and hooks",
        description="List installed plugins with their package, version, "
        "hooks, and what each provides.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser(
        "profiles",
        help="list installed device profiles (from device packs)",
        description="List every installed device profile version with its vendor, "
        "model, protocol, number of points and the package that provides it.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser(
        "new-adapter",
        help="generate a plugin distribution (adapter or device pack)",
        description="Generate der-sdk-NAME from the der-adapter template: an adapter "
        "plugin, or with --device-pack a device pack, with tests, README and ci.sh.",
    )
    p.add_argument(
        "name",
        metavar="NAME",
        help="plugin name: lowercase letters, digits, hyphens; starts with a letter "
        "(acme-inverter gives der-sdk-acme-inverter, package der_sdk_acme_inverter)",
    )
    p.add_argument("--vendor", help="device vendor (default: from NAME)")
    p.add_argument("--description", help="one-line description")
    p.add_argument("--author", help="author name for pyproject.toml")
    p.add_argument("--output", default=".", help="folder to create der-sdk-NAME in")
    p.add_argument("--device-pack", action="store_true", help="generate a device pack")
    p.add_argument(
        "--no-input", action="store_true", help="do not ask; use defaults for what is not given"
    )
    p.set_defaults(func=cmd_new_adapter)

    p = sub.add_parser(
        "check-config",
        help="validate an inventory (and agent config) file",
        description="Validate an assets YAML; exit 2 naming file, line and "
        "field on the first bad file.",
    )
    p.add_argument("file", help="inventory YAML")
    p.add_argument("--agent-config", help="also validate this agent config against it")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "demo",
        help="headend on SQLite plus simulated gateway agents",
        description="Run the headend on the embedded SQLite default with a "
        "gateway agent of simulated batteries per site, and print what to try.",
    )
    p.add_argument("--assets", default="examples/assets.yaml", help="inventory YAML")
    p.add_argument("--data-dir", default="der-data", help="where the SQLite file lives")
    p.add_argument("--http-addr", default=None, help="REST bind (default 127.0.0.1:3001)")
    p.add_argument("--grpc-addr", default=None, help="gRPC bind (default 127.0.0.1:50051)")
    p.add_argument("--config", help="agent config YAML for the demo agents")
    p.add_argument("--reset-db", action="store_true", help="start from empty storage")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument(
        "--tls",
        action="store_true",
        help="run with mutual TLS for the agents, REST over HTTPS and an operator token "
        "(development certificates under DATA_DIR/demo-tls)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "sim",
        help="run a simulated device from a plugin (e.g. a Modbus server)",
        description="Run a simulated device until Ctrl-C: der sim NAME [options]; "
        "der sim NAME --help shows its options.",
        add_help=False,
    )
    p.add_argument("-h", "--help", action=_SimulatorHelp, help="show this help and the simulators")
    p.add_argument("simulator", nargs="?", metavar="NAME", help="the simulator to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the simulator's own options")
    p.set_defaults(func=cmd_sim, sim_parser=p)
    add_tokens_parser(sub)
    from der_sdk.cli_certs import add_certs_parser  # cryptography loads only when asked for

    add_certs_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _setup_logging(ns.log_level)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except ConfigError as exc:
        print(f"der {ns.command}: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except DerSdkError as exc:
        print(f"der {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
