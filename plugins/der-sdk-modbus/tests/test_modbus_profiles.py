"""Profiles and options: the SunSpec pack's layouts, profile checks with clear errors,
versions, and the adapter's options as the agent validates them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from der_sdk_modbus import ModbusAdapter, ModbusOptions
from der_sdk_modbus.pack import builtin_profiles, find_profile
from der_sdk_modbus.points import ProfileError, compile_profile
from modbus_kit import ASSET, all_profiles, profile

from der_sdk import load_plugins
from der_sdk.errors import DerSdkError
from der_sdk.extensions import AdapterContext, DevicePoint, DeviceProfile
from der_sdk_agent.adapters import convert_options

PLUGIN = Path(__file__).resolve().parents[1]

# Model lengths (L) and a few point offsets from the SunSpec model definitions.
SUNSPEC_LAYOUT = {
    1: ("sunspec-1", 66, {"Mn": 2, "SN": 50}),
    103: ("sunspec-103", 50, {"W": 14, "W_SF": 15, "St": 38, "Evt1": 40}),
    701: ("sunspec-701", 153, {"W": 10, "Hz": 17, "TotWhInj": 19, "W_SF": 116}),
    704: ("sunspec-704", 65, {"WSetEna": 22, "WSetMod": 23, "WSet": 24, "WSet_SF": 55}),
    802: ("sunspec-802", 62, {"SoC": 11, "W": 47, "SoC_SF": 56}),
    124: ("sunspec-124", 24, {"ChaState": 8, "ChaState_SF": 22}),
}


@pytest.mark.parametrize("model_id", sorted(SUNSPEC_LAYOUT))
def test_sunspec_pack_has_the_real_model_layouts(model_id: int) -> None:
    name, length, offsets = SUNSPEC_LAYOUT[model_id]
    pack = {p.name: p for p in builtin_profiles()}
    model = pack[name]
    assert model.protocol == "modbus"
    points = compile_profile(model, {model_id: (40000, length)})
    by_name = {p.name: p for p in points}
    assert max(p.end for p in points) == 40000 + 2 + length
    for point_name, offset in offsets.items():
        assert by_name[point_name].address == 40000 + offset, point_name
    assert {p.sunspec_model for p in points} == {model_id}


def test_sunspec_pack_feeds_the_core_fields() -> None:
    pack = {p.name: p for p in builtin_profiles()}
    fields = {name: {pt.field for pt in p.points.values() if pt.field} for name, p in pack.items()}
    assert {"mw", "status", "online", "fault_code"} <= fields["sunspec-701"]
    assert {"mw", "status", "fault_code"} <= fields["sunspec-103"]
    assert fields["sunspec-704"] == {"mw_setpoint"}
    assert "details.soc_pct" in fields["sunspec-802"]
    assert "details.soc_pct" in fields["sunspec-124"]


@pytest.mark.skipif(
    importlib.util.find_spec("sunspec2") is None, reason="needs pysunspec2 to regenerate"
)
def test_generated_sunspec_profiles_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(PLUGIN / "scripts" / "generate_sunspec_profiles.py"),
            "--out",
            str(tmp_path),
            "--source",
            "pysunspec2 1.3.7 models/json",
        ],
        check=True,
    )
    for generated in tmp_path.glob("*.yaml"):
        shipped = PLUGIN / "der_sdk_modbus" / "profiles" / generated.name
        assert generated.read_text() == shipped.read_text(), f"{generated.name} is stale"


def test_the_pack_is_registered_through_der_device_profiles() -> None:
    plugins = load_plugins()
    names = {p.name for p in plugins.device_profiles}
    assert {"sunspec-1", "sunspec-103", "sunspec-701", "sunspec-704", "sunspec-802"} <= names
    assert plugins.adapter_types.provider("modbus") == "der-sdk-modbus"


# --------------------------------------------------------------------------- profile checks


def _profile(**points: DevicePoint) -> DeviceProfile:
    return DeviceProfile(
        name="bad", vendor="T", model="T", version="1.0", protocol="modbus", points=points
    )


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ({"p": DevicePoint(address=0, field="mw", extra={"typ": "int16"})}, "'p' typ: unknown"),
        ({"p": DevicePoint(address=0, field="mw", extra={"type": "int17"})}, "unknown data type"),
        ({"p": DevicePoint(address=0, field="mw", unit="V")}, "'V' cannot feed mw"),
        (
            {"p": DevicePoint(address=0, field="mw", extra={"scale_factor": "SF"})},
            "scale_factor: no point 'SF'",
        ),
        (
            {"a": DevicePoint(address=0, field="mw"), "b": DevicePoint(address=1, field="mw")},
            "both feed mw",
        ),
        (
            {"p": DevicePoint(address=0, field="mw", extra={"table": "registers"})},
            "must be holding, input, coil or discrete",
        ),
        (
            {"p": DevicePoint(address=0, field="mw", extra={"word_order": "middle"})},
            "word_order: must be one of big, little",
        ),
        (
            {"p": DevicePoint(address=0, field="mw", extra={"sunspec_model": 701})},
            "relative to SunSpec model(s) 701; set sunspec_scan: true",
        ),
        (
            {
                "p": DevicePoint(
                    address=0, field="mw_setpoint", access="rw", extra={"enable": {"x": 1}}
                )
            },
            "enable: no point 'x'",
        ),
        ({"p": DevicePoint(address=70000, field="mw")}, "must be 0-65535"),
    ],
)
def test_a_bad_profile_names_the_point_and_setting(
    points: dict[str, DevicePoint], message: str
) -> None:
    with pytest.raises(ProfileError, match=r"device profile 'bad' 1\.0") as caught:
        compile_profile(_profile(**points))
    assert message in str(caught.value)


def test_a_profile_for_another_protocol_is_refused() -> None:
    other = DeviceProfile(name="ua", vendor="T", model="T", version="1", protocol="opcua")
    with pytest.raises(ProfileError, match="is for protocol 'opcua', not modbus"):
        compile_profile(other)


# --------------------------------------------------------------------------- versions


def test_profile_versions_default_to_the_highest_and_can_be_pinned() -> None:
    profiles = all_profiles()
    assert find_profile(profiles, "acme-bess").version == "2.0.0"
    assert find_profile(profiles, "acme-bess", "1.0.0").version == "1.0.0"
    assert find_profile(profiles, "acme-bess", "1.0").version == "1.0.0"  # PEP 440 equality
    with pytest.raises(
        ProfileError, match=r"'acme-bess' version 3\.0 is not available.*1\.0\.0, 2\.0\.0"
    ):
        find_profile(profiles, "acme-bess", "3.0")


def test_pinned_version_changes_the_point_map() -> None:
    def power_address(version: str | None) -> int:
        options = ModbusOptions(host="h", profile="acme-bess", profile_version=version)
        adapter = ModbusAdapter(
            AdapterContext(asset=ASSET, options=options, profiles=all_profiles())
        )
        assert adapter.point_map is not None
        return next(p.address for p in adapter.point_map.polled if p.field == "mw")

    assert power_address(None) == 300
    assert power_address("1.0.0") == 100


# --------------------------------------------------------------------------- options


def _convert(raw: dict[str, object]) -> ModbusOptions:
    options = convert_options(raw, ModbusOptions, what="asset X: adapter 'modbus'")
    assert isinstance(options, ModbusOptions)
    return options


def test_options_have_field_friendly_defaults() -> None:
    options = _convert({"host": "10.0.0.5", "profile": "acme-bess"})
    assert (options.port, options.unit_id, options.max_read_registers) == (502, 1, 125)
    assert options.poll_interval_s == 1.0 and options.gap_tolerance == 8


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"host": "h", "profile": "p", "colour": "red"}, "unknown field colour"),
        ({"profile": "p"}, "missing required field host"),
        ({"host": "h"}, "give a device profile"),
        ({"host": "h", "profile": "p", "max_read_registers": 200}, "max_read_registers"),
        ({"host": "h", "profile": "p", "port": 0}, "port"),
        ({"host": "h", "sunspec_scan": True, "profile_version": "1"}, "profile_version needs"),
    ],
)
def test_bad_options_are_refused_naming_the_field(raw: dict[str, object], message: str) -> None:
    with pytest.raises(DerSdkError, match="asset X: adapter 'modbus': invalid options") as caught:
        _convert(raw)
    assert message in str(caught.value)


def test_unknown_profile_fails_when_the_agent_builds_adapters() -> None:
    options = ModbusOptions(host="h", profile="no-such-thing")
    with pytest.raises(ProfileError, match=r"no Modbus device profile 'no-such-thing'.*acme-bess"):
        ModbusAdapter(AdapterContext(asset=ASSET, options=options, profiles=all_profiles()))


def test_a_profile_without_power_is_refused() -> None:
    meter = _profile(hz=DevicePoint(address=0, field="details.frequency_hz", scale=0.01))
    options = ModbusOptions(host="h", profile="bad")
    with pytest.raises(ProfileError, match="no readable point feeding mw"):
        ModbusAdapter(AdapterContext(asset=ASSET, options=options, profiles={"bad": meter}))


def test_a_sunspec_profile_without_scan_says_to_scan() -> None:
    options = ModbusOptions(host="h", profile="sunspec-701")
    with pytest.raises(ProfileError, match=r"model\(s\) 701; set sunspec_scan: true"):
        ModbusAdapter(AdapterContext(asset=ASSET, options=options, profiles=all_profiles()))


def test_profile_helper_finds_the_test_profiles() -> None:
    assert profile("acme-bess").version == "2.0.0"
