#!/usr/bin/env python
"""Modbus polling: how many devices one agent polls at 1 Hz on one core, and the CPU per poll.

The devices are simulated SunSpec battery inverters (models 1, 701, 704, 802: 17 points,
found by scan, 2 coalesced reads per poll), each on its own TCP port, served by a separate
process (``der sim modbus`` devices, so the simulator's CPU is not counted). This process
is the agent: a real :class:`~der_sdk_agent.agent.Agent` with one ``modbus`` adapter per
device, sampled every second as the agent's sampler does, on uvloop when installed.

For each fleet size the run measures, after a warm-up, this process's CPU time
(``time.process_time``: user + system, every thread) over a window of wall time, and
counts polls, failed polls and requests. It reports the CPU share of one core, the CPU per
poll, the poll rate each device achieved, and the devices one core could poll at 1 Hz
(one core divided by the CPU per device-second, extrapolated from the largest run that kept
its cadence). Results go to ``bench/results/modbus_poll-<time>.json`` (git-ignored) and a
table is printed. A benchmark, not a test: nothing here asserts a speed. ``--quick`` runs a
small fleet for a few seconds (the smoke test uses it).

    .venv/bin/python bench/bench_modbus_poll.py [--devices 50,100,200,400] [--window 10]
    .venv/bin/python bench/bench_modbus_poll.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
if __package__ in (None, ""):  # run as a script: the repository's bench package is shared
    sys.path.insert(0, str(RESULTS.parent.parent))
SUNSPEC_BESS = ("sunspec-1", "sunspec-701", "sunspec-704", "sunspec-802")
SITE = "5e5e5e5e-0000-4000-8000-000000000000"


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --------------------------------------------------------------------------- devices


async def serve(count: int) -> None:
    """The device process: ``count`` simulated devices; prints their ports as JSON."""
    from der_sdk_modbus.pack import builtin_profiles
    from der_sdk_modbus.simulator import ModbusSimServer, SimulatedDevice

    pack = {p.name: p for p in builtin_profiles()}
    servers = []
    for index in range(count):
        device = SimulatedDevice(
            [pack[name] for name in SUNSPEC_BESS], unit_id=1, rating_mw=2.0, seed=index
        )
        server = ModbusSimServer(device)
        await server.start()
        servers.append(server)
    print(json.dumps({"ports": [s.port for s in servers]}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        await server.stop()


# --------------------------------------------------------------------------- agent side


def _agent(ports: Sequence[int], poll_interval_s: float) -> Any:
    from der_sdk.agent_config import AgentConfig, AssetAdapterConfig
    from der_sdk.models import Asset
    from der_sdk.plugins import load_plugins
    from der_sdk_agent.agent import Agent

    assets = [
        Asset(
            asset_id=f"5e5e5e5e-0000-4000-8000-{index:012d}",
            site_id=SITE,
            name=f"bess-{index}",
            max_mw=2.0,
            min_mw=-2.0,
            capacity_mwh=4.0,
        )
        for index in range(len(ports))
    ]
    config = AgentConfig(
        telemetry_interval_s=1.0,
        assets={
            asset.asset_id: AssetAdapterConfig(
                adapter="modbus",
                options={
                    "host": "127.0.0.1",
                    "port": port,
                    "sunspec_scan": True,
                    "poll_interval_s": poll_interval_s,
                    "timeout_s": 1.0,
                },
            )
            for asset, port in zip(assets, ports, strict=True)
        },
    )
    return Agent(
        agent_id="bench-gateway",
        site_id=SITE,
        assets=assets,
        headend="127.0.0.1:9",  # never dialled: the bench samples, it does not stream
        config=config,
        plugins=load_plugins(),
    )


async def measure(ports: Sequence[int], warmup_s: float, window_s: float) -> dict[str, Any]:
    """Poll ``len(ports)`` devices at 1 Hz; the figures of one window after a warm-up."""
    agent = _agent(ports, poll_interval_s=1.0)
    adapters = [runtime.adapter for runtime in agent.adapters.values()]
    loop = asyncio.get_running_loop()
    samples = good = 0
    lateness: list[float] = []

    async def sampler(until: float) -> None:
        nonlocal samples, good
        next_at = loop.time()
        while next_at < until:
            lateness.append(loop.time() - next_at)
            batch = await agent.sample_once()
            samples += len(batch)
            good += sum(1 for s in batch if s.quality == "good")
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    try:
        await sampler(loop.time() + warmup_s)  # connects every adapter and scans
        from der_sdk_agent.launch import tune_gc

        tune_gc()  # as `der agent` does once started
        polls0 = sum(a.polls for a in adapters)
        failed0 = sum(a.failed_polls for a in adapters)
        requests0 = sum(a.requests for a in adapters)
        samples = good = 0
        lateness.clear()
        cpu0, wall0 = time.process_time(), loop.time()
        await sampler(loop.time() + window_s)
        cpu, wall = time.process_time() - cpu0, loop.time() - wall0
        polls = sum(a.polls for a in adapters) - polls0
        failed = sum(a.failed_polls for a in adapters) - failed0
        requests = sum(a.requests for a in adapters) - requests0
    finally:
        await agent.stop()
    from bench.modbus_poll import window_figures

    return {
        **window_figures(len(ports), wall, cpu, polls, failed),
        "requests_per_poll": round(requests / polls, 2) if polls else None,
        "good_sample_pct": round(100 * good / samples, 1) if samples else None,
        "sampler_late_ms_max": round(1000 * max(lateness, default=0.0), 1),
    }


async def bench(sizes: Sequence[int], warmup_s: float, window_s: float) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", str(max(sizes)), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(120):
            ports: list[int] = json.loads(await process.stdout.readline())["ports"]
        runs = []
        for size in sizes:
            try:
                async with asyncio.timeout(warmup_s + window_s + 60):
                    run = await measure(ports[:size], warmup_s, window_s)
            except TimeoutError:
                print(f"{size:>7} did not finish in time; stopping here", flush=True)
                break
            runs.append(run)
            _print_row(run)
            if run["cpu_pct_of_one_core"] > 90 or run["poll_hz_per_device"] < 0.95:
                break  # past what one core keeps at 1 Hz
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        await process.wait()
    kept = [r for r in runs if r["poll_hz_per_device"] >= 0.95 and r["failed_polls"] == 0]
    basis = max(kept, key=lambda r: r["devices"]) if kept else None
    estimate = None
    if basis is not None and basis["cpu_s"] > 0:
        cpu_per_device_second = basis["cpu_s"] / basis["wall_s"] / basis["devices"]
        estimate = int(1.0 / cpu_per_device_second)
    return {"runs": runs, "devices_per_core_at_1hz_estimate": estimate, "basis": basis}


HEADER = (
    f"{'devices':>7} {'cpu %':>6} {'ms/poll':>8} {'polls/s/dev':>11} {'req/poll':>8} "
    f"{'good %':>6} {'failed':>6} {'late ms':>7}"
)


def _print_row(run: dict[str, Any]) -> None:
    print(
        f"{run['devices']:>7} {run['cpu_pct_of_one_core']:>6} {run['cpu_ms_per_poll']!s:>8} "
        f"{run['poll_hz_per_device']:>11} {run['requests_per_poll']!s:>8} "
        f"{run['good_sample_pct']!s:>6} {run['failed_polls']:>6} {run['sampler_late_ms_max']:>7}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="50,100,200,400", help="fleet sizes, ascending")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured per size")
    parser.add_argument("--quick", action="store_true", help="a small, short smoke run")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the device process
    ns = parser.parse_args(argv)
    if ns.serve:
        _run(serve(ns.serve))
        return 0
    sizes = [5] if ns.quick else sorted(int(n) for n in ns.devices.split(","))
    warmup, window = (1.5, 2.0) if ns.quick else (ns.warmup, ns.window)
    print("Modbus polling at 1 Hz, SunSpec battery devices; this process = the agent")
    print(HEADER, flush=True)
    result = _run(bench(sizes, warmup, window))
    try:
        uvloop_version: str | None = metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        uvloop_version = None
    report = {
        "bench": "modbus_poll",
        "started": datetime.now(UTC).isoformat(),
        "quick": ns.quick,
        "profile": "+".join(SUNSPEC_BESS),
        "python": platform.python_version(),
        "pymodbus": metadata.version("pymodbus"),
        "uvloop": uvloop_version,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "warmup_s": warmup,
        "window_s": window,
        **result,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"modbus_poll-{stamp}{'-quick' if ns.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    estimate = result["devices_per_core_at_1hz_estimate"]
    print(f"\none core would poll about {estimate} such devices at 1 Hz" if estimate else "")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
