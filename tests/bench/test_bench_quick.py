"""The benchmark suite's smoke test: ``python -m bench all --quick`` runs every benchmark
on a tiny load. It asserts only that each one ran and reported its figures; speed is
judged by full benchmark runs (docs/performance.md), never by a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_every_benchmark_runs_in_quick_mode_and_reports_its_figures(tmp_path: Path) -> None:
    from bench.__main__ import BENCHMARKS
    from bench.common import postgres_url

    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--results", str(results)],
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
    assert set(report["benchmarks"]) == set(BENCHMARKS)
    required = os.environ.get("DER_SDK_REQUIRE_SERVICES") == "1"
    pg_missing = postgres_url() is None and not required
    from bench.ingest_bus import nats_up

    bus_missing = (pg_missing or not nats_up()) and not required
    for name, outcome in report["benchmarks"].items():
        assert "error" not in outcome, f"{name}: {outcome}"
        if (name == "ingest-pg" and pg_missing) or (name == "ingest-bus" and bus_missing):
            continue
        assert outcome["ok"], f"{name} reported no figure: {output[-2000:]}"
        figures = [f for f in report["figures"] if f["benchmark"] == name]
        assert figures and all(f["value"] == f["value"] for f in figures), name  # not NaN
    # --quick never rewrites the committed results
    assert "updated docs/performance.md" not in output
