"""``docs/commissioning.md`` is run as written: every command on the page, in order, in an
empty folder, with the project's ``der`` on PATH. The page itself starts the headend, the
device simulator and the agent; the test only moves their fixed ports onto free ones."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from der_sdk.testing import SnippetRunner, free_port, parse_snippets

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "commissioning.md"
SETTINGS_PREFIXES = ("HEADEND_", "AGENT_", "GATEWAY_", "ASSET", "DATABASE_URL", "DER_")


def clean_env() -> dict[str, str]:
    """This process's environment without der settings, with the venv's ``der`` first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="the page uses curl and jq, which this machine does not have",
)
def test_the_commissioning_checklist_runs_from_an_empty_folder_to_a_confirmed_dispatch(
    tmp_path: Path,
) -> None:
    replace = {
        "127.0.0.1:50051": f"127.0.0.1:{free_port()}",
        "127.0.0.1:3001": f"127.0.0.1:{free_port()}",
    }
    modbus = free_port()
    replace |= {"--port 5020": f"--port {modbus}", "port: 5020": f"port: {modbus}"}
    snippets = parse_snippets(PAGE)
    with SnippetRunner(PAGE, tmp_path, env=clean_env(), replace=replace) as runner:
        runner.run(snippets)
    assert runner.skipped == []
    commands = sum(len(s.commands) or 1 for s in snippets)
    assert len(runner.ran) == commands
    assert (tmp_path / "commission-harbour.json").stat().st_size > 0
