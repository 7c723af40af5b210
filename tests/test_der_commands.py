"""The `der` command finds its subcommands through the der_commands hook: der-sdk's own from
a built-in plugin, the headend's and the agent's from their packages' entry points, and any
installed plugin's; a clash names both providers; `der plugins` says who gave which."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from der_sdk.cli import main
from der_sdk.plugins import load_plugins
from tests.conftest import FakeDist

CORE_COMMANDS = ["certs", "check-config", "export", "new-adapter", "plugins", "profiles", "sim"]
HEADEND_COMMANDS = ["demo", "headend", "tokens"]
AGENT_COMMANDS = ["agent", "commission", "launch"]

COMMAND_PLUGIN = """
from der_sdk import hookimpl
from der_sdk.extensions import CommandType


def add_arguments(parser):
    parser.add_argument("--times", type=int, default=1)


def run(args):
    for _ in range(args.times):
        print("{name} says hello")
    return 3


@hookimpl
def der_commands():
    return [CommandType(name="{name}", help="say hello", add_arguments=add_arguments, run=run)]
"""


def test_each_command_comes_from_the_package_that_needs_it() -> None:
    commands = load_plugins().commands
    by_plugin: dict[str, list[str]] = {}
    for name in commands.names():
        by_plugin.setdefault(commands.plugin(name), []).append(name)

    assert by_plugin["der_sdk.commands"] == CORE_COMMANDS
    assert by_plugin["der_sdk_headend"] == HEADEND_COMMANDS
    assert by_plugin["der_sdk_agent"] == AGENT_COMMANDS
    assert commands.provider("headend") == "der_sdk_headend (der-sdk)"


def test_der_help_lists_every_command_of_every_provider() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "der_sdk.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("    ")}
    assert {*CORE_COMMANDS, *HEADEND_COMMANDS, *AGENT_COMMANDS} <= listed


def test_der_plugins_into_a_pipe_closed_early_ends_quietly_with_sigpipes_status() -> None:
    """``der plugins | head -1``: the reader goes away; no traceback, status 141."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before der writes
    try:
        done = subprocess.run(
            [sys.executable, "-m", "der_sdk.cli", "plugins"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 128 + signal.SIGPIPE


def test_the_apps_commands_load_under_an_allow_list(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DER_SDK_PLUGINS", "sim-bess")
    with pytest.raises(SystemExit) as exited:
        main(["headend", "--help"])
    assert exited.value.code == 0
    assert "usage: der headend" in capsys.readouterr().out


def test_a_plugin_adds_a_command_that_der_runs(
    fake_dist: FakeDist, capsys: pytest.CaptureFixture[str]
) -> None:
    hello = COMMAND_PLUGIN.format(name="hello")
    fake_dist("der-sdk-hello", {"hello": "hello_plugin"}, {"hello_plugin": hello})

    assert main(["hello", "--times", "2"]) == 3
    assert capsys.readouterr().out.count("hello says hello") == 2

    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["hello"]["commands"] == ["hello"]
    assert rows["hello"]["package"] == "der-sdk-hello"
    assert rows["der_sdk_headend"]["commands"] == HEADEND_COMMANDS
    assert rows["der_sdk_agent"]["commands"] == AGENT_COMMANDS
    assert rows["der_sdk.commands"]["commands"] == CORE_COMMANDS

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "commands: hello\n" in out
    assert "headend (der_sdk_headend), hello (hello)," in out


def test_a_command_name_taken_twice_names_both_providers(
    fake_dist: FakeDist, capsys: pytest.CaptureFixture[str]
) -> None:
    takeover = COMMAND_PLUGIN.format(name="headend")
    fake_dist("der-sdk-takeover", {"takeover": "takeover_plugin"}, {"takeover_plugin": takeover})

    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert "duplicate command 'headend'" in err
    assert "der_sdk_headend (der-sdk)" in err and "takeover (der-sdk-takeover)" in err
    assert "Traceback" not in err


def test_a_broken_plugin_takes_down_only_the_commands_that_load_it(
    fake_dist: FakeDist, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_dist("der-sdk-broken", {"broken": "broken_plugin"}, {"broken_plugin": "import nope\n"})

    with pytest.raises(SystemExit) as exited:
        main(["headend", "--help"])
    assert exited.value.code == 0
    capsys.readouterr()

    assert main(["plugins"]) == 2  # it loads every plugin, and names the broken one
    err = capsys.readouterr().err
    assert "der plugins: error: plugin 'broken'" in err and "der-sdk-broken" in err

    with pytest.raises(SystemExit) as exited:
        main(["broken-command"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'broken-command'" in err
    assert "a plugin could not be loaded: plugin 'broken'" in err


async def test_get_plugins_shows_which_plugin_gave_which_command(
    der_http: httpx.AsyncClient,
) -> None:
    rows = {r["name"]: r for r in (await der_http.get("/plugins")).json()}

    assert rows["der_sdk_headend"]["commands"] == HEADEND_COMMANDS
    assert rows["der_sdk_headend"]["hooks"] == ["der_commands"]
    assert rows["der_sdk_agent"]["commands"] == AGENT_COMMANDS
    assert rows["der_sdk.commands"]["commands"] == CORE_COMMANDS
    assert rows["der_sdk.split"]["commands"] == []
