"""The benchmark suite's smoke test: ``python -m bench NAME --quick`` runs each benchmark
on a tiny load. It asserts only that each one ran and reported its figures; speed is
judged by full benchmark runs (docs/performance.md), never by a test.

One test per benchmark of ``bench.__main__.BENCHMARKS`` (so a new benchmark is covered
without a change here, and the benchmarks spread over pytest-xdist's workers). Those that
need PostgreSQL or NATS (``*-pg``, ``cluster-*``) report no figure without them, which
passes unless ``DER_SDK_REQUIRE_SERVICES=1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]


def _services_missing(name: str) -> bool:
    """Whether ``name`` may report no figure here: a service it needs is not reachable
    and services are not required."""
    from bench.cluster import bus_url
    from bench.common import postgres_url

    if os.environ.get("DER_SDK_REQUIRE_SERVICES") == "1":
        return False
    if name in ("ingest-pg", "export-pg"):
        return postgres_url() is None
    if name.startswith("cluster-"):
        return postgres_url() is None or bus_url() is None
    return False


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_runs_in_quick_mode_and_reports_its_figures(
    name: str, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", name, "--quick", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    (path,) = results.glob("bench-quick-*.json")
    report = json.loads(path.read_text())
    assert report["quick"] is True
    assert set(report["benchmarks"]) == {name}
    outcome = report["benchmarks"][name]
    assert "error" not in outcome, f"{name}: {outcome}"
    if not _services_missing(name):
        assert outcome["ok"], f"{name} reported no figure: {output[-2000:]}"
        figures = [f for f in report["figures"] if f["benchmark"] == name]
        assert figures and all(f["value"] == f["value"] for f in figures), name  # not NaN
    # --quick never rewrites the committed results
    assert "updated docs/performance.md" not in output


@pytest.mark.timeout(180)
def test_several_benchmarks_run_each_in_a_fresh_process_and_share_one_report(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "decode", "rest", "--quick", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (path,) = results.glob("bench-quick-*.json")  # the children's reports are merged
    report = json.loads(path.read_text())
    assert list(report["benchmarks"]) == ["decode", "rest"]
    pids = {outcome["pid"] for outcome in report["benchmarks"].values()}
    assert len(pids) == 2, report["benchmarks"]
    assert {f["benchmark"] for f in report["figures"]} == {"decode", "rest"}
