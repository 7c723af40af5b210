"""der-sdk finds the plugin through its entry point, in Python and from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from der_sdk import load_plugins

DISTRIBUTION = "{{ cookiecutter.__distribution }}"
NAME = "{{ cookiecutter.name }}"


def _der(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "der_sdk.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_load_plugins_lists_the_plugin() -> None:
    plugins = load_plugins()
    row = next(i for i in plugins.info() if i.package == DISTRIBUTION)
    assert row.name == NAME
{%- if cookiecutter.flavour == "adapter" %}
    assert row.hooks == ("der_adapter_types",)
    assert plugins.adapter_types.provider(NAME) == DISTRIBUTION
{%- else %}
    assert row.hooks == ("der_device_profiles",)
    profile = plugins.profile(NAME)
    assert profile.vendor == "{{ cookiecutter.vendor }}"
    assert profile.points, "the profile has points"
    assert plugins.device_profiles.provider(NAME) == DISTRIBUTION
{%- endif %}


def test_der_plugins_json_lists_the_plugin() -> None:
    rows = json.loads(_der("plugins", "--json"))
    row = next(r for r in rows if r["package"] == DISTRIBUTION)
    assert row["name"] == NAME
{%- if cookiecutter.flavour == "adapter" %}
    assert row["provides"]["adapter_types"] == [NAME]
{%- else %}


def test_der_profiles_json_lists_the_profiles() -> None:
    rows = json.loads(_der("profiles", "--json"))
    mine = [r for r in rows if r["package"] == DISTRIBUTION]
    assert [r["name"] for r in mine] == [NAME]
    assert mine[0]["protocol"] == "modbus"
{%- endif %}
