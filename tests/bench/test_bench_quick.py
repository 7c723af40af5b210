"""The benchmark suite's smoke test: ``python -m bench all --quick`` runs every benchmark
on a tiny load. It asserts only that each one ran and reported its figures; speed is
judged by full benchmark runs (docs/performance.md), never by a test.

The benchmarks run in two groups, each its own ``python -m bench`` and test, so each
stays within its time limit: those of one headend, and those of a cluster of replicas
(``cluster-*``: NATS and PostgreSQL; without them they report no
figure, which passes unless ``DER_SDK_REQUIRE_SERVICES=1``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _groups() -> dict[str, list[str]]:
    from bench.__main__ import BENCHMARKS

    cluster = [n for n in BENCHMARKS if n.startswith("cluster-")]
    return {"single": [n for n in BENCHMARKS if n not in cluster], "cluster": cluster}


def test_the_two_groups_cover_every_benchmark() -> None:
    from bench.__main__ import BENCHMARKS

    single, cluster = _groups()["single"], _groups()["cluster"]
    assert sorted(single + cluster) == sorted(BENCHMARKS)
    assert cluster, "the cluster benchmarks are registered"


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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("group", ["single", "cluster"])
def test_every_benchmark_runs_in_quick_mode_and_reports_its_figures(
    group: str, tmp_path: Path
) -> None:
    names = _groups()[group]
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *names, "--quick", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    (path,) = results.glob("bench-quick-*.json")
    report = json.loads(path.read_text())
    assert report["quick"] is True
    assert set(report["benchmarks"]) == set(names)
    for name, outcome in report["benchmarks"].items():
        assert "error" not in outcome, f"{name}: {outcome}"
        if _services_missing(name):
            continue
        assert outcome["ok"], f"{name} reported no figure: {output[-2000:]}"
        figures = [f for f in report["figures"] if f["benchmark"] == name]
        assert figures and all(f["value"] == f["value"] for f in figures), name  # not NaN
    # --quick never rewrites the committed results
    assert "updated docs/performance.md" not in output
