"""The YAML in ``docs/opcua.md`` and the plugin README is real: every snippet converts to the
plugin's options, and the full agent config builds an agent against the example inventory
with the certificates the docs tell you to make."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from der_sdk_opcua.adapter import OpcuaAdapterOptions
from der_sdk_opcua.certs import write_application_certificate
from der_sdk_opcua.server import OpcuaEdgeServer, OpcuaServerOptions

from der_sdk import load_plugins
from der_sdk.agent_config import parse_agent_config, validate_agent_config
from der_sdk.extensions import EdgeServiceContext
from der_sdk.inventory import load_inventory
from der_sdk_agent.adapters import convert_options
from der_sdk_agent.agent import Agent

ROOT = Path(__file__).resolve().parents[3]
DOCS = [ROOT / "docs" / "opcua.md", ROOT / "plugins" / "der-sdk-opcua" / "README.md"]
INVENTORY = ROOT / "examples" / "assets.yaml"
NORTH_YARD = "ed7332b8-d686-44d3-938c-9ddfd76b4791"


def yaml_blocks(path: Path) -> list[Any]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)]


def full_configs(path: Path) -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)
    return [b for b in blocks if "edge_services:" in b and "assets:" in b]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_yaml_snippet_converts_to_the_plugin_options(doc: Path) -> None:
    blocks = yaml_blocks(doc)
    assert blocks, f"{doc} has no YAML"
    for block in blocks:
        if "options" in block and "endpoint" in block["options"]:  # an adapter's block
            convert_options(block["options"], OpcuaAdapterOptions, what=str(doc))
        for service in block.get("edge_services", []):
            convert_options(service["options"], OpcuaServerOptions, what=str(doc))
        for entry in block.get("assets", {}).values():
            if entry.get("adapter") == "opcua":
                convert_options(entry["options"], OpcuaAdapterOptions, what=str(doc))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_documented_agent_config_builds_an_agent(
    doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = full_configs(doc)
    assert configs, f"{doc} shows no full agent config"
    # the certificates of "Try it"
    pki = tmp_path / "pki"
    for name in ("edge", "agent", "scada"):
        write_application_certificate(pki, name, application_uri=f"urn:north-yard:{name}")
    (pki / "trusted").mkdir()
    (pki / "trusted" / "scada.der").write_bytes((pki / "scada.der").read_bytes())
    monkeypatch.chdir(tmp_path)

    plugins = load_plugins()
    inventory = load_inventory(str(INVENTORY), asset_types=plugins.asset_types.names())
    served = inventory.assets_for_site(NORTH_YARD)
    for text in configs:
        config = parse_agent_config(text, f"{doc.name} agent config")
        validate_agent_config(config, plugins, inventory, [a.asset_id for a in served])
        agent = Agent(
            agent_id="docs",
            site_id=NORTH_YARD,
            assets=served,
            headend="127.0.0.1:1",
            config=config,
            plugins=plugins,
        )  # builds the adapters: the certificate files load
        assert {rt.adapter_name for rt in agent.adapters.values()} == {"opcua", "sim-bess"}
        options = convert_options(
            config.edge_services[0].options, OpcuaServerOptions, what="edge service"
        )
        server = OpcuaEdgeServer(
            EdgeServiceContext(
                agent_id="docs",
                site_id=NORTH_YARD,
                assets=served,
                options=options,
                dispatch=agent.dispatcher.local_dispatch,
            )
        )
        assert server.site_controls and server.application_uri == "urn:north-yard:edge"
