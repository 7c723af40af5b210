"""What every benchmark shares: the figure it reports, where it runs, the processes it
starts (the headend, the raw servers), and the CPU and memory readings taken from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from der_sdk.testing.faults import HeadendProcess

__all__ = [
    "Context",
    "Figure",
    "RawServer",
    "headend",
    "percentile",
    "postgres_url",
    "proc_cpu_s",
    "proc_rss",
]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Figure:
    """One row of the results table.

    ``value`` is the figure, ``raw`` the raw limit measured in the same run (``None``
    where the issue names none), ``ratio`` value/raw where a ratio is the goal, and
    ``met`` whether the goal holds (``None``: only informative).
    """

    name: str
    value: float
    unit: str
    goal: str
    met: bool | None
    raw: float | None = None
    raw_label: str = ""
    ratio: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """Where and how big: ``quick`` runs a small smoke load."""

    quick: bool
    workdir: Path
    profile: bool = False
    profiles_dir: Path | None = None
    log: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"  {text}", flush=True)
        self.log.append(text)

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max of latencies given in seconds, in milliseconds."""
    return {
        "count": len(values),
        "p50_ms": percentile(values, 50) * 1000,
        "p90_ms": percentile(values, 90) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": max(values) * 1000 if values else float("nan"),
        "mean_ms": statistics.fmean(values) * 1000 if values else float("nan"),
    }


HELPER_PROCESSES = ("der_sdk.storage.sqlite_writer",)
"""Command-line marks of processes a headend starts to do its own work (the SQLite
backend's telemetry writer): their memory and CPU count as the headend's."""


def helper_pids(pid: int) -> list[int]:
    """The children of ``pid`` that are its helper processes (:data:`HELPER_PROCESSES`)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    with contextlib.suppress(OSError):
                        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                        if any(mark.encode() in cmdline for mark in HELPER_PROCESSES):
                            found.append(int(child))
    return found


def _own_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _own_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss(pid: int) -> int:
    """Resident memory of ``pid`` and of its helper processes (:func:`helper_pids`)."""
    total = _own_rss(pid)
    for helper in helper_pids(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += _own_rss(helper)
    return total


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its threads, and of its helper processes
    (:func:`helper_pids`) while they run."""
    total = _own_cpu_s(pid)
    for helper in helper_pids(pid):
        with contextlib.suppress(OSError):
            total += _own_cpu_s(helper)
    return total


def postgres_url() -> str | None:
    """The admin URL of the local PostgreSQL, or ``None`` when it is not reachable."""
    url = os.environ.get("DER_SDK_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    host, port = "127.0.0.1", 5432
    try:
        with socket.create_connection((host, port), timeout=1):
            return url
    except OSError:
        return None


async def fresh_database(admin_url: str, name: str) -> str:
    """Drop and create database ``name``; return its URL.

    Then a ``CHECKPOINT``, so the pipeline measured next does not pay for writing out the
    dirty pages of the one measured before it (when the role may; skipped otherwise).
    """
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def drop_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def headend(
    ctx: Context,
    name: str,
    inventory: Path,
    database_url: str,
    env: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    start_timeout_s: float = 60,
) -> AsyncIterator[HeadendProcess]:
    """``der headend`` in a child process, WARNING logs, stopped on exit; with
    ``ssl_context`` (trusting the certificate of the ``HEADEND_TLS_*`` files in ``env``)
    its REST API is asked over HTTPS. ``start_timeout_s``: how long it may take to start
    (loading an inventory of tens of thousands of assets takes a while)."""
    workdir = ctx.scratch(f"{name}-headend")
    process = HeadendProcess(
        inventory,
        database_url,
        workdir,
        env={"MAX_AGENT_STREAMS": "20000", **(env or {})},
        log_level="WARNING",
        ssl_context=ssl_context,
    )
    await process.start(timeout_s=start_timeout_s)
    for _ in range(600):
        if await process.healthz() == 200:
            break
        await asyncio.sleep(0.1)
    try:
        yield process
    finally:
        await process.terminate(timeout_s=20)


class RawServer:
    """A raw-limit server (``python -m bench.raw``) in a child process.

    It prints one JSON line when it listens (``{"port": ...}``) and answers commands on
    stdin with one JSON line each (``stats``, ``push N``, ``quit``).
    """

    def __init__(self, kind: str, *args: str, workdir: Path) -> None:
        self.kind = kind
        self.args = list(args)
        self.workdir = workdir
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def start(self) -> RawServer:
        log = await asyncio.to_thread(open, self.workdir / f"raw-{self.kind}.log", "ab")
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.raw",
            self.kind,
            *self.args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        log.close()
        line = await self._readline(60)
        self.port = int(line["port"])
        return self

    async def _readline(self, timeout_s: float) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        async with asyncio.timeout(timeout_s):
            raw = await self._process.stdout.readline()
        if not raw:
            log = (self.workdir / f"raw-{self.kind}.log").read_text()[-2000:]
            raise RuntimeError(f"raw server {self.kind} exited: {log}")
        result: dict[str, Any] = json.loads(raw)
        return result

    async def ask(self, command: str, timeout_s: float = 120) -> dict[str, Any]:
        assert self._process is not None and self._process.stdin is not None
        async with self._lock:
            self._process.stdin.write(command.encode() + b"\n")
            await self._process.stdin.drain()
            return await self._readline(timeout_s)

    async def stop(self) -> None:
        if self._process is None or self._process.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.ask("quit", timeout_s=5)
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        await self._process.wait()

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def pids_named(name: str) -> list[int]:
    """Every process whose command name is ``name`` (e.g. the PostgreSQL backends)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


def _cpu(pids: int | list[int]) -> dict[int, float]:
    """CPU seconds of each of ``pids`` still running."""
    readings: dict[int, float] = {}
    for pid in [pids] if isinstance(pids, int) else pids:
        with contextlib.suppress(OSError):
            readings[pid] = proc_cpu_s(pid)
    return readings


def _used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings by the processes alive at both (a process
    that exited in between, e.g. a PostgreSQL backend, would otherwise count negative)."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


class CpuMeter:
    """CPU use of some processes (or groups of them) between :meth:`start` and
    :meth:`stop`, in cores. The whole machine (``machine_cores``) is always measured."""

    def __init__(self, pids: dict[str, int | list[int]]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._cpu0: dict[str, dict[int, float]] = {}
        self._machine0 = 0.0

    @staticmethod
    def _machine() -> float:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # not idle/iowait
        return busy / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._cpu0 = {k: _cpu(p) for k, p in self.pids.items()}
        self._machine0 = self._machine()

    def stop(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self._t0
        result = {
            f"{k}_cores": round(_used(self._cpu0[k], _cpu(p)) / elapsed, 2)
            for k, p in self.pids.items()
        }
        result["machine_cores"] = round((self._machine() - self._machine0) / elapsed, 2)
        return result


async def http_get(
    url: str, headers: dict[str, str] | None = None, timeout_s: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One ``GET`` through httpx: status, headers (lower-case names), body. Not for load:
    the REST load comes from :mod:`bench.rest_client`."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        response = await client.get(url, headers=headers)
    return (
        response.status_code,
        {k.lower(): v for k, v in response.headers.items()},
        response.content,
    )


async def metrics(base_url: str) -> dict[str, float]:
    """The headend's ``/metrics`` as name → value (series without labels only)."""
    _, _, body = await http_get(f"{base_url}/metrics")
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values
