"""Stored ingest into PostgreSQL in bus mode (``HEADEND_BUS_URL``) with 1 and 2 replicas,
beside today's direct mode, in the same run.

The same fleet drives every setup flat out (each agent keeps its window of unacknowledged
batches full). In direct mode a batch is acknowledged after PostgreSQL committed it; in
bus mode once JetStream holds it, and the stream writers store it afterwards. So the
figure is the **stored** rate, read from the headends' ``/metrics``
(``der_ingest_samples_stored_total`` in direct mode, ``der_bus_writer_samples_stored_total``
summed over the replicas in bus mode), beside the acknowledged rate and the CPU per
stored sample (headends, nats-server and PostgreSQL together, in µs of one core).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from contextlib import AsyncExitStack
from typing import Any

from bench.common import (
    Context,
    CpuMeter,
    Figure,
    drop_database,
    fresh_database,
    headend,
    metrics,
    pids_named,
    postgres_url,
)
from bench.loadgen import Fleet, FleetSpec, make_fleet

__all__ = ["nats_up", "run"]

NATS_URL = os.environ.get("DER_BENCH_NATS_URL", "nats://127.0.0.1:4222")


STREAM_MAX_BYTES = 32 * 1024**2
"""The stream's byte limit in this benchmark (the default is 1 GiB)."""


def nats_up() -> bool:
    """Whether the NATS server of ``DER_BENCH_NATS_URL`` accepts connections."""
    host, _, port = NATS_URL.removeprefix("nats://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _shape(ctx: Context) -> tuple[FleetSpec, float, float]:
    if ctx.quick:
        return make_fleet(20, 5), 1.0, 2.0
    return make_fleet(500, 5), 4.0, 12.0


async def _setup(ctx: Context, spec: FleetSpec, admin: str, replicas: int) -> dict[str, Any]:
    """Run the fleet against ``replicas`` headends (0: direct mode, one headend)."""
    label = "direct" if replicas == 0 else f"bus{replicas}"
    db = f"der_bench_{label}"
    namespace = f"bench-{secrets.token_hex(4)}"
    _, warmup_s, seconds = _shape(ctx)
    url = await fresh_database(admin, db)
    inventory, _ = spec.write(ctx.scratch(f"{label}-fleet"))
    stored_metric = (
        "der_ingest_samples_stored_total"
        if replicas == 0
        else "der_bus_writer_samples_stored_total"
    )
    try:
        async with AsyncExitStack() as stack:
            processes = []
            for index in range(max(1, replicas)):
                env = {k: v for k, v in os.environ.items() if k.startswith("INGEST_")}
                if replicas:
                    env |= {
                        "HEADEND_BUS_URL": NATS_URL,
                        "HEADEND_BUS_NAMESPACE": namespace,
                        "HEADEND_ID": f"bench-{index}",
                        # a small stream: flat out, publishers outrun the writers until the
                        # stream is full; from then on both run at the stored rate
                        "HEADEND_BUS_TELEMETRY_MAX_BYTES": str(STREAM_MAX_BYTES),
                    }
                process = await stack.enter_async_context(
                    headend(ctx, f"ingest-{label}-{index}", inventory, url, env)
                )
                processes.append(process)
            parts = [
                FleetSpec(agents=spec.agents[i :: len(processes)]) for i in range(len(processes))
            ]
            fleets = [
                Fleet(part, p.grpc_addr, ticks_per_batch=20, window=8)
                for part, p in zip(parts, processes, strict=True)
            ]
            for fleet in fleets:
                stack.push_async_callback(fleet.close)
                await fleet.connect(timeout_s=120, concurrency=200)
            drive = [asyncio.create_task(f.drive(warmup_s + seconds + 1.0)) for f in fleets]
            await asyncio.sleep(warmup_s)
            pids: dict[str, int | list[int]] = {
                "headends": [p.pid for p in processes if p.pid is not None],
                "postgres": pids_named("postgres"),
                "loadgen": os.getpid(),
            }
            if replicas:
                pids["nats"] = pids_named("nats-server")
            meter = CpuMeter(pids)

            async def stored() -> float:
                return sum([(await metrics(p.http_url)).get(stored_metric, 0.0) for p in processes])

            stored0, acked0, t0 = (
                await stored(),
                sum(f.samples_acked for f in fleets),
                time.perf_counter(),
            )
            meter.start()
            await asyncio.sleep(seconds)
            stored1, acked1, t1 = (
                await stored(),
                sum(f.samples_acked for f in fleets),
                time.perf_counter(),
            )
            cpu = meter.stop()
            await asyncio.gather(*drive)
            for fleet in fleets:
                await fleet.wait_acked(30)
            if replicas:
                await _destroy(namespace)
    finally:
        with contextlib.suppress(Exception):
            await drop_database(admin, db)
    elapsed = t1 - t0
    stored_per_s = (stored1 - stored0) / elapsed
    busy = (
        cpu.get("headends_cores", 0.0) + cpu.get("postgres_cores", 0.0) + cpu.get("nats_cores", 0.0)
    )
    result = {
        "stored_per_s": round(stored_per_s),
        "acked_per_s": round((acked1 - acked0) / elapsed),
        "cpu_us_per_stored_sample": round(busy / stored_per_s * 1e6, 1) if stored_per_s else None,
        **cpu,
    }
    ctx.say(
        f"{label}: stored {result['stored_per_s']:,} samples/s, acknowledged "
        f"{result['acked_per_s']:,}/s, {result['cpu_us_per_stored_sample']} µs CPU per "
        "stored sample"
    )
    return result


async def _destroy(namespace: str) -> None:
    from der_sdk.bus import BusOptions, open_bus
    from der_sdk.plugins import load_plugins

    bus = open_bus(NATS_URL, load_plugins(), BusOptions(namespace=namespace))
    await bus.connect()
    try:
        await bus.destroy()
    finally:
        await bus.close()


async def run(ctx: Context) -> list[Figure]:
    admin = postgres_url()
    if admin is None or not nats_up():
        ctx.say("PostgreSQL or NATS (JetStream) not reachable; skipped")
        return []
    spec = _shape(ctx)[0]
    ctx.say(f"{len(spec.agents)} agents x 5 assets, batches of 100 samples, window 8")
    results = {
        label: await _setup(ctx, spec, admin, n)
        for label, n in (("direct", 0), ("bus1", 1), ("bus2", 2))
    }
    direct = results["direct"]["stored_per_s"]
    return [
        Figure(
            name=f"PostgreSQL stored ingest, bus mode, {n} replica{'s' if n > 1 else ''}",
            value=results[label]["stored_per_s"],
            unit="samples/s",
            goal="informative: beside direct mode",
            met=None,
            raw=direct,
            raw_label="direct mode (no bus), same fleet, same run",
            ratio=round(results[label]["stored_per_s"] / direct, 3) if direct else 0.0,
            details={"streams": len(spec.agents), **results},
        )
        for label, n in (("bus1", 1), ("bus2", 2))
    ]
