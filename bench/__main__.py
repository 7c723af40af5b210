"""Run der-sdk's benchmarks: ``python -m bench [NAME ...] [--quick] [--profile]``.

Each benchmark prints its figure beside the raw limit of the same stack, measured in the
same run, and the whole run is written as JSON to ``bench/results/``. A full run of every
benchmark (``python -m bench all``) also rewrites the results table in
``docs/performance.md`` and ``docs/performance.json``. ``--quick`` is the CI smoke test: a
small load of each, under two minutes, that shows every benchmark runs; its numbers mean
nothing and it never touches the docs. When several benchmarks run, each runs in a fresh
Python process of its own (``--one-process`` for the old way), so what one leaves behind
does not weigh on the next.

Benchmarks: ingest-pg, ingest-sqlite, the ingest scaling curve with memory per loaded
stream and GC pauses (scaling-sqlite, scaling-pg), dispatch, memory, storm, rest, mtls, and
the replicas of a cluster on NATS and PostgreSQL: cluster-ingest, cluster-dispatch,
cluster-failover; the console: console-fleet, console-sse (``all``: every one).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, Context, Figure

BENCHMARKS: dict[str, str] = {
    "ingest-pg": "bench.ingest:run_pg",
    "ingest-sqlite": "bench.ingest:run_sqlite",
    "decode": "bench.decode:run",
    "scaling-sqlite": "bench.scaling:run_sqlite",
    "scaling-pg": "bench.scaling:run_pg",
    "dispatch": "bench.dispatch:run",
    "memory": "bench.fleet:run_memory",
    "storm": "bench.fleet:run_storm",
    "rest": "bench.rest:run",
    "mtls": "bench.mtls:run",
    "cluster-ingest": "bench.cluster:run_ingest",
    "cluster-dispatch": "bench.cluster:run_dispatch",
    "cluster-failover": "bench.cluster:run_failover",
    "console-fleet": "bench.console:run_fleet",
    "console-sse": "bench.console:run_sse",
    "modbus-poll": "bench.modbus_poll:run",
    "export-pg": "bench.export:run",
}
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
DOC_JSON = ROOT / "docs" / "performance.json"
TABLE_START = "<!-- bench:results:start -->"
TABLE_END = "<!-- bench:results:end -->"
# The installed plugins no benchmark uses. ``--quick`` leaves them out of every process it
# starts (headends, agents, load generators inherit the environment): importing them costs
# each process about 2 s of CPU, more than most quick benchmarks' own load. Full runs load
# every plugin, as ``der headend`` does in production.
QUICK_DISABLED_PLUGINS = "opcua,ieee2030-5,openadr"


def _load(name: str) -> Callable[[Context], Awaitable[list[Figure]]]:
    module, _, func = BENCHMARKS[name].partition(":")
    result: Callable[[Context], Awaitable[list[Figure]]] = getattr(
        importlib.import_module(module), func
    )
    return result


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(figures: list[dict[str, Any]]) -> str:
    rows = [
        "| figure | measured | goal | raw limit, same run | ratio | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        raw = f"{_fmt(f['raw'])} {f['unit']} ({f['raw_label']})" if f["raw"] is not None else "—"
        met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
        ratio = f"{f['ratio']:.2f}" if f["ratio"] is not None else "—"
        rows.append(
            f"| {f['name']} | {_fmt(f['value'])} {f['unit']} | {f['goal']} | {raw} | {ratio} "
            f"| {met} |"
        )
    return "\n".join(rows)


def update_docs(report: dict[str, Any]) -> None:
    when = report["when"]
    machine = report["machine"]
    block = (
        f"{TABLE_START}\n"
        f"Run of {when} on {machine['cpus']} CPUs, Python {machine['python']} "
        f"(`python -m bench all`; full data in `docs/performance.json`).\n\n"
        f"{table(report['figures'])}\n"
        f"{TABLE_END}"
    )
    text = DOC.read_text()
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no {TABLE_START} ... {TABLE_END} block to update")
    DOC.write_text(pattern.sub(lambda _: block, text))
    DOC_JSON.write_text(json.dumps(report, indent=2) + "\n")


async def run(names: list[str], ctx: Context) -> dict[str, Any]:
    figures: list[dict[str, Any]] = []
    ran: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            result = await _load(name)(ctx)
        except Exception as exc:  # one failing benchmark must not hide the others
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            ran[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            continue
        seconds = round(time.perf_counter() - started, 1)
        ran[name] = {
            "ok": bool(result),
            "seconds": seconds,
            "skipped": not result,
            "pid": os.getpid(),
        }
        for figure in result:
            figures.append({"benchmark": name, **figure.as_dict()})
            ratio = f", ratio {figure.ratio:.2f}" if figure.ratio is not None else ""
            raw = f" (raw {_fmt(figure.raw)})" if figure.raw is not None else ""
            met = {True: "met", False: "NOT met", None: "info"}[figure.met]
            print(
                f"  {figure.name}: {_fmt(figure.value)} {figure.unit}{raw}{ratio} "
                f"[{figure.goal}: {met}]",
                flush=True,
            )
    from bench import profiling

    return {
        **_stamp(ctx.quick),
        "benchmarks": ran,
        "figures": figures,
        "profiles": profiling.PROFILES,
    }


def in_children(names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run each benchmark in a fresh ``python -m bench NAME`` process, one after the
    other, and merge their reports.

    One process for all of them let each benchmark's leftovers weigh on the next: gRPC
    threads of clients and servers that had ended, a heap grown by the decode and scaling
    benchmarks (what the collector scans), memory not given back. The dispatch benchmark
    holds its 1,000-stream fleet in the benchmark process, so its tail measured what the
    earlier benchmarks left there too (212 ms p99 in a full run against 44 to 110 ms for
    ``bench dispatch`` alone, the same day).
    """
    merged: dict[str, Any] = {"benchmarks": {}, "figures": [], "profiles": {}}
    with tempfile.TemporaryDirectory(prefix="der-bench-reports-") as tmp:
        for name in names:
            report_path = Path(tmp) / f"{name}.json"
            command = [sys.executable, "-m", "bench", name, "--no-docs"]
            command += ["--results", str(args.results), "--report", str(report_path)]
            command += ["--quick"] * args.quick + ["--profile"] * args.profile
            code = subprocess.run(command, check=False).returncode
            if not report_path.exists():
                print(f"  FAILED: the benchmark's process ended with status {code}", flush=True)
                error = f"its process ended with status {code} and no report"
                merged["benchmarks"][name] = {"ok": False, "error": error}
                continue
            child = json.loads(report_path.read_text())
            merged["benchmarks"].update(child["benchmarks"])
            merged["figures"] += child["figures"]
            merged["profiles"].update(child["profiles"])
    return {**_stamp(args.quick), **merged}


def _stamp(quick: bool) -> dict[str, Any]:
    """When and where a run was made: the head of its report."""
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def in_this_process(names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run ``names`` one after the other on one event loop of this process."""
    with tempfile.TemporaryDirectory(prefix="der-bench-") as tmp:
        ctx = Context(
            quick=args.quick,
            workdir=Path(tmp),
            profile=args.profile,
            profiles_dir=args.results / "profiles",
        )
        try:
            import uvloop

            return uvloop.run(run(names, ctx))
        except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
            return asyncio.run(run(names, ctx))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=["all"], help="benchmarks, or all")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny loads")
    parser.add_argument("--profile", action="store_true", help="py-spy profiles of the headend")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    parser.add_argument(
        "--report", type=Path, help="write the run's JSON here (default: a new file in RESULTS)"
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run several benchmarks in this process (default: each in a fresh one)",
    )
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if "all" in args.names else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; one of {', '.join(BENCHMARKS)}")
    _raise_fd_limit()
    if args.quick and "DER_SDK_DISABLE_PLUGINS" not in os.environ:
        os.environ["DER_SDK_DISABLE_PLUGINS"] = QUICK_DISABLED_PLUGINS
    if len(names) > 1 and not args.one_process:
        report = in_children(names, args)
    else:
        report = in_this_process(names, args)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.report or args.results / f"bench-{'quick-' if args.quick else ''}{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    if not args.quick and not args.no_docs and set(names) == set(BENCHMARKS):
        update_docs(report)
        print(f"updated {DOC.relative_to(ROOT)}")
    failed = [n for n, r in report["benchmarks"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
