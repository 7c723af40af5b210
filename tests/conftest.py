"""Shared fixtures for the project's own suite."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# CI replays a fixed set of examples so a run cannot turn red on a new random draw;
# local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
    settings.load_profile("ci")

FakeDist = Callable[..., Path]

# ----------------------------------------------------------------------- parallel workers

WORKERS_VARIABLE = "DER_SDK_TEST_WORKERS"
DEFAULT_WORKERS = 3
"""Most tests wait on I/O (gRPC, subprocesses, sleeps) rather than use a core, hence one
worker more than the 2 cores of a CI machine (not yet timed against 2 and 4 workers on an
idle machine)."""

# Modules whose tests share something costly or fragile, kept on one worker each: a
# module fixture set up once (not once per worker that got one of its tests), or a
# first-use cache two workers must not fill at once.
WHOLE_MODULES = {
    # the module fixture `built` builds every sdist and wheel (about a minute)
    "tests/e2e/test_packaging.py",
    # each module starts one headend and a browser for all its tests
    "tests/console/test_console_browser.py",
    "tests/console/test_console_alarms_browser.py",
    "tests/console/test_console_mixed_browser.py",
    # each quick benchmark keeps a core or two busy: one at a time
    "tests/bench/test_bench_quick.py",
    # the first test makes the server's venv in ~/.cache (rmtree, then pip install)
    "plugins/der-sdk-ieee2030-5/tests/test_gridappsd_e2e.py",
}


def _names_only_files(config: pytest.Config) -> bool:
    """Whether every argument names a test file or a test (``path.py``, ``path.py::name``),
    not a folder: then the run is small and, often, a debugging session."""
    paths = [arg.split("::", 1)[0] for arg in config.args]
    return bool(paths) and all((config.invocation_params.dir / p).is_file() for p in paths)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Run the suite (or folders of it) in ``DER_SDK_TEST_WORKERS`` (default 3)
    pytest-xdist workers unless the command line says otherwise: ``-n N`` (``-n 0``: one
    process), ``-p no:xdist``, ``--pdb``, ``--collect-only``; test files and tests named
    one by one run in one process, unless ``-n N`` is given."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    option = config.option
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if option.numprocesses is not None or option.dist != "no" or option.tx:
        return  # the command line chose
    if option.usepdb or option.collectonly or _names_only_files(config):
        return
    workers = os.environ.get(WORKERS_VARIABLE, "").strip()
    option.numprocesses = int(workers) if workers else DEFAULT_WORKERS
    option.dist = "load"


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: absent without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist load`` (the default with ``-n``), except that each module of
    ``WHOLE_MODULES`` is one unit of work. (Not xdist_group marks: ``--dist loadgroup``
    renames the tests, which pytest 9.2 no longer lets it do.)"""
    if config.option.dist != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WholeModulesScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in WHOLE_MODULES else nodeid

    return WholeModulesScheduling(config, log)


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDist]:
    """Install a throwaway distribution on ``sys.path``: a dist-info with ``der_sdk`` entry
    points plus its modules, so entry point loading runs for real."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    created: list[str] = []

    def make(
        dist: str,
        entry_points: dict[str, str],
        modules: dict[str, str],
        version: str = "1.0",
    ) -> Path:
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[der_sdk]\n{eps}\n")
        for mod, source in modules.items():
            (root / f"{mod}.py").write_text(textwrap.dedent(source))
            created.append(mod)
        return info

    yield make
    for mod in created:
        sys.modules.pop(mod, None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long soak and fault tests (marked ``slow``) run only when asked for: with
    ``DER_SDK_SLOW=1`` or ``-m slow``. Each has a bounded version that always runs."""
    if os.environ.get("DER_SDK_SLOW", "").lower() in {"1", "true", "yes"}:
        return
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(
        reason="slow soak/fault test: run with DER_SDK_SLOW=1 or -m slow "
        "(its bounded version runs in every suite)"
    )
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
