"""Ingest as the fleet grows: stored samples/s, memory per loaded stream and the cycle
collector's pauses at 100, 1,000, 3,000 and 5,000 agent streams.

For each fleet size a fresh headend (its own database, an inventory of exactly that many
agents x 5 assets) takes the load generator of :mod:`bench.ingest` run flat out, with
its default window (8 unacknowledged batches of 100 samples per stream). At each point:

* **stored samples/s**: acknowledged samples per second over the measured window (the
  headend acknowledges a batch only after it committed), as in :mod:`bench.ingest`. The
  goal is a flat curve: at 3,000 and 5,000 streams at least 0.9 of the figure at 1,000
  *in the same run*, which is the limit each ratio is taken against.
* **RSS per loaded stream**: the headend's RSS, settled once every stream registered
  (idle), and its peak while the fleet pushes flat out (loaded); (loaded - idle) / streams.
  Goal: <= 64 KB (1 KB = 1000 bytes) at the largest fleet. The load lasts until the
  fleet's last batches are acknowledged (or 30 s after it stopped sending): the headend
  reads the batches in flight at the same rate as before, and the peak usually comes
  then, as gRPC's read buffers fill (docs/performance.md, "a fourth pass"); the details
  also give the figure at the end of the push (``push_kb_per_stream``).
  ``DER_BENCH_SCALING_SECONDS`` (12 by default) measures a longer push.
* **GC pauses**: what the headend's own monitor (:mod:`der_sdk_headend.gc_pauses`,
  ``der_gc_pause_*`` on ``/metrics``) timed for full (generation 2) collections from the
  headend's start to the end of the point: connect, warm-up and load included. Natural
  full collections are rare (CPython waits until the objects promoted since the last one
  reach a quarter of those kept), so after the load, with every stream still connected,
  the bench asks the headend for one (SIGUSR2) and it is timed the same way: the figure
  is the largest full collection (natural or asked for), with the p99 of all of them and
  the largest young (generation 0 and 1) pauses in the details. Goal: <= 50 ms at the
  largest fleet.

``--quick`` runs 5 and 20 streams for a second each: it shows the benchmark works; its
figures mean nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from typing import Any

from bench.common import (
    Context,
    Figure,
    drop_database,
    fresh_database,
    headend,
    http_get,
    postgres_url,
)
from bench.fleet import MIB, RssSampler, settled_rss
from bench.ingest import measure
from bench.loadgen import Fleet, make_fleet

__all__ = ["run_pg", "run_sqlite"]

POINTS = (100, 1000, 3000, 5000)
QUICK_POINTS = (5, 20)
REFERENCE = 1000
"""The fleet size the larger ones are compared with."""
FLAT_RATIO = 0.9
MEMORY_GOAL_KB = 64
GC_PAUSE_GOAL_MS = 50.0
ASSETS_PER_AGENT = 5
TICKS_PER_BATCH = 20  # x 5 assets = 100 samples per batch
_LABELLED = re.compile(r'^(der_gc_\w+)\{generation="(\d)"\} (\S+)$', re.M)


async def gc_pauses(http_url: str) -> dict[str, dict[str, float]]:
    """The headend's ``der_gc_*`` figures per generation (``{"2": {"max_s": ...}}``)."""
    _, _, body = await http_get(f"{http_url}/metrics")
    out: dict[str, dict[str, float]] = {}
    names = {
        "der_gc_pauses_total": "collections",
        "der_gc_pause_seconds_total": "seconds_total",
        "der_gc_pause_max_seconds": "max_s",
        "der_gc_pause_p99_seconds": "p99_s",
        "der_gc_pause_cpu_max_seconds": "cpu_max_s",
    }
    for name, generation, value in _LABELLED.findall(body.decode()):
        if name in names:
            out.setdefault(generation, {})[names[name]] = float(value)
    return out


async def _probe_full_collection(
    pid: int, http_url: str, before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Ask the headend for a full collection now (SIGUSR2), with every stream still
    connected and the load just over; its figures once it is counted."""
    count = before.get("2", {}).get("collections", 0.0)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.2)
        after = await gc_pauses(http_url)
        if after.get("2", {}).get("collections", 0.0) > count:
            return after
    raise RuntimeError("the headend ran no full collection within 30 s of SIGUSR2")


def _shape(ctx: Context) -> tuple[tuple[int, ...], float, float, dict[str, Any]]:
    """The fleet sizes, warm-up and measured seconds, and the RSS settling arguments."""
    if ctx.quick:
        return QUICK_POINTS, 0.3, 1.0, {"interval_s": 0.1, "window": 3, "min_s": 0.2}
    points = POINTS
    if os.environ.get("DER_BENCH_SCALING_POINTS"):  # while tuning: e.g. "1000,5000"
        points = tuple(int(n) for n in os.environ["DER_BENCH_SCALING_POINTS"].split(","))
    seconds = 12.0
    if os.environ.get("DER_BENCH_SCALING_SECONDS"):  # a longer push: e.g. "60"
        seconds = float(os.environ["DER_BENCH_SCALING_SECONDS"])
    return points, 4.0, seconds, {"interval_s": 0.5, "window": 6, "min_s": 2.0, "max_s": 20.0}


async def _point(
    ctx: Context, backend: str, streams: int, database_url: str, env: dict[str, str]
) -> dict[str, Any]:
    _, warmup_s, seconds, settle = _shape(ctx)
    spec = make_fleet(streams, ASSETS_PER_AGENT, prefix=f"s{streams}")
    inventory, _ = spec.write(ctx.scratch(f"scaling-{backend}-{streams}-fleet"))
    name = f"scaling-{backend}-{streams}"
    # Loading an inventory of 25,000 assets takes a minute or more on a busy 2-core machine.
    async with headend(ctx, name, inventory, database_url, env, start_timeout_s=300) as process:
        pid = process.pid
        assert pid is not None
        started = await settled_rss(pid, **settle)
        fleet = Fleet(spec, process.grpc_addr, ticks_per_batch=TICKS_PER_BATCH)
        try:
            connect_s = await fleet.connect(timeout_s=600, concurrency=200)
            idle = await settled_rss(pid, **settle)
            sampler = RssSampler(pid, interval_s=0.2)
            sampler.start(time.time())
            try:
                result = await measure(
                    ctx, fleet, warmup_s, seconds, {"server": pid}, process.http_url
                )
            finally:
                await sampler.stop()
            # The fleet sends for warm-up + measured + 1 s (bench.ingest.measure), then
            # waits up to 30 s for the acknowledgements of what it sent.
            push_s = warmup_s + seconds + 1.0
            natural = await gc_pauses(process.http_url)
            pauses = await _probe_full_collection(pid, process.http_url, natural)
        finally:
            await fleet.close()
    full = pauses.get("2", {})
    push_peak = max((rss for at, rss, _ in sampler.samples if at <= push_s), default=0)
    natural_s = natural.get("2", {}).get("seconds_total", 0.0)
    probe_ms = (full.get("seconds_total", 0.0) - natural_s) * 1000
    result.update(
        gc_natural=natural,
        gc_full_natural=int(natural.get("2", {}).get("collections", 0)),
        gc_full_probe_ms=round(probe_ms, 1),
        streams=streams,
        window=fleet.window,
        connect_s=round(connect_s, 1),
        rss_started_mib=round(started["rss"] / MIB, 1),
        rss_idle_mib=round(idle["rss"] / MIB, 1),
        rss_loaded_peak_mib=round(sampler.peak / MIB, 1),
        # When in the load (from the fleet's first push to the end of the drain) the peak
        # came, and the RSS per second: a late peak is the drain, not the steady state.
        rss_peak_at_s=round(max(sampler.samples, key=lambda s: s[1])[0], 1)
        if sampler.samples
        else 0.0,
        rss_timeline=[(second, mib) for second, mib, _ in sampler.timeline()],
        idle_kb_per_stream=round((idle["rss"] - started["rss"]) / streams / 1000, 1),
        loaded_kb_per_stream=round((sampler.peak - idle["rss"]) / streams / 1000, 1),
        # The same while the fleet was still sending: lower than the peak, because the
        # RSS of gRPC's read buffers grows as the streams' bytes first fill them, for as
        # long as the headend reads at full rate, which it still does after the fleet
        # stopped sending (docs/performance.md, "a fourth pass").
        push_kb_per_stream=round((push_peak - idle["rss"]) / streams / 1000, 1),
        push_s=push_s,
        gc=pauses,
        gc_full_collections=int(full.get("collections", 0)),
        gc_full_max_ms=round(full.get("max_s", 0.0) * 1000, 1),
        gc_full_p99_ms=round(full.get("p99_s", 0.0) * 1000, 1),
        gc_full_cpu_max_ms=round(full.get("cpu_max_s", 0.0) * 1000, 1),
    )
    ctx.say(
        f"{streams} streams: {result['samples_per_s']:,.0f} samples/s, RSS idle "
        f"{result['rss_idle_mib']} MiB, loaded peak {result['rss_loaded_peak_mib']} MiB "
        f"({result['loaded_kb_per_stream']} KB/stream above idle, peak at "
        f"{result['rss_peak_at_s']} s; {result['push_kb_per_stream']} KB by the end of the "
        f"push at {push_s:g} s), full GCs: "
        f"{result['gc_full_natural']} natural, max {result['gc_full_max_ms']} ms (one on "
        f"request {result['gc_full_probe_ms']} ms), CPU max {result['gc_full_cpu_max_ms']} ms, "
        f"headend {result.get('server_cores', 0):.2f} cores"
    )
    return result


def _at_most(
    name: str, value: float, unit: str, goal: float, what: str, details: dict[str, Any]
) -> Figure:
    """A figure whose goal is an upper bound, with no raw limit beside it."""
    text = f"<= {goal:g} {unit} {what}".rstrip()
    return Figure(name, value, unit, text, value <= goal, details=details)


def _figures(label: str, points: list[dict[str, Any]], quick: bool) -> list[Figure]:
    by_streams = {p["streams"]: p for p in points}
    reference = REFERENCE if REFERENCE in by_streams else min(by_streams)
    base = by_streams[reference]["samples_per_s"]
    largest = by_streams[max(by_streams)]
    curve = {str(p["streams"]): round(p["samples_per_s"]) for p in points}
    figures: list[Figure] = []
    for point in points:
        streams = point["streams"]
        value = point["samples_per_s"]
        larger = streams > reference
        ratio = value / base if base else 0.0
        figures.append(
            Figure(
                name=f"{label} stored ingest, {streams:,} streams",
                value=round(value),
                unit="samples/s",
                goal=f">= {FLAT_RATIO} of {reference:,} streams" if larger else "curve",
                met=(ratio >= FLAT_RATIO) if larger else None,
                raw=round(base),
                raw_label=f"same headend build at {reference:,} streams, same run",
                ratio=round(ratio, 3),
                details={"curve": curve, **point} if streams == largest["streams"] else point,
            )
        )
    streams = f"{largest['streams']:,} streams"
    figures.append(
        _at_most(
            f"{label} RSS per loaded stream, {streams}",
            largest["loaded_kb_per_stream"],
            "KB",
            MEMORY_GOAL_KB,
            "above idle",
            {
                "measure": "(peak RSS while the fleet pushes flat out, until its last "
                "batches are acknowledged or 30 s after it stopped sending - settled RSS "
                "with every stream registered, idle) / streams; KB = 1000 bytes",
                "per_point": {str(p["streams"]): p["loaded_kb_per_stream"] for p in points},
                "push_kb_per_stream": {str(p["streams"]): p["push_kb_per_stream"] for p in points},
                "idle_kb_per_stream": {str(p["streams"]): p["idle_kb_per_stream"] for p in points},
            },
        )
    )
    figures.append(
        _at_most(
            f"{label} full GC pause (max), {streams}",
            largest["gc_full_max_ms"],
            "ms",
            GC_PAUSE_GOAL_MS,
            "",
            {
                "measure": "generation-2 collections timed by the headend (gc.callbacks, "
                "der_gc_pause_* on /metrics) from its start through connect and load, and "
                "one it ran on SIGUSR2 right after the load with every stream connected",
                "natural_full_collections": largest["gc_full_natural"],
                "requested_full_collection_ms": largest["gc_full_probe_ms"],
                "young_max_ms": {
                    g: round(largest["gc"].get(g, {}).get("max_s", 0.0) * 1000, 1)
                    for g in ("0", "1")
                },
                "p99_ms": largest["gc_full_p99_ms"],
                "cpu_max_ms": largest["gc_full_cpu_max_ms"],
                "collections": largest["gc_full_collections"],
                "per_point_max_ms": {str(p["streams"]): p["gc_full_max_ms"] for p in points},
                "per_point_collections": {
                    str(p["streams"]): p["gc_full_collections"] for p in points
                },
                "quick": quick,
            },
        )
    )
    return figures


async def run_sqlite(ctx: Context) -> list[Figure]:
    points, _, seconds, _ = _shape(ctx)
    ctx.say(
        f"SQLite: {', '.join(map(str, points))} streams x {ASSETS_PER_AGENT} assets, batches "
        f"of {TICKS_PER_BATCH * ASSETS_PER_AGENT} samples, window 8, {seconds:g} s each"
    )
    env = {k: v for k, v in os.environ.items() if k.startswith("INGEST_")}
    results = []
    for streams in points:
        url = f"sqlite:///{ctx.scratch(f'scaling-sqlite-{streams}-db') / 'der.db'}"
        results.append(await _point(ctx, "sqlite", streams, url, env))
    return _figures("SQLite", results, ctx.quick)


async def run_pg(ctx: Context) -> list[Figure]:
    admin = postgres_url()
    if admin is None:
        ctx.say("PostgreSQL not reachable on 127.0.0.1:5432; skipped")
        return []
    points, _, seconds, _ = _shape(ctx)
    ctx.say(
        f"PostgreSQL: {', '.join(map(str, points))} streams x {ASSETS_PER_AGENT} assets, "
        f"batches of {TICKS_PER_BATCH * ASSETS_PER_AGENT} samples, window 8, {seconds:g} s each"
    )
    env = {k: v for k, v in os.environ.items() if k.startswith("INGEST_")}
    db = "der_bench_scaling"
    results = []
    try:
        for streams in points:
            url = await fresh_database(admin, db)
            results.append(await _point(ctx, "pg", streams, url, env))
    finally:
        with contextlib.suppress(Exception):
            await drop_database(admin, db)
    return _figures("PostgreSQL", results, ctx.quick)
