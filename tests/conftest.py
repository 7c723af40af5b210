"""Shared fixtures for the project's own suite."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# CI replays a fixed set of examples so a run cannot turn red on a new random draw;
# local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
    settings.load_profile("ci")

FakeDist = Callable[..., Path]


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
