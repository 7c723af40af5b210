"""Several headend replicas on NATS JetStream and PostgreSQL (issue 17, ``docs/cluster.md``).

Every replica is an ordinary ``der headend`` in its own process (``HEADEND_BUS_URL`` of
the local NATS, a bus namespace of this run's own, deleted afterwards; one fresh
PostgreSQL database shared by the replicas; ``HEADEND_AUTH=off``). Each figure stands
beside a reference measured in the same run, on the same machine:

**cluster-ingest** (:func:`run_ingest`): stored telemetry ingest into PostgreSQL, the
same load generator and fleet as ``ingest-pg`` (1,000 agents x 5 assets, batches of 100
samples, 8 unacknowledged per agent, flat out) in three set-ups one after another: today's
direct mode (one headend, no bus: the reference), the bus with one replica, the bus with
two (the agents split between them). In bus mode a replica acknowledges a batch once
JetStream has it, and writers store it later, so the figure is **stored** samples/s: the
rows in the ``telemetry`` table (``count(*)``) divided by the seconds from the first batch
sent to the last sample stored. The agents send flat out for 16.5 s (2.8 s in ``--quick``)
and then stop; in bus mode they outrun the writers and the backlog waits in JetStream
until the writers have stored it (``drain_s``), so the span counts both. Beside it, the
CPU per stored sample over the same span: the CPU time of the replica processes plus
nats-server's (read from ``/proc``) divided by the samples stored; PostgreSQL's share, and
a window of the flat-out phase alone (acknowledged and stored rates: the writers slowed by
the publishing), are in the details. The run checks that no acknowledged sample is
missing from the table (``missing``).

**cluster-dispatch** (:func:`run_dispatch`): ``POST /dispatch`` → the agent's applied
acknowledgement, timed as ``dispatch`` times it (:mod:`bench.dispatch`), with two
replicas A and B and every dispatch agent (1,000 x 1 asset) on B. Dispatches go one at
a time, alternately to A (the agent is on another replica: the figure) and to B (the same
replica: the reference), idle and then under ingest load: a second process sends
telemetry to both replicas at half the stored-ingest maximum, measured flat out just
before on the same replicas.

**cluster-failover** (:func:`run_failover`): 1,000 agents x 1 asset, each given the
addresses of three replicas (``HEADEND_GRPC=a,b,c``); each starts at a random one and
moves on as ``der_sdk_agent`` does (:class:`der_sdk_agent.headends.HeadendRotation`: the
next address after 1 s ± 20 %, then the backoff). Once all are registered, one replica
gets ``kill -9``; the figure is the seconds from the kill until the last of its agents
has a RegisterAck from another replica. The reference: the same fleet, rotation and kill
against three raw gRPC servers that only answer Register (:mod:`bench.raw` ``idle``), which
is what the agents' backoff and gRPC's reconnect cost without a headend.

The machine's PostgreSQL and NATS server are shared: their CPU counts whatever else uses
them during the window. Skipped (no figure) when either is not reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from bench.common import (
    Context,
    CpuMeter,
    Figure,
    RawServer,
    drop_database,
    fresh_database,
    http_get,
    metrics,
    percentile,
    pids_named,
    postgres_url,
    summary_ms,
)
from bench.dispatch import (
    ACK_TIMEOUT_S,
    GAP_S,
    HttpClient,
    _kill,
    _Outcomes,
    _round,
    _start_loadgen,
    _wait_or_kill,
)
from bench.loadgen import AgentSpec, Fleet, FleetAgent, FleetSpec, make_fleet
from der_sdk.backoff import Backoff
from der_sdk.testing.faults import HeadendProcess
from der_sdk_agent.headends import HeadendRotation

__all__ = ["run_dispatch", "run_failover", "run_ingest"]

DATABASE = "der_bench_cluster"
NO_GOAL = "— (issue 17 asks for the figure, sets no goal)"
FAILOVER_PRESENCE_MAX_AGE_S = 5.0
"""``HEADEND_BUS_PRESENCE_MAX_AGE_S`` of the failover run: the dead replica's presence
entries expire this long after its last refresh."""
CONVERGE_WAIT_S = 6 * FAILOVER_PRESENCE_MAX_AGE_S
"""How long after the last agent moved the run waits for every survivor's view
(``GET /agents``) to show each agent on a live replica."""
FAILED_STATES = frozenset({"rejected", "failed", "superseded", "expired"})
MAX_TIMEOUTS_IN_A_ROW = 3
"""Dispatches in a row without an outcome before the run gives up (delivery is broken;
waiting ``ACK_TIMEOUT_S`` for each of hundreds would only hide that)."""


# ----------------------------------------------------------------------------- services


def bus_url() -> str | None:
    """The NATS server of the run (``DER_SDK_BENCH_NATS``, default the local one), or
    ``None`` when nothing listens there."""
    url = os.environ.get("DER_SDK_BENCH_NATS") or "nats://127.0.0.1:4222"
    host, _, port = url.removeprefix("nats://").split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 4222)), timeout=1):
            return url
    except OSError:
        return None


def _services(ctx: Context) -> tuple[str, str] | None:
    admin, nats = postgres_url(), bus_url()
    if admin is None or nats is None:
        missing = " and ".join(
            n for n, u in (("PostgreSQL", admin), ("NATS (JetStream)", nats)) if u is None
        )
        ctx.say(f"{missing} not reachable; skipped")
        return None
    return admin, nats


async def destroy_namespace(url: str, namespace: str) -> None:
    """Delete the bus namespace's stream and presence table from the server."""
    from der_sdk import load_plugins
    from der_sdk.bus import BusOptions, open_bus

    bus = open_bus(url, load_plugins(), BusOptions(namespace=namespace))
    await bus.connect()
    try:
        await bus.destroy()
    finally:
        await bus.close()


@dataclass
class Replicas:
    """Headend processes sharing one database and, in bus mode, one bus namespace."""

    processes: list[HeadendProcess]
    namespace: str | None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None and p.running]

    @property
    def grpc_addrs(self) -> list[str]:
        return [p.grpc_addr for p in self.processes]


@contextlib.asynccontextmanager
async def replicas(
    ctx: Context,
    name: str,
    inventory: Path,
    database_url: str,
    count: int,
    bus: str | None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Replicas]:
    """``count`` ``der headend`` processes (WARNING logs), each answering ``/healthz`` 200
    before the next starts; with ``bus`` (a NATS URL) replicas of a cluster in a namespace
    of their own, deleted on exit. Without it ``count`` must be 1: today's direct mode."""
    if bus is None and count != 1:
        raise ValueError("direct mode (no bus) runs exactly one headend")
    namespace = f"bench-{secrets.token_hex(4)}" if bus is not None else None
    passed = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("INGEST_", "HEADEND_BUS_"))
        and k not in ("HEADEND_BUS_URL", "HEADEND_BUS_NAMESPACE")
    }
    group = Replicas([], namespace)
    try:
        for i in range(count):
            settings = {
                "MAX_AGENT_STREAMS": "20000",
                "HEADEND_AUTH": "off",
                "HEADEND_ID": f"{name}-{i}",
                **passed,
                **(env or {}),
            }
            if bus is not None and namespace is not None:
                settings |= {"HEADEND_BUS_URL": bus, "HEADEND_BUS_NAMESPACE": namespace}
            else:
                settings["HEADEND_BUS_URL"] = ""
            process = HeadendProcess(
                inventory,
                database_url,
                ctx.scratch(f"{name}-{i}"),
                env=settings,
                name=f"{name}-{i}",
                log_level="WARNING",
            )
            group.processes.append(process)
            await process.start(timeout_s=60)
            status: int | None = None
            for _ in range(600):
                status = await process.healthz()
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(
                    f"{process.name}: /healthz answered {status} for 60 s\n{process.log_tail()}"
                )
        yield group
    finally:
        for process in group.processes:
            if process.pid is not None:
                with contextlib.suppress(Exception):
                    await process.terminate(timeout_s=20)
        if bus is not None and namespace is not None:
            with contextlib.suppress(Exception):
                await destroy_namespace(bus, namespace)


async def stored_rows(database_url: str) -> int:
    """The rows in ``telemetry`` now. One connection for every count of a run (a new
    backend per count would churn PostgreSQL's processes while its CPU is measured)."""
    conn = _COUNTERS.get(database_url)
    if conn is None or conn.is_closed():
        conn = _COUNTERS[database_url] = await asyncpg.connect(database_url)
    return int(await conn.fetchval("SELECT count(*) FROM telemetry"))


_COUNTERS: dict[str, Any] = {}


async def _close_counters() -> None:
    while _COUNTERS:
        _, conn = _COUNTERS.popitem()
        with contextlib.suppress(Exception):
            await conn.close()


STORED_COUNTERS = ("der_ingest_samples_stored_total", "der_bus_writer_samples_stored_total")
"""What the replicas count as stored: the direct writer's and the bus stream writers'."""


async def _stored_counters(urls: Sequence[str]) -> dict[str, float]:
    """Each of :data:`STORED_COUNTERS` summed over the replicas (a cross-check of the
    rows)."""
    totals = dict.fromkeys(STORED_COUNTERS, 0.0)
    for url in urls:
        with contextlib.suppress(Exception):
            values = await metrics(url)
            for name in STORED_COUNTERS:
                totals[name] += values.get(name, 0.0)
    return totals


BUS_METRICS = (
    "der_bus_stream_messages",
    "der_bus_stream_bytes",
    "der_bus_writers",
    "der_bus_writers_stalled",
    "der_bus_writer_messages_acked_total",
    "der_bus_writer_store_failures_total",
)


async def _bus_metrics(urls: Sequence[str]) -> dict[str, list[float]]:
    """:data:`BUS_METRICS` of each replica (-1: it did not answer)."""
    values: dict[str, list[float]] = {name: [] for name in BUS_METRICS}
    for url in urls:
        try:
            got = await metrics(url)
        except Exception:
            got = {}
        for name in BUS_METRICS:
            values[name].append(got.get(name, -1.0))
    return values


async def wait_stored(database_url: str, expected: int, timeout_s: float) -> tuple[int, float]:
    """Wait until ``expected`` rows are stored, or the count stopped moving for 10 s, or
    ``timeout_s``; the rows and the seconds waited."""
    started = time.perf_counter()
    last, still_since = -1, started
    while True:
        rows = await stored_rows(database_url)
        now = time.perf_counter()
        if rows >= expected or now - started >= timeout_s:
            return rows, now - started
        if rows != last:
            last, still_since = rows, now
        elif now - still_since >= 10.0:
            return rows, now - started
        await asyncio.sleep(0.2)


# ----------------------------------------------------------------------------- ingest


async def _ingest_once(
    ctx: Context,
    label: str,
    spec: FleetSpec,
    inventory: Path,
    admin: str,
    bus: str | None,
    count: int,
    warmup_s: float,
    seconds: float,
) -> dict[str, Any]:
    await _close_counters()  # of the database dropped now
    url = await fresh_database(admin, DATABASE)
    async with replicas(ctx, f"cluster-ingest-{label}", inventory, url, count, bus) as group:
        fleet = Fleet(spec, ",".join(group.grpc_addrs), ticks_per_batch=20, window=8)
        try:
            connect_s = await fleet.connect(timeout_s=120, concurrency=200)
            http = [p.http_url for p in group.processes]
            pids: dict[str, int | list[int]] = {
                "replicas": group.pids,
                "nats": pids_named("nats-server"),
                "postgres": pids_named("postgres"),
                "loadgen": os.getpid(),
            }
            whole, window = CpuMeter(pids), CpuMeter(pids)
            rows_start = await stored_rows(url)
            whole.start()
            t_start = time.perf_counter()
            drive = asyncio.create_task(fleet.drive(warmup_s + seconds + 1.0))
            await asyncio.sleep(warmup_s)
            counters0 = await _stored_counters(http)
            acked0 = fleet.samples_acked
            window.start()
            t0 = time.perf_counter()
            rows0 = await stored_rows(url)
            await asyncio.sleep(seconds)
            t1 = time.perf_counter()
            rows1 = await stored_rows(url)
            acked1 = fleet.samples_acked
            cpu_window = window.stop()
            counters1 = await _stored_counters(http)
            await drive
            all_acked = await fleet.wait_acked(60)
            acked = fleet.samples_acked
            rows, drain_s = await wait_stored(url, acked, 30 if ctx.quick else 180)
            t_end = time.perf_counter()
            cpu = whole.stop()
            # what the replicas say of the bus when samples are missing
            bus_state = await _bus_metrics(http) if rows < acked else {}
        finally:
            await fleet.close()
    # The whole run, first batch sent to last sample stored: in bus mode the agents
    # outrun the writers while they send flat out (the backlog waits in JetStream), so a
    # window of the flat-out phase alone shows the writers slowed by the publishing.
    total_s = t_end - t_start
    stored = rows - rows_start
    stored_rate = stored / total_s
    server_cores = cpu["replicas_cores"] + (cpu["nats_cores"] if bus else 0.0)
    elapsed = t1 - t0
    window_rate = (rows1 - rows0) / elapsed
    result: dict[str, Any] = {
        "replicas": count,
        "bus": bus is not None,
        "stored_samples_per_s": stored_rate,
        "cpu_us_per_stored_sample": server_cores * total_s / stored * 1e6 if stored else None,
        "postgres_cpu_us_per_stored_sample": cpu["postgres_cores"] * total_s / stored * 1e6
        if stored
        else None,
        "seconds_first_sent_to_last_stored": round(total_s, 2),
        "drain_s": round(drain_s, 1),
        "samples_acked": acked,
        "all_acked": all_acked,
        "rows_stored": rows,
        "missing": max(0, acked - rows),
        **cpu,
        "connect_s": round(connect_s, 2),
        "flat_out_window": {
            "seconds": round(elapsed, 2),
            "stored_samples_per_s": round(window_rate),
            "acked_samples_per_s": round((acked1 - acked0) / elapsed),
            "counters_per_s": {
                name: round((counters1[name] - counters0[name]) / elapsed)
                for name in STORED_COUNTERS
            },
            **cpu_window,
        },
    }
    per = result["cpu_us_per_stored_sample"]
    ctx.say(
        f"{label}: {stored:,} samples stored in {total_s:.1f} s (drain {drain_s:.1f} s): "
        f"{stored_rate:,.0f}/s, {per if per is None else round(per, 1)} µs CPU per stored "
        f"sample (replicas {cpu['replicas_cores']} + nats {cpu['nats_cores']} cores, "
        f"postgres {cpu['postgres_cores']}); flat out: acknowledged "
        f"{result['flat_out_window']['acked_samples_per_s']:,}/s, stored {window_rate:,.0f}/s; "
        f"{result['missing']} missing"
    )
    if result["missing"]:
        raise RuntimeError(
            f"{label}: {result['missing']} acknowledged samples not stored "
            f"after {drain_s:.0f} s; the replicas' bus metrics then: {bus_state}"
        )
    return result


async def run_ingest(ctx: Context) -> list[Figure]:
    services = _services(ctx)
    if services is None:
        return []
    admin, bus = services
    if ctx.quick:
        spec, warmup_s, seconds = make_fleet(20, 5), 0.3, 1.0
    else:
        spec, warmup_s, seconds = make_fleet(1000, 5), 3.0, 12.0
    ctx.say(
        f"{len(spec.agents)} agents x 5 assets, batches of 100 samples, window 8, flat out: "
        "direct mode, bus with 1 replica, bus with 2"
    )
    inventory, _ = spec.write(ctx.scratch("cluster-ingest-fleet"))
    try:
        direct = await _ingest_once(
            ctx, "direct", spec, inventory, admin, None, 1, warmup_s, seconds
        )
        one = await _ingest_once(ctx, "bus-1", spec, inventory, admin, bus, 1, warmup_s, seconds)
        two = await _ingest_once(ctx, "bus-2", spec, inventory, admin, bus, 2, warmup_s, seconds)
    finally:
        await _close_counters()
        with contextlib.suppress(Exception):
            await drop_database(admin, DATABASE)
    common = {
        "streams": len(spec.agents),
        "assets": spec.assets,
        "seconds": seconds,
        "measure": "rows in telemetry (count(*)) / seconds from the first batch sent to the "
        "last sample stored, the agents sending flat out for the first part; CPU: replica "
        "processes + nats-server (bus modes) over the same span / samples stored",
        "direct": direct,
    }
    figures = []
    for label, result in (("1 replica", one), ("2 replicas", two)):
        value, raw = result["stored_samples_per_s"], direct["stored_samples_per_s"]
        figures.append(
            Figure(
                name=f"cluster stored ingest, bus, {label}",
                value=round(value),
                unit="samples/s",
                goal=NO_GOAL,
                met=None,
                raw=round(raw),
                raw_label="direct mode (one headend, no bus), same run",
                ratio=round(value / raw, 3) if raw else None,
                details={**common, "bus": result},
            )
        )
    for label, result in (("1 replica", one), ("2 replicas", two)):
        value, raw = result["cpu_us_per_stored_sample"], direct["cpu_us_per_stored_sample"]
        figures.append(
            Figure(
                name=f"cluster ingest CPU per stored sample, bus, {label}",
                value=round(value, 2) if value is not None else float("nan"),
                unit="µs",
                goal=NO_GOAL,
                met=None,
                raw=round(raw, 2) if raw is not None else None,
                raw_label="direct mode, headend process",
                ratio=round(value / raw, 2) if value and raw else None,
                details={
                    "measure": "CPU seconds of the replicas + nats-server / stored samples, "
                    "first batch sent to last sample stored; PostgreSQL's separately",
                    "postgres_us_per_sample": result["postgres_cpu_us_per_stored_sample"],
                    "direct_postgres_us_per_sample": direct["postgres_cpu_us_per_stored_sample"],
                },
            )
        )
    return figures


# ----------------------------------------------------------------------------- dispatch


async def _post_dispatch(client: HttpClient, asset_id: str, mw: float) -> tuple[str, float]:
    """``POST /dispatch``; its id and when the request started (``perf_counter``)."""
    body = msgspec.json.encode({"asset_id": asset_id, "mw": mw})
    start = time.perf_counter()
    status, data = await client.request("POST", "/dispatch", body)
    if status != 202:
        raise RuntimeError(f"POST /dispatch answered {status}: {data[:300]!r}")
    record = msgspec.json.decode(data)
    if record["state"] in FAILED_STATES:
        raise RuntimeError(f"dispatch ended at once: {record}")
    return str(record["dispatch_id"]), start


async def _alternating(
    other: HttpClient,
    same: HttpClient,
    outcomes: _Outcomes,
    asset_ids: Sequence[str],
    count: int,
) -> dict[str, dict[str, Any]]:
    """``count`` dispatches one after another, alternately through the replica without
    the agent (``other``) and the one with it (``same``); latencies of each."""
    paths = {"other": other, "same": same}
    result: dict[str, dict[str, Any]] = {
        k: {"latencies_s": [], "timeouts": 0, "answered_s": []} for k in paths
    }
    in_a_row = dict.fromkeys(paths, 0)
    for i in range(count):
        key = "other" if i % 2 == 0 else "same"
        dispatch_id, start = await _post_dispatch(
            paths[key], random.choice(asset_ids), 0.5 + i % 7 / 10
        )
        result[key]["answered_s"].append(time.perf_counter() - start)
        try:
            result[key]["latencies_s"].append(
                await outcomes.wait(dispatch_id, ACK_TIMEOUT_S) - start
            )
            in_a_row[key] = 0
        except TimeoutError:
            result[key]["timeouts"] += 1
            in_a_row[key] += 1
            if in_a_row[key] >= MAX_TIMEOUTS_IN_A_ROW:
                raise RuntimeError(
                    f"{in_a_row[key]} dispatches in a row through the {key} replica not "
                    f"applied within {ACK_TIMEOUT_S:g} s each; delivery is broken"
                ) from None
        await asyncio.sleep(GAP_S)
    return result


async def _rows_settled(database_url: str, timeout_s: float) -> int:
    """Wait until the stored row count stops moving (the bus backlog is written)."""
    last = -1
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        rows = await stored_rows(database_url)
        if rows == last:
            return rows
        last = rows
        await asyncio.sleep(1.0)
    return last


async def run_dispatch(ctx: Context) -> list[Figure]:
    services = _services(ctx)
    if services is None:
        return []
    admin, bus = services
    if ctx.quick:
        dispatch_spec, load_spec = make_fleet(20, 1), make_fleet(10, 5, prefix="load")
        count, warm_s, max_s = 20, 0.3, 1.0
    else:
        dispatch_spec, load_spec = make_fleet(1000, 1), make_fleet(200, 5, prefix="load")
        count, warm_s, max_s = 1000, 2.0, 6.0
    asset_ids = [a for agent in dispatch_spec.agents for a in agent.asset_ids]
    ctx.say(
        f"2 replicas; {len(dispatch_spec.agents)} dispatch streams (1 asset each) on B; "
        f"{count} dispatches one at a time, {GAP_S * 1000:g} ms apart, alternately through "
        f"A (other replica) and B (same replica); ingest load from {len(load_spec.agents)} "
        "agents x 5 assets in a second process, to both replicas"
    )
    inventory, _ = FleetSpec(dispatch_spec.agents + load_spec.agents).write(
        ctx.scratch("cluster-dispatch-fleet")
    )
    _, load_path = load_spec.write(ctx.scratch("cluster-dispatch-load-fleet"))
    logs = ctx.scratch("cluster-dispatch-loadgen")
    outcomes = _Outcomes()
    url = await fresh_database(admin, DATABASE)
    try:
        async with replicas(ctx, "cluster-dispatch", inventory, url, 2, bus) as group:
            a, b = group.processes
            both = f"{a.grpc_addr},{b.grpc_addr}"
            fleet = Fleet(dispatch_spec, b.grpc_addr, on_outcome_ack=outcomes)
            client_a = await HttpClient(a.host, a.http_port).open()
            client_b = await HttpClient(b.host, b.http_port).open()
            try:
                connect_s = await fleet.connect(timeout_s=120, concurrency=200)
                ctx.say(f"{len(fleet.agents)} streams connected to B in {connect_s:.1f} s")
                # presence of the agents on B reaches A through the bus
                await asyncio.sleep(2.0)
                await _alternating(client_a, client_b, outcomes, asset_ids, 10 if ctx.quick else 50)

                meter = CpuMeter({"replicas": group.pids, "nats": pids_named("nats-server")})
                meter.start()
                idle = await _alternating(client_a, client_b, outcomes, asset_ids, count)
                idle_cpu = meter.stop()
                idle_ms = {k: _round(summary_ms(v["latencies_s"])) for k, v in idle.items()}
                ctx.say(
                    f"idle: other replica p50 {idle_ms['other']['p50_ms']:.2f} ms, "
                    f"p99 {idle_ms['other']['p99_ms']:.2f} ms; same replica p50 "
                    f"{idle_ms['same']['p50_ms']:.2f} ms, p99 {idle_ms['same']['p99_ms']:.2f} ms"
                )

                # the stored-ingest maximum of these two replicas, flat out
                load = await _start_loadgen(
                    both, load_path, warm_s + max_s + 1.0, 0, logs / "max.log"
                )
                await asyncio.sleep(warm_s)
                t0, rows0 = time.perf_counter(), await stored_rows(url)
                await asyncio.sleep(max_s)
                t1, rows1 = time.perf_counter(), await stored_rows(url)
                await _wait_or_kill(load, 60)
                max_rate = (rows1 - rows0) / (t1 - t0)
                if max_rate <= 0:
                    raise RuntimeError(
                        "nothing was stored while the load ran flat out, so there is no "
                        "50% load to time dispatches under; the replicas' bus metrics: "
                        f"{await _bus_metrics([a.http_url, b.http_url])}"
                    )
                await _rows_settled(url, 120)
                ctx.say(f"stored ingest flat out: {max_rate:,.0f} samples/s")

                rate = max_rate / 2
                load = await _start_loadgen(both, load_path, 3600, rate, logs / "half.log")
                try:
                    await asyncio.sleep(warm_s)
                    meter = CpuMeter(
                        {
                            "replicas": group.pids,
                            "nats": pids_named("nats-server"),
                            "loadgen": load.pid,
                        }
                    )
                    meter.start()
                    t0, rows0 = time.perf_counter(), await stored_rows(url)
                    loaded = await _alternating(client_a, client_b, outcomes, asset_ids, count)
                    t1, rows1 = time.perf_counter(), await stored_rows(url)
                    loaded_cpu = meter.stop()
                finally:
                    await _kill(load)
                achieved = (rows1 - rows0) / (t1 - t0)
                loaded_ms = {k: _round(summary_ms(v["latencies_s"])) for k, v in loaded.items()}
                ctx.say(
                    f"at {achieved:,.0f} samples/s stored: other replica p50 "
                    f"{loaded_ms['other']['p50_ms']:.2f} ms, p99 "
                    f"{loaded_ms['other']['p99_ms']:.2f} ms; same replica p50 "
                    f"{loaded_ms['same']['p50_ms']:.2f} ms, p99 "
                    f"{loaded_ms['same']['p99_ms']:.2f} ms"
                )
            finally:
                await client_a.close()
                await client_b.close()
                await fleet.close()
    finally:
        await _close_counters()
        with contextlib.suppress(Exception):
            await drop_database(admin, DATABASE)

    common = {
        "replicas": 2,
        "streams": len(dispatch_spec.agents),
        "dispatches_per_path": count // 2,
        "gap_ms": GAP_S * 1000,
        "storage": "postgresql (shared)",
        "measure": "POST /dispatch on A (agent on B) or on B → the SetpointOutcomeAck at the "
        "agent; the two paths alternate",
        "connect_s": round(connect_s, 2),
        "ratio_note": "ratio = other replica / same replica, of latencies: lower is better",
    }
    figures = []
    for phase, ms, runs, cpu, extra in (
        ("idle", idle_ms, idle, idle_cpu, {}),
        (
            "at 50% ingest load",
            loaded_ms,
            loaded,
            loaded_cpu,
            {
                "ingest_max_samples_per_s": round(max_rate),
                "ingest_target_samples_per_s": round(rate),
                "ingest_stored_samples_per_s": round(achieved),
            },
        ),
    ):
        for pct in ("p50", "p99"):
            value, raw = ms["other"][f"{pct}_ms"], ms["same"][f"{pct}_ms"]
            figures.append(
                Figure(
                    name=f"cluster dispatch, agent on another replica, {phase} ({pct})",
                    value=round(value, 3),
                    unit="ms",
                    goal=NO_GOAL,
                    met=None,
                    raw=round(raw, 3),
                    raw_label=f"agent on the same replica, same run, {pct}",
                    ratio=round(value / raw, 2) if raw else None,
                    details={
                        **common,
                        "other_replica": ms["other"],
                        "same_replica": ms["same"],
                        "post_answered_other": _round(summary_ms(runs["other"]["answered_s"])),
                        "post_answered_same": _round(summary_ms(runs["same"]["answered_s"])),
                        "timeouts_other": runs["other"]["timeouts"],
                        "timeouts_same": runs["same"]["timeouts"],
                        **extra,
                        **cpu,
                    },
                )
            )
    return figures


# ----------------------------------------------------------------------------- failover


@dataclass
class RotatingAgent:
    """A fleet agent that moves between headends as ``der_sdk_agent`` does: its own
    shuffled order of the addresses, the next one after 1 s ± 20 % when its stream fails,
    the backoff once a whole round failed. Idle once registered (no telemetry)."""

    spec: AgentSpec
    addresses: Sequence[str]
    rng: random.Random
    errors: Counter[str]
    registrations: list[tuple[float, str]] = field(default_factory=list)
    """(``perf_counter`` of the RegisterAck, address) of every registration."""
    attempts: int = 0
    first: asyncio.Event = field(default_factory=asyncio.Event)
    _agent: FleetAgent | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str | None:
        """Where it is registered now."""
        if self._agent is None or self._agent.closed.is_set() or not self.registrations:
            return None
        return self.registrations[-1][1]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"rotating-{self.spec.agent_id}")

    async def _run(self) -> None:
        rotation = HeadendRotation(self.addresses, Backoff(1.0, 120.0, self.rng))
        while True:
            address = rotation.current
            self.attempts += 1
            agent = FleetAgent(self.spec, address, ticks_per_batch=1, window=1)
            self._agent = agent
            agent.start()
            await agent.registered.wait()
            at = agent.stats.registered_at
            if at is not None and agent.stats.error is None:
                rotation.registered()
                self.registrations.append((at, address))
                self.first.set()
                await agent.closed.wait()
            self.errors[(agent.stats.error or "stream ended").split(":", 1)[0][:60]] += 1
            with contextlib.suppress(Exception):
                await agent.close()
            await asyncio.sleep(rotation.failed())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._agent is not None:
            with contextlib.suppress(Exception):
                await self._agent.close()


async def _agents_connected(url: str) -> float:
    """``der_agents_connected`` of one replica's ``/metrics``; -1 when it does not answer."""
    try:
        return (await metrics(url)).get("der_agents_connected", -1.0)
    except Exception:
        return -1.0


@dataclass
class Survivors:
    """The replicas left after the kill (set by the kill) and the killed one's id."""

    urls: list[str] = field(default_factory=list)
    victim_id: str = ""

    async def _view_ok(self, url: str, agents: int) -> bool | None:
        """Whether ``GET /agents`` shows ``agents`` connected, none on the victim;
        ``None`` when its rows have no ``headend_id`` (no cluster presence)."""
        status, _, body = await http_get(f"{url}/agents", timeout_s=10)
        if status != 200:
            return False
        rows = msgspec.json.decode(body)
        if rows and "headend_id" not in rows[0]:
            return None
        on_live = [
            r for r in rows if r["connected"] and r["headend_id"] not in (None, self.victim_id)
        ]
        return len(on_live) == agents

    async def view_moved(self, t0: float, agents: int) -> float | None:
        """Seconds from ``t0`` until every survivor's ``GET /agents`` shows ``agents``
        connected to live replicas (asked once a second, after the agents moved: the
        requests read storage and must not slow the move itself); ``None`` if not within
        :data:`CONVERGE_WAIT_S`."""
        deadline = time.perf_counter() + CONVERGE_WAIT_S
        while time.perf_counter() < deadline:
            at = time.perf_counter()
            try:
                oks = [await self._view_ok(url, agents) for url in self.urls]
            except Exception:
                oks = [False]
            if None in oks:
                return None
            if all(oks):
                return at - t0
            await asyncio.sleep(1.0)
        return None


async def _failover(
    ctx: Context,
    label: str,
    spec: FleetSpec,
    addresses: list[str],
    kill: dict[str, Callable[[], Awaitable[None]]],
    settle_s: float,
    timeout_s: float,
    watch: Survivors | None = None,
) -> dict[str, Any]:
    """Connect ``spec`` rotating over ``addresses``; ``kill[address]()`` the address with
    the most agents; seconds until each of its agents registered elsewhere. With ``watch``
    (filled in by the kill), the survivors' ``der_agents_connected`` meanwhile, and the
    seconds until every survivor's ``GET /agents`` shows every agent on a live replica."""
    rng = random.Random(17)
    errors: Counter[str] = Counter()
    agents = [RotatingAgent(a, addresses, random.Random(rng.random()), errors) for a in spec.agents]
    try:
        started = time.perf_counter()
        for i in range(0, len(agents), 200):
            for agent in agents[i : i + 200]:
                agent.start()
            async with asyncio.timeout(120):
                await asyncio.gather(*(a.first.wait() for a in agents[i : i + 200]))
        connect_s = time.perf_counter() - started
        await asyncio.sleep(settle_s)
        placed = Counter(a.address for a in agents)
        if None in placed:
            raise RuntimeError(f"{label}: {placed[None]} agents lost their stream before the kill")
        victim = max(addresses, key=lambda addr: placed[addr])
        moving = [a for a in agents if a.address == victim]
        staying = [a for a in agents if a.address != victim]
        registered_before = {id(a): len(a.registrations) for a in agents}
        errors.clear()
        timeline: list[tuple[float, list[float]]] = []
        t0 = time.perf_counter()
        await kill[victim]()
        kill_s = time.perf_counter() - t0
        deadline = t0 + timeout_s
        next_watch = t0
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            if watch and now >= next_watch:
                next_watch += 0.25
                counts = [await _agents_connected(u) for u in watch.urls]
                timeline.append((round(now - t0, 2), counts))
            if all(a.address not in (None, victim) for a in moving):
                break
            await asyncio.sleep(0.05)
        view_s = await watch.view_moved(t0, len(agents)) if watch else None
        moved = [
            a.registrations[registered_before[id(a)]][0] - t0
            for a in moving
            if len(a.registrations) > registered_before[id(a)] and a.registrations[-1][1] != victim
        ]
        done = len(moved) == len(moving) and all(a.address not in (None, victim) for a in moving)
        result = {
            "agents": len(agents),
            "replicas": len(addresses),
            "placed": sorted(placed.values(), reverse=True),
            "victim_agents": len(moving),
            "moved": len(moved),
            "all_moved_s": max(moved) if done and moved else None,
            "first_moved_s": min(moved) if moved else None,
            "moved_p50_s": percentile(moved, 50),
            "moved_p90_s": percentile(moved, 90),
            "kill_s": round(kill_s, 3),
            "others_moved": sum(
                1 for a in staying if len(a.registrations) > registered_before[id(a)]
            ),
            "attempts_after_kill": sum(a.attempts for a in moving) - len(moving),
            "stream_ends_and_refusals": dict(errors),
            "connect_s": round(connect_s, 2),
            "survivors_view_s": view_s,
            "survivor_agents_connected": timeline,
        }
    finally:
        await asyncio.gather(*(a.close() for a in agents))
    last = result["all_moved_s"]
    ctx.say(
        f"{label}: {result['moved']}/{result['victim_agents']} agents of the killed one "
        f"registered elsewhere, "
        + (f"the last {last:.2f} s after the kill" if last is not None else "NOT all")
        + f" (p50 {result['moved_p50_s']:.2f} s); others moved: {result['others_moved']}"
        + (
            f"; every survivor's GET /agents shows all {len(agents)} on a live replica "
            f"after {result['survivors_view_s']:.2f} s"
            if result["survivors_view_s"] is not None
            else ""
        )
    )
    return result


async def run_failover(ctx: Context) -> list[Figure]:
    services = _services(ctx)
    if services is None:
        return []
    admin, bus = services
    agents = 30 if ctx.quick else 1000
    settle_s = 1.0 if ctx.quick else 5.0
    timeout_s = 30.0 if ctx.quick else 120.0
    spec = make_fleet(agents, 1, prefix="failover")
    ctx.say(
        f"{agents} agents x 1 asset over 3 replicas (HEADEND_GRPC=a,b,c, the agent's rotation); "
        "kill -9 of the replica with the most agents"
    )

    raws = [RawServer("idle", workdir=ctx.scratch(f"cluster-failover-raw-{i}")) for i in range(3)]
    try:
        for raw in raws:
            await raw.start()

        def kill_raw(raw: RawServer) -> Callable[[], Awaitable[None]]:
            async def kill() -> None:
                os.kill(raw.pid, signal.SIGKILL)

            return kill

        raw_result = await _failover(
            ctx,
            "raw",
            spec,
            [f"127.0.0.1:{r.port}" for r in raws],
            {f"127.0.0.1:{r.port}": kill_raw(r) for r in raws},
            settle_s,
            timeout_s,
        )
    finally:
        for raw in raws:
            await raw.stop()

    inventory, _ = spec.write(ctx.scratch("cluster-failover-fleet"))
    url = await fresh_database(admin, DATABASE)
    env = {"HEADEND_BUS_PRESENCE_MAX_AGE_S": str(FAILOVER_PRESENCE_MAX_AGE_S)}
    try:
        async with replicas(ctx, "cluster-failover", inventory, url, 3, bus, env) as group:
            by_addr = {p.grpc_addr: p for p in group.processes}

            def kill_replica(process: HeadendProcess) -> Callable[[], Awaitable[None]]:
                async def kill() -> None:
                    await process.kill()
                    watch.urls = [p.http_url for p in group.processes if p.running]
                    watch.victim_id = process.name  # its HEADEND_ID

                return kill

            watch = Survivors([p.http_url for p in group.processes])
            result = await _failover(
                ctx,
                "replicas",
                spec,
                list(by_addr),
                {addr: kill_replica(p) for addr, p in by_addr.items()},
                settle_s,
                timeout_s,
                watch,
            )
    finally:
        await _close_counters()
        with contextlib.suppress(Exception):
            await drop_database(admin, DATABASE)

    value, raw = result["all_moved_s"], raw_result["all_moved_s"]
    return [
        Figure(
            name="cluster failover: agents of a killed replica registered elsewhere",
            value=round(value, 2) if value is not None else float(timeout_s),
            unit="s",
            goal=f"issue 17 (a tested rule): within 30 s; {agents:,} agents on 3 replicas",
            met=value is not None and value <= 30.0,
            raw=round(raw, 2) if raw is not None else None,
            raw_label="same kill -9 among 3 raw gRPC servers that only answer Register",
            ratio=round(value / raw, 2) if value is not None and raw else None,
            details={
                "measure": "seconds from kill -9 until the last agent of the killed replica "
                "has a RegisterAck from another one; agents rotate as der_sdk_agent does "
                "(next address after 1 s ± 20 %)",
                "presence_max_age_s": FAILOVER_PRESENCE_MAX_AGE_S,
                "replicas": result,
                "raw": raw_result,
            },
        )
    ]
