"""Every snippet in docs/modbus.md and the plugin README runs or validates: agent configs
against the adapter's options, profiles through the profile checks, Python by running it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from der_sdk_modbus import ModbusOptions
from der_sdk_modbus.points import compile_profile

from der_sdk.agent_config import parse_agent_config
from der_sdk.device_packs import parse_profile
from der_sdk.yamlconf import Issues, parse_yaml
from der_sdk_agent.adapters import convert_options

ROOT = Path(__file__).resolve().parents[3]
DOCS = [ROOT / "docs" / "modbus.md", ROOT / "plugins" / "der-sdk-modbus" / "README.md"]


def _blocks(language: str) -> list[tuple[str, str]]:
    return [
        (f"{doc.name}#{index}", block)
        for doc in DOCS
        for index, block in enumerate(
            re.findall(rf"```{language}\n(.*?)```", doc.read_text(), flags=re.S)
        )
    ]


@pytest.mark.parametrize(("where", "text"), _blocks("yaml"))
def test_yaml_snippets_are_valid(where: str, text: str) -> None:
    data = parse_yaml(text, where)
    if "assets" in data:
        config = parse_agent_config(text, where)
        assert config.assets, where
        for asset_id, entry in config.assets.items():
            assert entry.adapter == "modbus"
            convert_options(entry.options, ModbusOptions, what=f"{where} {asset_id}")
    else:
        issues = Issues(where)
        profile = parse_profile(data, issues)
        assert profile is not None, [str(i) for i in issues.items]
        assert compile_profile(profile)


@pytest.mark.parametrize(("where", "code"), _blocks("python"))
def test_python_snippets_run(where: str, code: str, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(code, where, "exec"), {"__name__": f"doc_{where}"})
    assert capsys.readouterr().out
