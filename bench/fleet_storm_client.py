"""One client process of the reconnect-storm benchmark (:func:`bench.fleet.run_storm`).

It builds its slice of the fleet, prints ``{"ready": true}``, then waits for ``go T`` on
stdin (``T``: a wall-clock time, :func:`time.time`, shared by every client process).
At ``T`` it starts every agent of its slice at once, each on its own connection. An agent
whose stream fails before it is registered (``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``, a
refusal...) retries like ``der_sdk_agent`` does (:class:`der_sdk_agent.link.Backoff`: 1 s
x 1.6 per attempt, ±20 % jitter) until ``--deadline-s`` after ``T``; every failure is
counted by its status. With ``--tls PKI_DIR`` every agent dials with its own client
certificate (mutual TLS, :class:`bench.loadgen.ClientTls`). When every agent is
registered (or gave up) it prints one JSON line with the wall-clock times, then holds the
streams open until ``quit`` (or end of stdin).

    python -m bench.fleet_storm_client --target 127.0.0.1:50051 --fleet fleet.json \
        --start 0 --stop 2500 [--tls PKI_DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import proc_cpu_s, proc_rss
from bench.loadgen import AgentSpec, ClientTls, FleetAgent, FleetSpec
from der_sdk_agent.link import Backoff


class StormAgent:
    """One agent of the storm: connect, register, retry on failure, then hold."""

    def __init__(
        self,
        spec: AgentSpec,
        target: str,
        errors: Counter[str],
        failures: list[tuple[float, str]],
        tls: ClientTls | None = None,
    ) -> None:
        self.spec = spec
        self.target = target
        self.tls = tls
        self.errors = errors
        self.failures = failures
        self.agent: FleetAgent | None = None
        self.attempts = 0
        self.registered_wall: float | None = None

    async def run(self, deadline: float, backoff: Backoff) -> None:
        while True:
            self.attempts += 1
            agent = FleetAgent(self.spec, self.target, ticks_per_batch=1, window=1, tls=self.tls)
            self.agent = agent
            agent.start()
            remaining = deadline - time.time()
            try:
                async with asyncio.timeout(max(0.0, remaining)):
                    await agent.registered.wait()
            except TimeoutError:
                self.errors["timeout (not registered by the deadline)"] += 1
                return
            if agent.stats.registered_at is not None and agent.stats.error is None:
                # registered_at is perf_counter(); the offset was taken once at start.
                self.registered_wall = agent.stats.registered_at + _OFFSET
                return
            error = agent.stats.error or "stream ended before RegisterAck"
            self.errors[_kind(error)] += 1
            self.failures.append((time.time(), error))
            await agent.close()
            self.agent = None
            delay = backoff.delay(self.attempts)
            if time.time() + delay >= deadline:
                return
            await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await self.agent.close()


_OFFSET = time.time() - time.perf_counter()


def _kind(error: str) -> str:
    """``RESOURCE_EXHAUSTED: ...`` → ``RESOURCE_EXHAUSTED``; refusals keep their text."""
    head = error.split(":", 1)[0]
    return head if head.isupper() else error[:80]


async def _lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


async def _main(args: argparse.Namespace) -> None:
    global _OFFSET
    spec = FleetSpec.read(Path(args.fleet)).slice(args.start, args.stop)
    errors: Counter[str] = Counter()
    failures: list[tuple[float, str]] = []
    tls = ClientTls.read(Path(args.tls), spec) if args.tls else None
    agents = [StormAgent(a, args.target, errors, failures, tls) for a in spec.agents]
    stdin = await _lines()
    _emit({"ready": True, "pid": os.getpid(), "agents": len(agents)})
    line = (await stdin.readline()).decode().split()
    if not line or line[0] != "go":
        return
    go = float(line[1])
    me = os.getpid()
    rss0, cpu0 = proc_rss(me), proc_cpu_s(me)
    await asyncio.sleep(max(0.0, go - time.time()))
    _OFFSET = time.time() - time.perf_counter()
    started = time.time()
    deadline = go + args.deadline_s
    backoff = Backoff()
    tasks = [asyncio.create_task(a.run(deadline, backoff)) for a in agents]
    launched = time.time()  # every agent's task exists; their channels open as they run
    await asyncio.gather(*tasks)
    done = time.time()
    registered = [a.registered_wall for a in agents if a.registered_wall is not None]
    _emit(
        {
            "agents": len(agents),
            "registered": len(registered),
            "late_start_s": round(started - go, 4),
            "launch_s": round(launched - go, 4),
            "first_registered_s": round(min(registered) - go, 3) if registered else None,
            "last_registered_s": round(max(registered) - go, 3) if registered else None,
            "registered_s": sorted(round(t - go, 3) for t in registered),
            "done_s": round(done - go, 3),
            "attempts": sum(a.attempts for a in agents),
            "retried_agents": sum(1 for a in agents if a.attempts > 1),
            "errors": dict(errors),
            "failed_s": sorted(round(t - go, 3) for t, _ in failures),
            "error_samples": sorted({e for _, e in failures})[:10],
            "client_cpu_s": round(proc_cpu_s(me) - cpu0, 2),
            "client_rss_delta_mib": round((proc_rss(me) - rss0) / 2**20, 1),
        }
    )
    with contextlib.suppress(Exception):  # hold until told to go, or the parent is gone
        await stdin.readline()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(15):
            await asyncio.gather(*(a.close() for a in agents))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--fleet", required=True, help="fleet.json written by FleetSpec.write")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=None)
    parser.add_argument("--deadline-s", type=float, default=120.0)
    parser.add_argument(
        "--tls", default="", help="mutual TLS: the folder with ca.pem and the agents' certificates"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(_main(args))
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
