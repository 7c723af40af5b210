"""``der demo``: the headend on the embedded SQLite default, with one gateway agent of
simulated assets per site of the inventory, in one process.

It runs an example (:data:`EXAMPLES`): by default the mixed fleet (a PV plant beside a
battery, two wind turbines, an EV depot), or with ``--example batteries`` five batteries on
two sites; ``--assets`` (and ``--config``) run an inventory of your own.

The examples are package data, so ``der demo`` runs from any folder of an installed
der-sdk: ``der_sdk_headend/examples`` is a symbolic link to the repository's ``examples/``
in a source checkout (one copy of the files), and a wheel or sdist holds a copy of the
YAML files there (:func:`example_file`).

``der demo --tls`` runs the same with the security of a real deployment: a development
CA, a headend certificate for 127.0.0.1/localhost, one client certificate per site's
agent bound to that site in a copy of the inventory, mutual TLS on the agent link, REST
over HTTPS with authentication on, and an operator token to try it with.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from der_sdk.agent_config import AgentConfig
    from der_sdk.inventory import Inventory
    from der_sdk.plugins import Plugins

log = logging.getLogger("der.demo")


@dataclass(frozen=True)
class DemoExample:
    """An example fleet: its inventory and its agents' config (paths inside the examples
    folder, ``examples/`` of the repository)."""

    assets: str
    config: str
    about: str


EXAMPLES: dict[str, DemoExample] = {
    "mixed": DemoExample(
        assets="mixed/assets.yaml",
        config="mixed/agent.yaml",
        about="a PV plant with a battery, two wind turbines and an EV depot on three sites",
    ),
    "batteries": DemoExample(
        assets="assets.yaml",
        config="agent.yaml",
        about="five batteries on two sites",
    ),
}
DEFAULT_EXAMPLE = "mixed"
DEMO_PLUGINS = ("der-sdk-sim-bess", "der-sdk-sim-plant")
"""The distributions of the examples' simulators (the ``demo`` extra of der-sdk)."""


def example_file(relative: str, *, package_dir: Path | None = None) -> Path:
    """The file ``relative`` of the examples folder: the package's copy
    (``der_sdk_headend/examples``) first, then ``examples/`` of the repository next to the
    package, for a checkout where the link was not created (git on Windows without
    symbolic links).

    :param package_dir: the ``der_sdk_headend`` package folder (default: this one).
    :raises DerSdkError: the file is in neither place (a broken installation); the
        message lists where it looked.
    """
    from der_sdk.errors import DerSdkError

    package_dir = package_dir or Path(__file__).resolve().parent
    candidates = [package_dir / "examples" / relative, package_dir.parent / "examples" / relative]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DerSdkError(
        f"demo example file {relative} not found (looked in {looked}); reinstall der-sdk"
    )


def resolve_example(ns: argparse.Namespace) -> None:
    """Fill ``ns.assets`` and ``ns.config`` from ``ns.example`` (default
    :data:`DEFAULT_EXAMPLE`) unless ``--assets`` names an inventory of its own; an explicit
    ``--config`` always wins."""
    if getattr(ns, "assets", None):
        ns.config = getattr(ns, "config", None)
        return
    example = EXAMPLES[getattr(ns, "example", None) or DEFAULT_EXAMPLE]
    ns.assets = str(example_file(example.assets))
    ns.config = getattr(ns, "config", None) or str(example_file(example.config))


def _showcase(inventory: Inventory) -> tuple[str, str]:
    """The site and asset the banner's examples use: the first site with a
    ``split_policy`` (else the first site) and its first asset."""
    sites = list(inventory.sites.values())
    site = next((s for s in sites if s.split_policy), sites[0])
    return site.site_id, inventory.assets_for_site(site.site_id)[0].asset_id


def _banner(
    http_url: str, grpc_addr: str, db_url: str, site_id: str, asset_id: str, inventory: Path
) -> str:
    return f"""
der-sdk demo is running (Ctrl-C to stop)

  console      open {http_url}/   (the operator console: fleet, agents, dispatch)
  REST API     {http_url}
  OpenAPI      {http_url}/schema/openapi.json   (browse: {http_url}/schema/swagger)
  agent gRPC   {grpc_addr}
  storage      {db_url}
  inventory    {inventory}

Try:
  curl {http_url}/agents
  curl {http_url}/assets          # each asset's control: kind and range it can take now
  curl {http_url}/telemetry/{asset_id}
  curl -X POST {http_url}/dispatch -H 'content-type: application/json' \\
       -d '{{"asset_id": "{asset_id}", "mw": 0.5}}'
  curl -X POST {http_url}/dispatch/preview -H 'content-type: application/json' \\
       -d '{{"site_id": "{site_id}", "mw": 3.0, "duration_s": 600, "policy": "headroom"}}'
  curl -X POST {http_url}/dispatch -H 'content-type: application/json' \\
       -d '{{"site_id": "{site_id}", "mw": 3.0, "duration_s": 600, "policy": "headroom"}}'
  curl '{http_url}/dispatch/history?limit=5'
  curl '{http_url}/events?limit=5'   # device conditions: trips, faults, over-speed stops
  curl '{http_url}/telemetry/{asset_id}/history?limit=3'
"""


@dataclass(frozen=True)
class DemoTls:
    """What ``--tls`` prepared: files for the headend, each site's agent, and a token."""

    directory: Path
    ca: Path
    headend_cert: Path
    headend_key: Path
    agent_files: dict[str, tuple[Path, Path]]  # site id -> (certificate, key)
    inventory: Path  # the inventory with each site's agent certificate bound
    tokens: Path
    operator_token: str


def prepare_tls(directory: Path, inventory_path: Path, inventory: Inventory) -> DemoTls:
    """Make (or reuse) the development certificates, bind each site's agent certificate in
    a copy of the inventory, and create a fresh operator token. Blocking: run it in a
    thread."""
    from der_sdk.certs import init_ca, issue_agent, issue_headend
    from der_sdk_headend.tokens import TokenFileStore

    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "ca.pem").exists():
        init_ca(directory)
    headend = issue_headend(directory, ["127.0.0.1", "localhost"], force=True)
    files: dict[str, tuple[Path, Path]] = {}
    fingerprints: dict[str, str] = {}
    for site_id in sorted(inventory.sites):
        issued = issue_agent(directory, site_id, agent_id=f"gateway-{site_id}", force=True)
        files[site_id] = (issued.cert_path, issued.key_path)
        fingerprints[site_id] = issued.fingerprint

    document: dict[str, Any] = yaml.safe_load(inventory_path.read_text(encoding="utf-8"))
    for site in document.get("sites", []):
        fingerprint = fingerprints.get(str(site.get("site_id", "")).lower())
        if fingerprint is not None:
            site["agents"] = [{"fingerprint": fingerprint}]
    bound = directory / "assets.yaml"
    bound.write_text(
        "# Written by `der demo --tls`: the demo inventory with each site's agent certificate\n"
        "# bound to it (docs/security.md).\n" + yaml.safe_dump(document, sort_keys=False),
        encoding="utf-8",
    )

    tokens = directory / "tokens.json"
    tokens.unlink(missing_ok=True)  # a fresh token per run: its secret is printed once
    _, secret, _, _ = TokenFileStore(tokens).create(role="operator", name="demo-operator")
    return DemoTls(
        directory=directory,
        ca=directory / "ca.pem",
        headend_cert=headend.cert_path,
        headend_key=headend.key_path,
        agent_files=files,
        inventory=bound,
        tokens=tokens,
        operator_token=secret,
    )


def _tls_banner(
    http_url: str, grpc_addr: str, db_url: str, site_id: str, asset_id: str, tls: DemoTls
) -> str:
    curl = f'curl --cacert {tls.ca} -H "Authorization: Bearer $DER_TOKEN"'
    return f"""
der-sdk demo is running with TLS (Ctrl-C to stop)

  console      open {http_url}/   (sign in with the operator token below)
  REST API     {http_url}   (HTTPS, bearer tokens required)
  agent gRPC   {grpc_addr}   (mutual TLS; each site's agent certificate bound to its site)
  storage      {db_url}
  certificates {tls.directory}   (development CA: ca.pem)
  inventory    {tls.inventory}

An operator token for this run (shown once; `der tokens create --file {tls.tokens}` makes more):

  export DER_TOKEN={tls.operator_token}

Try:
  {curl} {http_url}/agents
  {curl} {http_url}/telemetry/{asset_id}
  {curl} -X POST {http_url}/dispatch -H 'content-type: application/json' \\
       -d '{{"asset_id": "{asset_id}", "mw": 0.5}}'
  curl --cacert {tls.ca} {http_url}/agents                 # 401: no token
  curl --cacert {tls.ca} {http_url}/healthz                # open
"""


def check_simulators(config: AgentConfig, plugins: Plugins, inventory: Inventory) -> None:
    """Refuse before anything starts when the agent config names adapters that are not
    installed; the message names the plugins behind the examples' simulators.

    :raises ConfigError: the agent config is invalid for another reason.
    :raises DerSdkError: an adapter is not installed.
    """
    from der_sdk.agent_config import validate_agent_config
    from der_sdk.errors import ConfigError, DerSdkError

    try:
        validate_agent_config(config, plugins, inventory, list(inventory.assets))
    except ConfigError as exc:
        if not any(i.message.startswith("unknown adapter") for i in exc.issues):
            raise
        raise DerSdkError(
            f"the demo's agents need adapters that are not installed:\n{exc}\n"
            f"The examples' simulators are the plugins {', '.join(DEMO_PLUGINS)}: "
            "pip install 'der-sdk[demo]' (or install their wheels)"
        ) from None


async def _start_tls_agents(
    inventory: Inventory,
    tls: DemoTls,
    grpc_addr: str,
    ns: argparse.Namespace,
    plugins: Plugins,
    config: AgentConfig,
) -> list[Any]:
    from der_sdk_agent.agent import Agent
    from der_sdk_agent.tls import LinkSecurity

    agents: list[Any] = []
    try:
        for site_id, (cert, key) in sorted(tls.agent_files.items()):
            assets = inventory.assets_for_site(site_id)
            if not assets:
                continue
            security = await asyncio.to_thread(
                LinkSecurity.load, ca=str(tls.ca), cert=str(cert), key=str(key)
            )
            agent = Agent(
                agent_id=f"gateway-{site_id}",
                site_id=site_id,
                assets=assets,
                headend=grpc_addr,
                config=config,
                plugins=plugins,
                security=security,
                buffer_path=str(Path(ns.data_dir) / f"agent-gateway-{site_id}.sqlite3"),
            )
            await agent.start()
            agents.append(agent)
    except BaseException:
        for agent in agents:
            await agent.stop()
        raise
    return agents


async def run_demo(ns: argparse.Namespace) -> None:
    """Start the headend and the agents, print what to try, run until a stop signal."""
    from der_sdk.agent_config import load_agent_config
    from der_sdk.cli import wait_for_stop_signal
    from der_sdk.inventory import load_inventory
    from der_sdk.plugins import load_plugins
    from der_sdk_agent.launch import launch
    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import Headend

    resolve_example(ns)
    assets_path = Path(ns.assets)
    plugins = load_plugins()
    inventory = load_inventory(str(assets_path), asset_types=plugins.asset_types.names())
    config = load_agent_config(ns.config)
    check_simulators(config, plugins, inventory)
    db_url = f"sqlite:///{Path(ns.data_dir) / 'der.db'}"
    env = {"ASSETS_PATH": str(assets_path), "DATABASE_URL": db_url}
    tls: DemoTls | None = None
    if getattr(ns, "tls", False):
        tls = await asyncio.to_thread(
            prepare_tls, Path(ns.data_dir) / "demo-tls", assets_path, inventory
        )
        env.update(
            {
                "ASSETS_PATH": str(tls.inventory),
                "HEADEND_TLS_CERT": str(tls.headend_cert),
                "HEADEND_TLS_KEY": str(tls.headend_key),
                "HEADEND_CLIENT_CA": str(tls.ca),
                "HEADEND_TOKENS_FILE": str(tls.tokens),
                "HEADEND_AUTH": "on",
            }
        )
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
        if tls is not None:
            agents = await _start_tls_agents(inventory, tls, grpc_addr, ns, plugins, config)
        else:
            agents = await launch(
                inventory, headend=grpc_addr, mode="site", config=config, plugins=plugins
            )
        site_id, asset_id = _showcase(inventory)
        if tls is not None:
            banner = _tls_banner(headend.http_url, grpc_addr, db_url, site_id, asset_id, tls)
        else:
            banner = _banner(headend.http_url, grpc_addr, db_url, site_id, asset_id, assets_path)
        print(banner, flush=True)
        await wait_for_stop_signal(ns.duration)
    finally:
        for agent in agents:
            await agent.stop()
        await headend.stop()
        log.info("demo stopped; data kept in %s", db_url)
