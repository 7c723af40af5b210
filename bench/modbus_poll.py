"""``modbus-poll``: CPU per device poll of the Modbus adapter and of the whole agent.

Simulated SunSpec battery inverters (models 1, 701, 704, 802: 17 points, found by scan,
2 coalesced reads a poll) are polled at 1 Hz by a measured process, three ways, each at
the same fleet sizes in the same run:

* **raw**: the limit: a bare asyncio protocol per device sending the same two reads (the
  adapter's own read plan) every second and unpacking the registers, nothing else;
* **adapter**: the ``modbus`` adapters alone, built by the plugin, each polling on its
  own and read every second (``read()``), as the agent reads them;
* **agent**: a real :class:`~der_sdk_agent.agent.Agent` with one ``modbus`` asset per
  device, its durable buffer in a file (``sync`` as configured by default) and its link
  streaming to a real ``der headend`` (SQLite), every sample stored and acknowledged.

Each runs in a child process of its own (so its CPU is only its own) after a warm-up that
connects and scans every device; the figure is that process's CPU time
(``time.process_time``, every thread) over the window divided by the polls it made. The
devices are served by another process from :class:`SimulatedDevice` register maps
through a small asyncio server (pymodbus's server, which ``der sim modbus`` uses, needs
more CPU than the agent and would limit the fleet on a 2-core machine first). The headend
is another process still. ``--profile`` attaches py-spy to the adapter and agent processes
during the window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import resource
import signal
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from der_sdk_modbus.link import split_frames

from bench import profiling
from bench.common import Context, Figure, headend
from bench.loadgen import AgentSpec, FleetSpec, make_fleet
from der_sdk_agent.launch import tune_gc

SUNSPEC_BESS = ("sunspec-1", "sunspec-701", "sunspec-704", "sunspec-802")
GOAL_MS = 0.2
MODES = ("raw", "adapter", "agent")
RAW_LABEL = "bare asyncio Modbus read of the same registers"


# --------------------------------------------------------------------------- devices


_STEP_EVERY_S = 5.0
"""How often a device's simulation is advanced (its values move): stepping is most of the
device process's work, and one process answers for every device, all polled at the same
instant; stepping at each poll, 1,000 devices made the last answers of each burst later
than the agent's 1 s timeout on a busy 2-core machine. The registers read are the same."""


class _DeviceServer(asyncio.Protocol):
    """Answers reads (functions 3 and 4) from a simulated device's registers."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.stepped = -_STEP_EVERY_S

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        frames, self.buffer = split_frames(self.buffer + data)
        for frame in frames:
            self._answer(frame)

    def _answer(self, frame: bytes) -> None:
        if len(frame) < 12:
            return  # not a read request; the bench sends none
        tid, _, _, unit, function, address, count = struct.unpack_from(">HHHBBHH", frame)
        assert self.transport is not None
        if function not in (3, 4) or address + count > 65536:
            pdu = bytes([function | 0x80, 0x01 if function not in (3, 4) else 0x02])
        else:
            now = time.monotonic()
            if now - self.stepped >= _STEP_EVERY_S:
                self.device.step()
                self.stepped = now
            table = "holding" if function == 3 else "input"
            words = self.device.registers[table][address : address + count]
            if sys.byteorder == "little":
                words.byteswap()
            pdu = bytes([function, 2 * count]) + words.tobytes()
        self.transport.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)


async def serve_devices(count: int, ports_file: Path) -> None:
    """``count`` simulated devices, one port each; their ports go to ``ports_file``."""
    from der_sdk_modbus.pack import builtin_profiles
    from der_sdk_modbus.simulator import SimulatedDevice

    pack = {p.name: p for p in builtin_profiles()}
    loop = asyncio.get_running_loop()
    servers = []
    for index in range(count):
        device = SimulatedDevice(
            [pack[name] for name in SUNSPEC_BESS], unit_id=1, rating_mw=2.0, seed=index
        )
        servers.append(
            await loop.create_server(
                functools.partial(_DeviceServer, device), "127.0.0.1", 0, backlog=1024
            )
        )
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    await asyncio.to_thread(ports_file.write_text, json.dumps(ports))
    print(json.dumps({"event": "serving", "devices": count}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


# --------------------------------------------------------------------------- pollers


def _assets(spec: AgentSpec) -> list[Any]:
    from der_sdk.models import Asset

    return [
        Asset(
            asset_id=asset_id,
            site_id=spec.site_id,
            name=f"bess-{index}",
            max_mw=2.0,
            min_mw=-2.0,
            capacity_mwh=4.0,
        )
        for index, asset_id in enumerate(spec.asset_ids)
    ]


def _config(spec: AgentSpec, ports: Sequence[int]) -> Any:
    from der_sdk.agent_config import AgentConfig, AssetAdapterConfig

    return AgentConfig(
        telemetry_interval_s=1.0,
        assets={
            asset_id: AssetAdapterConfig(
                adapter="modbus",
                options={
                    "host": "127.0.0.1",
                    "port": port,
                    "sunspec_scan": True,
                    "poll_interval_s": 1.0,
                    "timeout_s": 1.0,
                },
            )
            for asset_id, port in zip(spec.asset_ids, ports, strict=True)
        },
    )


def _modbus_adapters(spec: AgentSpec, ports: Sequence[int]) -> list[Any]:
    from der_sdk.plugins import load_plugins
    from der_sdk_agent.adapters import build_adapters

    runtimes = build_adapters(_assets(spec), _config(spec, ports), load_plugins(), timeout_s=1.0)
    return [runtime.adapter for runtime in runtimes.values()]


async def _read_plan(port: int) -> list[tuple[int, int, int]]:
    """The adapter's coalesced reads of one poll: ``(function, start, count)``."""
    spec = make_fleet(1, 1, prefix="modbus-plan").agents[0]
    (adapter,) = _modbus_adapters(spec, [port])
    await adapter.connect()
    try:
        functions = {"holding": 3, "input": 4}
        return [(functions[b.table], b.start, b.count) for b in adapter.read_plan]
    finally:
        await adapter.close()


class _RawClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        data = self.buffer + data
        if len(data) >= 6 and len(data) >= 6 + (data[4] << 8 | data[5]):
            self.buffer = b""
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(data)
        else:
            self.buffer = data


class _Meter:
    """What the measured process counts: polls and failed polls, read on demand."""

    def __init__(self) -> None:
        self.polls = 0
        self.failed = 0
        self.adapters: list[Any] = []

    @property
    def ready(self) -> bool:
        """Every device connected, scanned and polled at least twice."""
        return bool(self.adapters) and min(a.polls for a in self.adapters) >= 2

    def read(self) -> tuple[int, int]:
        if not self.adapters:
            return self.polls, self.failed
        return sum(a.polls for a in self.adapters), sum(a.failed_polls for a in self.adapters)

    def waited(self) -> int:
        """Reads that found no new poll and waited for one (the rest took a poll made
        ahead of them; in the agent, without a task: ``read_nowait``)."""
        return sum(a.reads_waited for a in self.adapters)


async def _raw(ports: Sequence[int], meter: _Meter, stop: asyncio.Event) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    plan = await _read_plan(ports[0])
    requests = [
        (struct.Struct(f">{count}H"), function, start, count) for function, start, count in plan
    ]

    first_at = loop.time() + 1.0

    async def device(port: int) -> None:
        _, client = await loop.create_connection(_RawClient, "127.0.0.1", port)
        assert client.transport is not None
        tid = 0
        next_at = first_at  # all at once, as the adapters of an agent that start together
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += 1.0
            for words, function, start, count in requests:
                tid = tid % 0xFFFF + 1
                client.waiter = loop.create_future()
                client.transport.write(
                    struct.pack(">HHHBBHH", tid, 0, 6, 1, function, start, count)
                )
                answer = await client.waiter
                words.unpack_from(answer, 9)
            meter.polls += 1
        client.transport.close()

    await asyncio.gather(*(device(p) for p in ports))
    return {}


async def _adapters(ports: Sequence[int], meter: _Meter, stop: asyncio.Event) -> dict[str, Any]:
    spec = make_fleet(1, len(ports), prefix="modbus-adapter").agents[0]
    adapters = _modbus_adapters(spec, ports)
    loop = asyncio.get_running_loop()
    meter.adapters = adapters
    await asyncio.gather(*(a.connect() for a in adapters))
    tune_gc()  # as `der agent` does once its adapters are connected
    try:
        next_at = loop.time()
        while not stop.is_set():
            await asyncio.gather(*(a.read() for a in adapters))
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - loop.time()))
    finally:
        await asyncio.gather(*(a.close() for a in adapters))
    return {}


async def _agent(
    ports: Sequence[int], meter: _Meter, stop: asyncio.Event, headend_addr: str, spec: AgentSpec
) -> dict[str, Any]:
    from der_sdk.plugins import load_plugins
    from der_sdk_agent.agent import Agent

    buffer = Path(os.environ["BENCH_MODBUS_BUFFER"])
    agent = Agent(
        agent_id=spec.agent_id,
        site_id=spec.site_id,
        assets=_assets(spec),
        headend=headend_addr,
        config=_config(spec, ports),
        plugins=load_plugins(),
        buffer_path=str(buffer),
    )
    meter.adapters = [runtime.adapter for runtime in agent.adapters.values()]
    await agent.start()
    tune_gc()  # as `der agent` does
    try:
        async with asyncio.timeout(60):
            await agent.wait_connected()
        await stop.wait()
        stats = agent.stats()
    finally:
        await agent.stop()
    return {
        "connected": stats.connected,
        "batches_sent": stats.batches_sent,
        "buffer_batches_at_end": stats.buffer_batches,
        "samples_dropped": stats.samples_dropped,
        "durable_buffer": str(buffer),
    }


async def poll(mode: str, ports: Sequence[int], warmup_s: float, window_s: float) -> None:
    """The measured process: poll ``ports`` at 1 Hz; after ``warmup_s`` print
    ``measuring``, after ``window_s`` more the result (JSON lines on stdout)."""
    meter = _Meter()
    stop = asyncio.Event()
    if mode == "raw":
        job = asyncio.create_task(_raw(ports, meter, stop))
    elif mode == "adapter":
        job = asyncio.create_task(_adapters(ports, meter, stop))
    else:
        spec = AgentSpec(
            os.environ["BENCH_MODBUS_AGENT"],
            os.environ["BENCH_MODBUS_SITE"],
            tuple(json.loads(os.environ["BENCH_MODBUS_ASSETS"])),
        )
        job = asyncio.create_task(_agent(ports, meter, stop, os.environ["BENCH_HEADEND"], spec))
    loop = asyncio.get_running_loop()
    gc_meter = _GcMeter()
    async with asyncio.timeout(120):  # every device connected, scanned and polled twice
        while not (meter.ready if mode != "raw" else meter.polls >= 2 * len(ports)):
            if job.done():
                job.result()  # raises what stopped it
            await asyncio.sleep(0.2)
    await asyncio.sleep(warmup_s)
    if job.done():
        job.result()
    polls0, failed0 = meter.read()
    waited0 = meter.waited()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, wall0 = time.process_time(), loop.time()
    gc_meter.start()
    print(json.dumps({"event": "measuring"}), flush=True)
    await asyncio.sleep(window_s)
    cpu, wall = time.process_time() - cpu0, loop.time() - wall0
    gc_figures = gc_meter.stop(polls=meter.read()[0] - polls0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    polls1, failed1 = meter.read()
    waited = meter.waited() - waited0
    polls, failed = polls1 - polls0, failed1 - failed0
    stop.set()
    extra: dict[str, Any] = await job
    user, system = usage.ru_utime - usage0.ru_utime, usage.ru_stime - usage0.ru_stime
    result = {
        "event": "result",
        "mode": mode,
        **window_figures(len(ports), wall, cpu, polls, failed),
        "user_ms_per_poll": round(1000 * user / polls, 4) if polls else None,
        "system_ms_per_poll": round(1000 * system / polls, 4) if polls else None,
        **gc_figures,
        **({"reads_waited": waited} if mode != "raw" else {}),
        **extra,
    }
    print(json.dumps(result), flush=True)


class _GcMeter:
    """Time the garbage collector spends in the measured window (``gc.callbacks``): with
    thousands of devices the heap is large and a full collection walks all of it."""

    def __init__(self) -> None:
        self.measuring = False
        self.began = 0.0
        self.seconds = 0.0
        self.longest = 0.0
        self.collections = [0, 0, 0]
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self.measuring:
            return
        if phase == "start":
            self.began = time.process_time()
            return
        spent = time.process_time() - self.began
        self.seconds += spent
        self.longest = max(self.longest, spent)
        self.collections[info["generation"]] += 1

    def start(self) -> None:
        self.measuring = True

    def stop(self, polls: int) -> dict[str, Any]:
        self.measuring = False
        gc.callbacks.remove(self._callback)
        return {
            "gc_ms_per_poll": round(1000 * self.seconds / polls, 4) if polls else None,
            "gc_longest_ms": round(1000 * self.longest, 1),
            "gc_collections": self.collections,
            "gc_tracked_objects": len(gc.get_objects()),
        }


def window_figures(
    devices: int, wall_s: float, cpu_s: float, polls: int, failed: int
) -> dict[str, Any]:
    """The figures of one measured window (``bench/bench_modbus_poll.py`` reports them too)."""
    return {
        "devices": devices,
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 4),
        "cpu_pct_of_one_core": round(100 * cpu_s / wall_s, 1),
        "polls": polls,
        "failed_polls": failed,
        "poll_hz_per_device": round(polls / devices / wall_s, 3),
        "cpu_ms_per_poll": round(1000 * cpu_s / polls, 4) if polls else None,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# --------------------------------------------------------------------------- the benchmark


async def _child(
    log: Path, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``python -m bench.modbus_poll ARGS``; its logs (stderr) appended to ``log``."""
    errors = await asyncio.to_thread(log.open, "ab")
    with errors:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.modbus_poll",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
            env={**os.environ, **(env or {})},
        )


async def _event(process: asyncio.subprocess.Process, timeout_s: float) -> dict[str, Any]:
    assert process.stdout is not None
    async with asyncio.timeout(timeout_s):
        while True:
            line = await process.stdout.readline()
            if not line:
                raise RuntimeError(f"process {process.pid} ended (exit {await process.wait()})")
            with contextlib.suppress(ValueError):
                event: dict[str, Any] = json.loads(line)
                if isinstance(event, dict) and "event" in event:
                    return event


async def _stop(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(20):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


async def _measure(
    ctx: Context,
    mode: str,
    ports_file: Path,
    devices: int,
    warmup_s: float,
    window_s: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    log = ports_file.with_name(f"{mode}-{devices}.log")
    process = await _child(
        log, "poll", mode, str(ports_file), str(devices), str(warmup_s), str(window_s), env=env
    )
    try:
        await _event(process, warmup_s + 120)  # measuring
        assert process.pid is not None
        if mode == "raw":
            result = await _event(process, window_s + 60)
        else:
            async with profiling.maybe(ctx, f"modbus-poll-{mode}-{devices}", process.pid, window_s):
                result = await _event(process, window_s + 60)
    finally:
        await _stop(process)
    return result


def _line(run: dict[str, Any]) -> str:
    return (
        f"{run['mode']:>7} {run['devices']:>5} devices: {run['cpu_ms_per_poll']} ms CPU/poll, "
        f"{run['cpu_pct_of_one_core']} % of a core, {run['poll_hz_per_device']} polls/s/device, "
        f"{run['failed_polls']} failed"
        + (f", GC {run['gc_ms_per_poll']} ms/poll" if run.get("gc_ms_per_poll") else "")
        + (f", {run['reads_waited']} reads waited" if "reads_waited" in run else "")
    )


async def run(ctx: Context) -> list[Figure]:
    chosen = os.environ.get("DER_SDK_BENCH_MODBUS_DEVICES")  # e.g. 200,1000 while profiling
    if chosen:
        sizes = sorted(int(n) for n in chosen.split(","))
    else:
        sizes = [10] if ctx.quick else [50, 200, 1000, 2000]
    modes = os.environ.get("DER_SDK_BENCH_MODBUS_MODES")  # e.g. raw,agent while profiling
    chosen_modes = [m for m in MODES if m in modes.split(",")] if modes else list(MODES)
    warmup_s, window_s = (0.5, 1.0) if ctx.quick else (4.0, 10.0)
    window_s = float(os.environ.get("DER_SDK_BENCH_MODBUS_WINDOW_S", window_s))
    work = ctx.scratch("modbus-poll")
    ports_file = work / "ports.json"
    fleet = FleetSpec(tuple(make_fleet(1, n, prefix=f"modbus-{n}").agents[0] for n in sizes))
    inventory, _ = fleet.write(work / "fleet")
    ctx.say(
        f"SunSpec battery devices ({'+'.join(SUNSPEC_BESS)}), 2 reads a poll, at 1 Hz; "
        f"fleets of {', '.join(map(str, sizes))}; raw limit: {RAW_LABEL}"
    )
    ctx.say(f"logs of the measured processes: {work}/*.log")
    devices = await _child(work / "devices.log", "devices", str(max(sizes)), str(ports_file))
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        await _event(devices, 300)
        url = f"sqlite:///{ctx.scratch('modbus-poll-db') / 'der.db'}"
        async with headend(ctx, "modbus-poll", inventory, url) as process:
            for spec, size in zip(fleet.agents, sizes, strict=True):
                env = {
                    "BENCH_HEADEND": process.grpc_addr,
                    "BENCH_MODBUS_AGENT": spec.agent_id,
                    "BENCH_MODBUS_SITE": spec.site_id,
                    "BENCH_MODBUS_ASSETS": json.dumps(spec.asset_ids),
                    "BENCH_MODBUS_BUFFER": str(work / f"agent-{size}.sqlite3"),
                }
                for mode in chosen_modes:
                    result = await _measure(
                        ctx, mode, ports_file, size, warmup_s, window_s, env=env
                    )
                    runs[mode, size] = result
                    ctx.say(_line(result))
    finally:
        await _stop(devices)
    return _figures(runs, sizes)


def _figures(runs: dict[tuple[str, int], dict[str, Any]], sizes: Sequence[int]) -> list[Figure]:
    figures = []
    for size in sizes:
        raw = runs["raw", size]["cpu_ms_per_poll"] if ("raw", size) in runs else None
        for mode, label in (("adapter", "adapter alone"), ("agent", "full agent")):
            if (mode, size) not in runs:
                continue
            run = runs[mode, size]
            value = run["cpu_ms_per_poll"]
            figures.append(
                Figure(
                    name=f"Modbus poll CPU, {label}, {size} devices at 1 Hz",
                    value=value,
                    unit="ms/poll",
                    goal=f"≤ {GOAL_MS} ms",
                    met=value <= GOAL_MS and run["failed_polls"] == 0,
                    raw=raw,
                    raw_label=RAW_LABEL,
                    ratio=value / raw if raw else None,
                    details={"run": run, "raw": runs.get(("raw", size))},
                )
            )
    kept = [
        s
        for s in sizes
        if ("agent", s) in runs
        and ("raw", s) in runs
        and runs["agent", s]["poll_hz_per_device"] >= 0.95
    ]
    if kept:
        basis = runs["agent", max(kept)]
        per_core = 1000.0 / basis["cpu_ms_per_poll"]
        raw_per_core = 1000.0 / runs["raw", max(kept)]["cpu_ms_per_poll"]
        figures.append(
            Figure(
                name="Modbus devices one core polls at 1 Hz, full agent",
                value=per_core,
                unit="devices",
                goal="≥ 5,000",
                met=per_core >= 5000,
                raw=raw_per_core,
                raw_label=RAW_LABEL,
                ratio=per_core / raw_per_core,
                details={"basis_devices": basis["devices"]},
            )
        )
    return figures


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _loop_run(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> None:
    """The child processes: ``devices COUNT PORTS_FILE`` and
    ``poll MODE PORTS_FILE COUNT WARMUP_S WINDOW_S``."""
    parser = argparse.ArgumentParser(prog="python -m bench.modbus_poll")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("devices")
    serve.add_argument("count", type=int)
    serve.add_argument("ports_file", type=Path)
    measured = sub.add_parser("poll")
    measured.add_argument("mode", choices=MODES)
    measured.add_argument("ports_file", type=Path)
    measured.add_argument("count", type=int)
    measured.add_argument("warmup_s", type=float)
    measured.add_argument("window_s", type=float)
    args = parser.parse_args(argv)
    _raise_fd_limit()
    if args.command == "devices":
        _loop_run(serve_devices(args.count, args.ports_file))
    else:
        ports = json.loads(args.ports_file.read_text())[: args.count]
        _loop_run(poll(args.mode, ports, args.warmup_s, args.window_s))


if __name__ == "__main__":
    main()
