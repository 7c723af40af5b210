"""The ingest benchmark runs (``--quick``); its figures are reported, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from der_sdk_postgres.testing import require_postgres

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_postgres_ingest.py"


def test_the_ingest_benchmark_runs_quick(tmp_path: Path) -> None:
    require_postgres()

    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    (written,) = tmp_path.glob("postgres_ingest-*.json")
    report = json.loads(written.read_text())
    assert {r["method"] for r in report["summary"]} >= {"plain_copy", "raw_staging", "plugin"}
