"""The entry point registers the three adapter types, and the README's config converts."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from der_sdk_sim_plant import (
    SimEvChargerAdapter,
    SimEvChargerOptions,
    SimPvAdapter,
    SimPvOptions,
    SimWindAdapter,
    SimWindOptions,
)
from plant_kit import EV, PV, WIND

from der_sdk import load_plugins
from der_sdk.agent_config import convert_options
from der_sdk.extensions import AdapterContext

README = Path(__file__).resolve().parent.parent / "README.md"
TYPES = {
    "sim-pv": (SimPvOptions, SimPvAdapter, PV),
    "sim-wind": (SimWindOptions, SimWindAdapter, WIND),
    "sim-ev-charger": (SimEvChargerOptions, SimEvChargerAdapter, EV),
}


def test_the_entry_point_registers_three_adapter_types() -> None:
    plugins = load_plugins()
    for name, (options, adapter_class, asset) in TYPES.items():
        assert plugins.adapter_types.provider(name) == "der-sdk-sim-plant"
        adapter_type = plugins.adapter_types.get(name)
        assert adapter_type.options is options
        adapter = adapter_type.factory(AdapterContext(asset=asset, options=options()))
        assert isinstance(adapter, adapter_class)
    assert "der-sdk-sim-plant" in plugins.versions()


def test_the_readme_agent_config_is_valid_for_each_adapter() -> None:
    block = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)[0]
    assets = yaml.safe_load(block)["assets"]
    adapters = {entry["adapter"] for entry in assets.values()}
    assert adapters == set(TYPES)
    for entry in assets.values():
        options_type = TYPES[entry["adapter"]][0]
        converted = convert_options(entry["options"], options_type, what=entry["adapter"])
        assert converted.seed == 7  # type: ignore[attr-defined]
