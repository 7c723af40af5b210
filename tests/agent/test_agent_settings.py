"""Agent settings from the environment, agents built from settings, and the launcher."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import msgspec
import pytest

from der_sdk.agent_config import BufferConfig, load_agent_config
from der_sdk.errors import ConfigError, DerSdkError
from der_sdk.inventory import load_inventory
from der_sdk.plugins import Plugins
from der_sdk_agent.agent import Agent
from der_sdk_agent.launch import launch, run_agent, run_launch
from der_sdk_agent.settings import AgentSettings
from tests.agent.conftest import A1, A2, OTHER_SITE, SITE, UNSERVED
from tests.agent.fake_headend import FakeHeadend

A3 = "00000000-0000-4000-8000-000000000003"

INVENTORY = f"""\
sites:
  - site_id: {SITE}
    name: North Yard
  - site_id: {OTHER_SITE}
    name: South Yard
assets:
  - asset_id: {A1}
    site_id: {SITE}
    name: BESS 1
    capacity_mwh: 2
    max_mw: 1
    min_mw: -1
  - asset_id: {A2}
    site_id: {SITE}
    name: BESS 2
    capacity_mwh: 6
    max_mw: 4
    min_mw: -4
  - asset_id: {A3}
    site_id: {OTHER_SITE}
    name: BESS 3
    capacity_mwh: 1
    max_mw: 0.5
    min_mw: -0.5
"""

AGENT_CONFIG = f"""\
telemetry_interval_s: 0.05
heartbeat_interval_s: 0.2
reconnect_initial_s: 0.05
reconnect_max_s: 0.2
assets:
  {A2}:
    adapter: test-flaky
    options: {{port: 1502}}
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(INVENTORY)
    config = tmp_path / "agent.yaml"
    config.write_text(AGENT_CONFIG)
    return {
        "ASSETS_PATH": str(inventory),
        "AGENT_CONFIG": str(config),
        "AGENT_BUFFER_PATH": str(tmp_path / "buffers" / "agent-{agent_id}.sqlite3"),
    }


# ----------------------------------------------------------------------------- from_env


def test_neither_mode_is_an_error_saying_what_to_set() -> None:
    with pytest.raises(DerSdkError) as caught:
        AgentSettings.from_env({"ASSETS_PATH": "assets.yaml"})
    assert "ASSET_ID" in str(caught.value) and "GATEWAY_SITE_ID" in str(caught.value)


def test_assets_path_is_required() -> None:
    with pytest.raises(DerSdkError, match="ASSETS_PATH"):
        AgentSettings.from_env({"ASSET_ID": A1})


def test_asset_id_wins_over_gateway_site_id_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="der.agent")
    settings = AgentSettings.from_env(
        {"ASSETS_PATH": "a.yaml", "ASSET_ID": A1, "GATEWAY_SITE_ID": SITE}
    )
    assert settings.mode == "asset" and settings.asset_id == A1 and settings.site_id is None
    assert any("ASSET_ID wins" in r.getMessage() for r in caplog.records)


def test_defaults_and_overrides() -> None:
    settings = AgentSettings.from_env({"ASSETS_PATH": "a.yaml", "GATEWAY_SITE_ID": SITE})
    assert settings.headend == "127.0.0.1:50051"
    assert settings.mode == "site"
    assert settings.telemetry_interval_s is None and settings.agent_config_path is None
    assert settings.buffer_path is None
    settings = AgentSettings.from_env(
        {
            "ASSETS_PATH": "a.yaml",
            "GATEWAY_SITE_ID": SITE,
            "HEADEND_GRPC": "headend.example:6000",
            "GATEWAY_ID": "gw-north",
            "TELEMETRY_INTERVAL_S": "1.5",
            "HEARTBEAT_INTERVAL_S": "10",
            "AGENT_BUFFER_PATH": "/var/lib/der/agent.sqlite3",
        }
    )
    assert settings.buffer_path == "/var/lib/der/agent.sqlite3"
    assert settings.headend == "headend.example:6000"
    assert settings.gateway_id == "gw-north"
    assert (settings.telemetry_interval_s, settings.heartbeat_interval_s) == (1.5, 10.0)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_bad_interval_names_the_variable(value: str) -> None:
    with pytest.raises(DerSdkError, match="TELEMETRY_INTERVAL_S"):
        AgentSettings.from_env(
            {"ASSETS_PATH": "a.yaml", "ASSET_ID": A1, "TELEMETRY_INTERVAL_S": value}
        )


# ----------------------------------------------------------------------------- from_settings


def test_unknown_asset_id_names_it_and_the_inventory(
    files: dict[str, str], plugins: Plugins
) -> None:
    settings = AgentSettings.from_env({**files, "ASSET_ID": UNSERVED})
    with pytest.raises(DerSdkError) as caught:
        Agent.from_settings(settings, plugins)
    assert UNSERVED in str(caught.value) and files["ASSETS_PATH"] in str(caught.value)


def test_unknown_site_id_names_it_and_the_inventory(
    files: dict[str, str], plugins: Plugins
) -> None:
    missing = "99999999-0000-4000-8000-000000000000"
    settings = AgentSettings.from_env({**files, "GATEWAY_SITE_ID": missing})
    with pytest.raises(DerSdkError) as caught:
        Agent.from_settings(settings, plugins)
    assert missing in str(caught.value) and files["ASSETS_PATH"] in str(caught.value)


def test_gateway_agent_from_settings(files: dict[str, str], plugins: Plugins) -> None:
    settings = AgentSettings.from_env(
        {**files, "GATEWAY_SITE_ID": SITE, "TELEMETRY_INTERVAL_S": "0.5"}
    )
    agent = Agent.from_settings(settings, plugins)
    assert agent.agent_id == f"gateway-{SITE}"
    assert [a.asset_id for a in agent.assets] == [A1, A2]
    assert {a: rt.adapter_name for a, rt in agent.adapters.items()} == {
        A1: "sim-bess",
        A2: "test-flaky",
    }
    assert agent.config.telemetry_interval_s == 0.5  # the environment wins over the file
    assert agent.config.heartbeat_interval_s == 0.2


def test_cli_agent_buffer_path_from_env_else_config_else_der_data(
    tmp_path: Path, files: dict[str, str], plugins: Plugins
) -> None:
    settings = AgentSettings.from_env({**files, "GATEWAY_SITE_ID": SITE})
    agent = Agent.from_settings(settings, plugins)
    assert agent.buffer.path == str(tmp_path / "buffers" / f"agent-gateway-{SITE}.sqlite3")

    config = tmp_path / "buffered.yaml"
    config.write_text(AGENT_CONFIG + "buffer:\n  path: site/{agent_id}.db\n  sync: full\n")
    env = {**files, "AGENT_CONFIG": str(config), "GATEWAY_SITE_ID": SITE}
    del env["AGENT_BUFFER_PATH"]
    agent = Agent.from_settings(AgentSettings.from_env(env), plugins)
    assert (agent.buffer.path, agent.buffer.sync) == (f"site/gateway-{SITE}.db", "full")

    env["AGENT_CONFIG"] = files["AGENT_CONFIG"]
    agent = Agent.from_settings(AgentSettings.from_env(env), plugins)
    assert agent.buffer.path == f"der-data/agent-gateway-{SITE}.sqlite3"
    assert not (tmp_path / "der-data").exists()  # nothing is opened before start


def test_single_asset_agent_from_settings(files: dict[str, str], plugins: Plugins) -> None:
    settings = AgentSettings.from_env({**files, "ASSET_ID": A3})
    agent = Agent.from_settings(settings, plugins)
    assert agent.agent_id == f"asset-{A3}"
    assert agent.site_id == OTHER_SITE
    assert [a.asset_id for a in agent.assets] == [A3]


def test_bad_agent_config_is_a_config_error(
    tmp_path: Path, files: dict[str, str], plugins: Plugins
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"assets:\n  {A2}:\n    adapter: test-flaky\n    options: {{port: x}}\n")
    settings = AgentSettings.from_env({**files, "AGENT_CONFIG": str(bad), "ASSET_ID": A2})
    with pytest.raises(ConfigError) as caught:
        Agent.from_settings(settings, plugins)
    assert str(bad) in str(caught.value) and "port" in str(caught.value)


# ----------------------------------------------------------------------------- running


@pytest.mark.parametrize(("mode", "expected"), [("site", 2), ("asset", 3)])
async def test_launch_starts_one_agent_per_site_or_asset(
    files: dict[str, str], plugins: Plugins, mode: str, expected: int
) -> None:
    inventory = load_inventory(files["ASSETS_PATH"], asset_types=plugins.asset_types.names())
    config = load_agent_config(files["AGENT_CONFIG"])
    async with FakeHeadend() as headend:
        agents = await launch(
            inventory,
            headend=headend.address,
            mode=mode,  # type: ignore[arg-type]
            config=config,
            plugins=plugins,
        )
        try:
            assert len(agents) == expected
            await headend.wait_for(
                lambda: sum(s.register is not None for s in headend.streams) == expected
            )
            registered = {
                s.register.agent_id: sorted(a.asset_id for a in s.register.assets)
                for s in headend.streams
                if s.register is not None
            }
            if mode == "site":
                assert registered == {f"gateway-{SITE}": [A1, A2], f"gateway-{OTHER_SITE}": [A3]}
            else:
                assert registered == {f"asset-{a}": [a] for a in (A1, A2, A3)}
        finally:
            await asyncio.gather(*(a.stop() for a in agents))


async def test_launch_refuses_one_buffer_file_for_many_agents(
    files: dict[str, str], plugins: Plugins
) -> None:
    inventory = load_inventory(files["ASSETS_PATH"], asset_types=plugins.asset_types.names())
    config = msgspec.structs.replace(
        load_agent_config(files["AGENT_CONFIG"]), buffer=BufferConfig(path="one.sqlite3")
    )
    with pytest.raises(DerSdkError, match=r"shared by 2 agents; put \{agent_id\} in it"):
        await launch(inventory, headend="127.0.0.1:1", mode="site", config=config, plugins=plugins)


async def test_run_agent_stops_on_sigterm(files: dict[str, str], plugins: Plugins) -> None:
    async with FakeHeadend() as headend:
        settings = AgentSettings.from_env(
            {**files, "GATEWAY_SITE_ID": SITE, "HEADEND_GRPC": headend.address}
        )
        runner = asyncio.create_task(run_agent(settings, plugins))
        await headend.wait_stream()
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(5):
            await runner
        await headend.wait_for(lambda: headend.streams[0].closed)


async def test_run_launch_stops_on_sigint(files: dict[str, str], plugins: Plugins) -> None:
    inventory = load_inventory(files["ASSETS_PATH"], asset_types=plugins.asset_types.names())
    config = load_agent_config(files["AGENT_CONFIG"])
    async with FakeHeadend() as headend:
        runner = asyncio.create_task(
            run_launch(
                inventory, headend=headend.address, mode="site", config=config, plugins=plugins
            )
        )
        await headend.wait_for(lambda: sum(s.register is not None for s in headend.streams) == 2)
        os.kill(os.getpid(), signal.SIGINT)
        async with asyncio.timeout(5):
            await runner
        await headend.wait_for(lambda: all(s.closed for s in headend.streams))
