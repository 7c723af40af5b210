"""The example pack's profiles load, validate and are listed under its distribution."""

from __future__ import annotations

from der_sdk import load_plugins
from der_sdk.device_packs import load_profiles


def test_the_pack_holds_a_battery_inverter_and_a_meter() -> None:
    profiles = {p.name: p for p in load_profiles("der_sdk_example_pack")}
    assert sorted(profiles) == ["example-bess-inverter", "example-meter"]
    inverter = profiles["example-bess-inverter"]
    assert (inverter.protocol, inverter.version) == ("modbus", "1.0.0")
    assert inverter.points["active_power"].field == "mw"
    assert inverter.points["active_power_setpoint"].access == "rw"
    assert inverter.points["active_power"].extra == {
        "register": "input",
        "type": "int32",
        "word_order": "big",
    }
    assert inverter.points["operating_state"].extra["enum"][307] == "running"


def test_installed_pack_registers_its_profiles() -> None:
    plugins = load_plugins(env={})
    assert plugins.profile("example-meter").model == "EP-M340"
    assert plugins.device_profiles.provider("example-meter") == "der-sdk-example-pack"
