"""``docs/agent.md`` stays true: its agent config parses and validates, its env var table
lists what the settings read, and the example files start a real gateway agent."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import msgspec
import pytest

from der_sdk import hookimpl
from der_sdk.agent_config import load_agent_config, parse_agent_config, validate_agent_config
from der_sdk.extensions import EdgeService, EdgeServiceContext, EdgeServiceType
from der_sdk.inventory import load_inventory
from der_sdk.plugins import Plugins
from der_sdk_agent.__main__ import main
from der_sdk_agent.agent import Agent
from der_sdk_agent.settings import AgentSettings
from tests.agent.fake_headend import FakeHeadend

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "agent.md"
EXAMPLES = ROOT / "examples"


class _OpcUaOptions(msgspec.Struct, frozen=True, kw_only=True):
    endpoint: str


class _NullService(EdgeService):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _StandInServices:
    """Stands in for the OPC UA plugin the docs example names."""

    @hookimpl
    def der_edge_services(self) -> list[EdgeServiceType]:
        def build(context: EdgeServiceContext) -> EdgeService:
            return _NullService()

        return [EdgeServiceType(name="opcua-server", factory=build, options=_OpcUaOptions)]


def _yaml_block(marker: str) -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    return next(b for b in blocks if b.startswith(marker))


def test_documented_agent_config_is_valid(plugins: Plugins) -> None:
    if "opcua-server" not in plugins.edge_services:  # der-sdk-opcua may be installed
        plugins.register(_StandInServices(), "stand-in-opcua")
    config = parse_agent_config(_yaml_block("# agent.yaml"), "docs/agent.md")
    inventory = load_inventory(EXAMPLES / "assets.yaml")
    validate_agent_config(config, plugins, inventory, list(inventory.assets))
    assert config.edge_services[0].name == "opcua-server"


def test_documented_env_vars_are_the_ones_read() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", DOC.read_text(), flags=re.M))
    source = (ROOT / "der_sdk_agent" / "settings.py").read_text()
    read = set(re.findall(r"\(env, \"([A-Z_]+)\"\)", source))
    assert documented == read


async def test_example_files_run_a_gateway_agent(plugins: Plugins, tmp_path: Path) -> None:
    inventory = load_inventory(EXAMPLES / "assets.yaml")
    site_id = next(iter(inventory.sites))
    async with FakeHeadend() as headend:
        settings = AgentSettings.from_env(
            {
                "ASSETS_PATH": str(EXAMPLES / "assets.yaml"),
                "AGENT_CONFIG": str(EXAMPLES / "agent.yaml"),
                "GATEWAY_SITE_ID": site_id,
                "HEADEND_GRPC": headend.address,
                "TELEMETRY_INTERVAL_S": "0.05",
                "AGENT_BUFFER_PATH": str(tmp_path / "agent.sqlite3"),
            }
        )
        agent = Agent.from_settings(settings, plugins)
        assert agent.agent_id == load_agent_config(EXAMPLES / "agent.yaml").agent_id
        await agent.start()
        try:
            stream = await headend.wait_stream()
            await headend.wait_for(lambda: stream.batches)
            served = sorted(a.asset_id for a in inventory.assets_for_site(site_id))
            assert sorted(a.asset_id for a in stream.register.assets) == served  # type: ignore[union-attr]
        finally:
            await agent.stop()


def test_module_entry_point_reports_a_bad_environment_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for key in ("ASSET_ID", "GATEWAY_SITE_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ASSETS_PATH", str(EXAMPLES / "assets.yaml"))
    caplog.set_level(logging.ERROR, logger="der.agent")
    assert main() == 2
    [record] = [r for r in caplog.records if r.name == "der.agent"]
    assert "GATEWAY_SITE_ID" in record.getMessage() and record.exc_info is None
