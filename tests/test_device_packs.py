"""Device packs: profile YAML inside a package, its validation, versions in the registry,
and ``der profiles``."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from der_sdk import hookimpl, load_plugins
from der_sdk.cli import main
from der_sdk.device_packs import load_profiles, parse_profile, version_key
from der_sdk.errors import ConfigError, PluginError, UnknownNameError
from der_sdk.extensions import DevicePoint, DeviceProfile
from der_sdk.yamlconf import Issues, parse_yaml

ROOT = Path(__file__).resolve().parent.parent
NO_ENV: dict[str, str] = {}

PACK_HOOK = """
from der_sdk import hookimpl
from der_sdk.device_packs import load_profiles


@hookimpl
def der_device_profiles():
    return load_profiles(__name__)
"""

MakePack = Callable[..., types.ModuleType]


def profile_yaml(name: str = "acme-b2", version: str = "1.0.0", points: str = "") -> str:
    points = (
        points
        or """
      active_power:
        address: 40001
        unit: kW
        scale: 0.001
        field: mw
    """
    )
    return textwrap.dedent(
        f"""\
        name: {name}
        vendor: Acme
        model: B2
        version: "{version}"
        protocol: modbus
        points:
        """
    ) + textwrap.indent(textwrap.dedent(points).strip("\n"), "  ")


@pytest.fixture
def make_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakePack]:
    """Create an importable package holding ``profiles/*.yaml`` and the two-line hook."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    created: list[str] = []

    def make(package: str, files: dict[str, str], folder: str = "profiles") -> types.ModuleType:
        pkg = root / package
        (pkg / folder).mkdir(parents=True)
        (pkg / "__init__.py").write_text(PACK_HOOK)
        for filename, text in files.items():
            (pkg / folder / filename).write_text(text)
        created.append(package)
        importlib.invalidate_caches()
        return importlib.import_module(package)

    yield make
    for name in created:
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- versions


def test_versions_order_as_pep_440() -> None:
    ordered = ["0.9", "1.0.dev1", "1.0a1", "1.0b2", "1.0rc1", "1.0", "1.0.post1", "1.1", "1.10"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert version_key("1.0") == version_key("1.0.0") == version_key("v1.0")


def test_every_pep_440_form_is_a_version_local_labels_and_epochs_too() -> None:
    ordered = ["1.0", "1.0+fw.3", "1.0+fw.10", "1.0.post1", "2.0", "1!0.5"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert version_key("1.0+FW.3") == version_key("1.0.0+fw.3")


@pytest.mark.parametrize("bad", ["latest", "1.x", "", "1..2", "one"])
def test_a_non_version_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"not a version like 1\.2\.0"):
        version_key(bad)


# --------------------------------------------------------------------------- loading


def test_load_profiles_reads_every_yaml_file_of_the_package(make_pack: MakePack) -> None:
    make_pack(
        "pack_load",
        {
            "b2.yaml": profile_yaml(
                points="""
                active_power: {address: 40001, unit: kW, scale: 0.001, field: mw, type: int32}
                soc: {address: "30845", unit: "%", access: r, field: details.soc_pct}
                setpoint: {address: 40149, access: rw, field: mw_setpoint}
                """
            ),
            "c3.yml": profile_yaml(name="acme-c3"),
            "notes.txt": "not a profile",
        },
    )
    profiles = load_profiles("pack_load")
    assert [p.name for p in profiles] == ["acme-b2", "acme-c3"]
    b2 = profiles[0]
    assert (b2.vendor, b2.model, b2.version, b2.protocol) == ("Acme", "B2", "1.0.0", "modbus")
    assert b2.points["active_power"] == DevicePoint(
        address=40001, unit="kW", scale=0.001, field="mw", extra={"type": "int32"}
    )
    assert b2.points["soc"].address == "30845" and b2.points["soc"].scale == 1.0
    assert b2.points["setpoint"].access == "rw"


def test_load_profiles_accepts_a_module_name_of_the_pack(make_pack: MakePack) -> None:
    make_pack("pack_module", {"b2.yaml": profile_yaml()})
    (Path(sys.modules["pack_module"].__file__ or "").parent / "hooks.py").write_text("")
    importlib.invalidate_caches()
    importlib.import_module("pack_module.hooks")
    assert [p.name for p in load_profiles("pack_module.hooks")] == ["acme-b2"]


def test_schema_error_names_package_file_line_and_field(make_pack: MakePack) -> None:
    bad = profile_yaml(
        points="""
        active_power:
          address: 40001
          access: read
        """
    )
    make_pack("pack_bad_access", {"bad.yaml": bad})
    with pytest.raises(ConfigError) as caught:
        load_profiles("pack_bad_access")
    message = str(caught.value)
    assert "pack_bad_access" in message  # the package, in the path and spelled out
    assert "device pack pack_bad_access" in message
    assert re.search(r"bad\.yaml:9: points\.active_power\.access: must be r, w or rw", message)


def test_every_problem_of_every_file_is_reported(make_pack: MakePack) -> None:
    make_pack(
        "pack_many",
        {
            "a.yaml": "name: x\nvendor: Acme\nmodel: M\nversion: 1.0\nprotocol: modbus\n"
            "points:\n  p: {address: -1, scale: 0, field: power}\n",
            "b.yaml": "name: y\nvendr: Acme\n",
            "c.yaml": "points: [\n",
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_profiles("pack_many")
    found = {(Path(i.path).name, i.field) for i in caught.value.issues}
    assert {
        ("a.yaml", "version"),  # a float: must be quoted
        ("a.yaml", "points.p.address"),
        ("a.yaml", "points.p.scale"),
        ("a.yaml", "points.p.field"),
        ("b.yaml", "vendr"),
        ("b.yaml", "vendor"),
        ("c.yaml", None),
    } <= found
    text = str(caught.value)
    assert "did you mean 'vendor'?" in text
    assert "quote the value" in text
    assert "invalid YAML" in text


def test_a_misspelt_point_key_is_an_error_not_a_protocol_setting(make_pack: MakePack) -> None:
    make_pack(
        "pack_typo",
        {"t.yaml": profile_yaml(points="p: {address: 1, acess: rw, register: holding}")},
    )
    with pytest.raises(ConfigError, match=r"points\.p\.acess: unknown key 'acess' \(did you mean"):
        load_profiles("pack_typo")


def test_same_profile_twice_in_one_pack_names_both_files(make_pack: MakePack) -> None:
    make_pack("pack_twice", {"one.yaml": profile_yaml(), "two.yaml": profile_yaml(version="1.0")})
    with pytest.raises(ConfigError, match=r"two\.yaml:1: name: .* also defined in .*one\.yaml"):
        load_profiles("pack_twice")


def test_a_pack_without_its_folder_says_where_profiles_go(make_pack: MakePack) -> None:
    make_pack("pack_folder", {}, folder="elsewhere")
    with pytest.raises(ConfigError, match="device pack pack_folder has no folder 'profiles'"):
        load_profiles("pack_folder")


def test_a_bad_pack_is_named_when_the_registry_loads(make_pack: MakePack) -> None:
    pack = make_pack("pack_broken", {"x.yaml": "name: x\n"})
    plugins = load_plugins(entry_points=False, extra=[("broken-pack", pack)], env=NO_ENV)
    with pytest.raises(PluginError, match=r"'broken-pack'.*der_device_profiles.*x\.yaml"):
        plugins.device_profiles.names()


# --------------------------------------------------------------------------- registry


def test_same_name_and_version_from_two_packs_names_both(make_pack: MakePack) -> None:
    one = make_pack("pack_one", {"b2.yaml": profile_yaml()})
    two = make_pack("pack_two", {"b2.yaml": profile_yaml()})
    plugins = load_plugins(
        entry_points=False, extra=[("acme-pack", one), ("copycat-pack", two)], env=NO_ENV
    )
    with pytest.raises(
        PluginError,
        match=r"duplicate device profile 'acme-b2@1\.0\.0': provided by both acme-pack "
        r"and copycat-pack",
    ):
        plugins.profile("acme-b2")


def test_equal_versions_spelt_differently_are_a_duplicate(make_pack: MakePack) -> None:
    one = make_pack("pack_eq_one", {"b2.yaml": profile_yaml(version="1.0")})
    two = make_pack("pack_eq_two", {"b2.yaml": profile_yaml(version="1.0.0")})
    plugins = load_plugins(entry_points=False, extra=[("p1", one), ("p2", two)], env=NO_ENV)
    with pytest.raises(PluginError, match=r"acme-b2@1\.0.*acme-b2@1\.0\.0.*both p1 and p2"):
        len(plugins.device_profiles)


def test_different_versions_coexist_and_the_highest_wins(make_pack: MakePack) -> None:
    old = make_pack("pack_old", {"b2.yaml": profile_yaml(version="1.9.0")})
    new = make_pack(
        "pack_new",
        {"b2.yaml": profile_yaml(version="1.10.0"), "b2rc.yaml": profile_yaml(version="2.0rc1")},
    )
    plugins = load_plugins(entry_points=False, extra=[("old", old), ("new", new)], env=NO_ENV)
    registry = plugins.device_profiles
    assert registry.versions("acme-b2") == ["1.9.0", "1.10.0", "2.0rc1"]
    assert registry.names() == ["acme-b2@1.9.0", "acme-b2@1.10.0", "acme-b2@2.0rc1"]
    assert plugins.profile("acme-b2").version == "2.0rc1"
    assert plugins.profile("acme-b2", "1.9").version == "1.9.0"
    assert registry.get("acme-b2@1.10.0").version == "1.10.0"
    assert registry.provider("acme-b2", "1.9.0") == "old"
    assert registry.provider("acme-b2@2.0rc1") == "new"
    assert "acme-b2" in registry and "acme-b2@1.9.0" in registry
    assert "acme-b2@3.0" not in registry and 3 not in registry
    # a dict by name (what the agent hands adapters) keeps the highest version
    assert {p.name: p.version for p in registry} == {"acme-b2": "2.0rc1"}
    with pytest.raises(UnknownNameError, match=r"'3\.0'; installed: 1\.10\.0, 1\.9\.0, 2\.0rc1"):
        plugins.profile("acme-b2", "3.0")
    with pytest.raises(UnknownNameError, match="unknown device profile 'acme-x'"):
        plugins.profile("acme-x")


def test_a_profile_with_an_unparseable_version_names_its_package() -> None:
    class Loose:
        @hookimpl
        def der_device_profiles(self) -> list[DeviceProfile]:
            return [DeviceProfile(name="x", vendor="v", model="m", version="latest", protocol="p")]

    plugins = load_plugins(entry_points=False, extra=[("loose-pack", Loose())], env=NO_ENV)
    with pytest.raises(PluginError, match=r"'x' from loose-pack: version 'latest' is not a"):
        plugins.device_profiles.names()


# --------------------------------------------------------------------------- docs and CLI


def test_the_documented_profile_example_is_valid() -> None:
    text = (ROOT / "docs" / "device_packs.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/device_packs.md shows a profile"
    issues = Issues("docs/device_packs.md")
    profile = parse_profile(parse_yaml(blocks[0], issues.path), issues)
    assert not issues, str(issues.items)
    assert profile is not None and profile.points


def test_der_profiles_json_lists_the_example_pack() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "der_sdk.cli", "profiles", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "DER_SDK_PLUGINS": "example-pack"},
    )
    assert done.returncode == 0, done.stderr
    rows = {(r["name"], r["version"]): r for r in json.loads(done.stdout)}
    meter = rows[("example-meter", "1.2.0")]
    assert meter == {
        "name": "example-meter",
        "version": "1.2.0",
        "vendor": "Example Power",
        "model": "EP-M340",
        "protocol": "modbus",
        "points": 7,
        "package": "der-sdk-example-pack",
    }
    assert ("example-bess-inverter", "1.0.0") in rows


def test_der_profiles_prints_a_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DER_SDK_PLUGINS", "example-pack")
    assert main(["profiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "VERSION",
        "VENDOR",
        "MODEL",
        "PROTOCOL",
        "POINTS",
        "PACKAGE",
    ]
    assert any(
        line.startswith("example-meter ") and "der-sdk-example-pack" in line for line in lines
    )


def test_agent_adapters_get_every_version_by_name_at_version_and_the_newest_by_name() -> None:
    from der_sdk_agent.adapters import profiles_for_adapters

    class TwoVersions:
        @hookimpl
        def der_device_profiles(self) -> list[DeviceProfile]:
            return [
                DeviceProfile(name="meter", vendor="v", model="m", version=v, protocol="modbus")
                for v in ("1.10.0", "1.2.0", "1.9.0")
            ]

    plugins = load_plugins(entry_points=False, extra=[("two-versions", TwoVersions())], env=NO_ENV)
    profiles = profiles_for_adapters(plugins)
    assert profiles["meter"].version == "1.10.0", "the bare name is the highest version"
    assert {k for k in profiles if k.startswith("meter@")} == {
        "meter@1.10.0",
        "meter@1.2.0",
        "meter@1.9.0",
    }
    assert profiles["meter@1.2.0"].version == "1.2.0", "an older pin is reachable"
