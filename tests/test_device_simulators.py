"""The der_device_simulators hook and ``der sim``: simulators register by name, clash
loudly, are listed by ``der sim --help`` and run with their own options."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from der_sdk import hookimpl, load_plugins
from der_sdk.cli import main
from der_sdk.errors import PluginError
from der_sdk.extensions import DeviceSimulatorType
from tests.conftest import FakeDist

ECHO_PLUGIN = """
from der_sdk import hookimpl
from der_sdk.extensions import DeviceSimulatorType


def add_arguments(parser):
    parser.add_argument("--times", type=int, default=1)


async def run(args):
    for _ in range(args.times):
        print("echo device answering")


@hookimpl
def der_device_simulators():
    return [DeviceSimulatorType(name="echo", description="answers and ends",
                                add_arguments=add_arguments, run=run)]
"""


def _simulator(name: str) -> SimpleNamespace:
    async def run(args: argparse.Namespace) -> None:
        return None

    return SimpleNamespace(
        der_device_simulators=hookimpl(lambda: [DeviceSimulatorType(name=name, run=run)])
    )


def test_der_device_simulators_registers_simulators_by_name() -> None:
    plugins = load_plugins(entry_points=False, extra=[("tank-sim", _simulator("tank"))], env={})
    simulator = plugins.device_simulators.get("tank")
    assert simulator.name == "tank" and plugins.device_simulators.provider("tank") == "tank-sim"
    parser = argparse.ArgumentParser()
    simulator.add_arguments(parser)  # the default adds nothing
    assert vars(parser.parse_args([])) == {}


def test_two_simulators_with_one_name_name_both_plugins() -> None:
    plugins = load_plugins(
        entry_points=False,
        extra=[("one-sim", _simulator("tank")), ("two-sim", _simulator("tank"))],
        env={},
    )
    with pytest.raises(PluginError, match=r"duplicate device simulator 'tank'.*one-sim.*two-sim"):
        plugins.device_simulators.names()


def test_der_sim_runs_an_installed_simulator_with_its_options(
    fake_dist: FakeDist, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_dist("der-sdk-echo-sim", {"echo-sim": "echo_sim_plugin"}, {"echo_sim_plugin": ECHO_PLUGIN})
    assert main(["sim", "echo", "--times", "2"]) == 0
    assert capsys.readouterr().out.count("echo device answering") == 2

    with pytest.raises(SystemExit) as exited:
        main(["sim", "--help"])
    assert exited.value.code == 0
    listing = capsys.readouterr().out
    assert "echo" in listing and "answers and ends (der-sdk-echo-sim)" in listing


def test_der_sim_names_the_installed_simulators_for_an_unknown_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sim", "no-such-sim"]) == 2
    err = capsys.readouterr().err
    assert "unknown device simulator 'no-such-sim'; installed:" in err


def test_der_sim_without_a_name_shows_what_is_installed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["sim"]) == 2
    assert "installed simulators:" in capsys.readouterr().out


def test_der_plugins_lists_device_simulators(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    assert "device simulators:" in capsys.readouterr().out
