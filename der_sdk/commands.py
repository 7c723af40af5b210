"""der-sdk's own ``der`` commands, a built-in plugin of the ``der_commands`` hook: plugins,
profiles, new-adapter, check-config, sim and certs. They need only der-sdk; the reference
headend and agent add theirs from their own packages.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from der_sdk.cli import EXIT_USAGE, run_async, serve_until_stopped
from der_sdk.errors import DerSdkError
from der_sdk.extensions import CommandType
from der_sdk.plugins import hookimpl

if TYPE_CHECKING:
    from der_sdk.extensions import DeviceSimulatorType

__all__ = ["der_commands"]


# ----------------------------------------------------------------------------- plugins


def cmd_plugins(ns: argparse.Namespace) -> int:
    from der_sdk.plugins import Registry, load_plugins

    plugins = load_plugins()
    rows = plugins.info()
    registries: dict[str, Registry[Any]] = {
        "adapter_types": plugins.adapter_types,
        "asset_types": plugins.asset_types,
        "split_policies": plugins.split_policies,
        "storage_backends": plugins.storage_backends,
        "bus_backends": plugins.bus_backends,
        "device_profiles": plugins.device_profiles,
        "edge_services": plugins.edge_services,
        "device_simulators": plugins.device_simulators,
        "program_sources": plugins.program_sources,
    }
    commands = plugins.commands
    commands_of = commands.by_plugin()
    if ns.json:
        provided: dict[str, dict[str, list[str]]] = {}
        for kind, registry in registries.items():
            for name in registry.names():
                provided.setdefault(registry.provider(name), {}).setdefault(kind, []).append(name)
        out = [
            {
                **r.as_dict(),
                "provides": provided.get(r.package, {}) if not r.builtin else {},
                "commands": commands_of.get(r.name, []),
            }
            for r in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    width = max(len(r.package) for r in rows)
    for r in rows:
        tag = " (built-in)" if r.builtin else ""
        print(f"{r.package:<{width}}  {r.version:<8} {r.name}{tag}")
        print(f"{'':<{width}}  hooks: {', '.join(r.hooks)}")
        if r.name in commands_of:
            print(f"{'':<{width}}  commands: {', '.join(commands_of[r.name])}")
    print()
    for kind, registry in registries.items():
        print(f"{kind.replace('_', ' ')}: {', '.join(registry.names()) or '-'}")
    print(f"commands: {', '.join(f'{n} ({commands.plugin(n)})' for n in commands.names())}")
    return 0


def _add_plugins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


# ----------------------------------------------------------------------------- profiles


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


# ----------------------------------------------------------------------------- new-adapter


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


def _add_new_adapter_arguments(p: argparse.ArgumentParser) -> None:
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


# ----------------------------------------------------------------------------- check-config


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


def _add_check_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="inventory YAML")
    p.add_argument("--agent-config", help="also validate this agent config against it")


# ----------------------------------------------------------------------------- sim


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


def cmd_sim(ns: argparse.Namespace) -> int:
    from der_sdk.plugins import load_plugins

    if ns.simulator is None:
        ns.sim_parser.print_help()
        print("\n" + _installed_simulators())
        return EXIT_USAGE
    simulator = load_plugins().device_simulators.get(ns.simulator)
    args = _simulator_parser(simulator).parse_args(ns.args)
    run_async(serve_until_stopped(simulator.run(args)))
    return 0


def _add_sim_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--help", action=_SimulatorHelp, help="show this help and the simulators")
    p.add_argument("simulator", nargs="?", metavar="NAME", help="the simulator to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the simulator's own options")
    p.set_defaults(sim_parser=p)


# ----------------------------------------------------------------------------- certs


def cmd_certs(ns: argparse.Namespace) -> int:
    from der_sdk.cli_certs import cmd_certs as run_certs

    return run_certs(ns)


def _add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    from der_sdk.cli_certs import add_certs_arguments  # cryptography loads only here

    add_certs_arguments(parser)


# ----------------------------------------------------------------------------- hook


@hookimpl
def der_commands() -> list[CommandType]:
    return [
        CommandType(
            name="plugins",
            help="list installed plugins, versions and hooks",
            description="List installed plugins with their package, version, "
            "hooks, and what each provides (commands included).",
            add_arguments=_add_plugins_arguments,
            run=cmd_plugins,
        ),
        CommandType(
            name="profiles",
            help="list installed device profiles (from device packs)",
            description="List every installed device profile version with its vendor, "
            "model, protocol, number of points and the package that provides it.",
            add_arguments=_add_plugins_arguments,
            run=cmd_profiles,
        ),
        CommandType(
            name="new-adapter",
            help="generate a plugin distribution (adapter or device pack)",
            description="Generate der-sdk-NAME from the der-adapter template: an adapter "
            "plugin, or with --device-pack a device pack, with tests, README and ci.sh.",
            add_arguments=_add_new_adapter_arguments,
            run=cmd_new_adapter,
        ),
        CommandType(
            name="check-config",
            help="validate an inventory (and agent config) file",
            description="Validate an assets YAML; exit 2 naming file, line and "
            "field on the first bad file.",
            add_arguments=_add_check_config_arguments,
            run=cmd_check_config,
        ),
        CommandType(
            name="sim",
            help="run a simulated device from a plugin (e.g. a Modbus server)",
            description="Run a simulated device until Ctrl-C: der sim NAME [options]; "
            "der sim NAME --help shows its options.",
            add_help=False,
            add_arguments=_add_sim_arguments,
            run=cmd_sim,
        ),
        CommandType(
            name="certs",
            help="development certificates for TLS and mutual TLS (a dev CA, agents, headend)",
            description="Make a development CA and the certificates the headend and agents "
            "need for TLS and mutual TLS, and agent tokens. A development aid: in production "
            "the operator's PKI issues the certificates (der certs show prints what the "
            "inventory needs from them).",
            add_arguments=_add_certs_arguments,
            run=cmd_certs,
        ),
    ]
