"""REST read throughput: ``GET /telemetry/{asset_id}`` (the latest sample, from memory).

The figure is requests/s of the headend's REST API (Litestar on uvicorn with httptools,
one worker, in the headend process) against the raw limit of the same stack: a bare
Litestar route on uvicorn (:mod:`bench.raw` ``rest``) serving the very bytes the headend
answered, measured in the same run. The goal: at least 0.8 of it, and every response a 200.

The load comes from :mod:`bench.rest_client` in a child process: keep-alive connections,
one request in flight on each, parsed no further than status and ``Content-Length``. It
needs well under a core (its CPU is in the details), so the server under test is the
bottleneck. The runs alternate (bare, headend, headend with authentication on; repeated)
and the figure takes the medians, so drift on a shared machine hurts both alike. The
details add the server's CPU per request (less sensitive to other processes than
requests/s) and the median of the per-round ratios.

Authentication: the headend starts with ``HEADEND_AUTH=auto`` on loopback and no token, so
checking is off (every request is an anonymous admin, as in a default local install).
For the auth-on runs a viewer token is created in the token file the way ``der tokens
create`` does; the headend turns checking on by itself within a second; the client sends
``Authorization: Bearer ...``. Revoking the token turns it off again for the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import profiling
from bench.common import ROOT, Context, CpuMeter, Figure, RawServer, headend, http_get
from bench.loadgen import Fleet, make_fleet
from der_sdk.testing.faults import HeadendProcess
from der_sdk_headend.tokens import TokenFileStore

__all__ = ["run"]

PATH = "/telemetry/{asset_id}"


# ----------------------------------------------------------------------------- a load run


async def load(
    url: str,
    *,
    connections: int,
    warmup_s: float,
    seconds: float,
    server_pid: int,
    headers: list[str] | None = None,
    workdir: Path,
    label: str,
) -> dict[str, Any]:
    """One run of :mod:`bench.rest_client` against ``url``; its results plus the server's
    CPU over the measured window."""
    args = [url, str(connections), str(seconds), "--warmup", str(warmup_s)]
    for header in headers or ():
        args += ["--header", header]
    log_path = workdir / f"client-{label}.log"
    log = open(log_path, "ab")  # noqa: ASYNC230, SIM115
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.rest_client",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    log.close()
    assert process.stdout is not None
    meter = CpuMeter({"server": server_pid})
    try:
        async with asyncio.timeout(warmup_s + seconds + 60):
            started = await process.stdout.readline()
            if not started:
                raise RuntimeError(f"load client failed: {log_path.read_text()[-2000:]}")
            meter.start()
            ended = await process.stdout.readline()  # {"phase": "done"}: the window is over
            cpu = meter.stop()
            line = await process.stdout.readline() if ended else b""
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if not line:
        raise RuntimeError(f"load client failed: {log_path.read_text()[-2000:]}")
    result: dict[str, Any] = json.loads(line)
    if not result["requests"]:
        raise RuntimeError(f"no response from {url} in {seconds} s: {result}")
    result["server_cores"] = cpu["server_cores"]
    result["client_cores"] = result.pop("cpu_cores")
    result["rps"] = round(result["rps"])
    del result["connections"]
    for key in ("failures", "reconnects"):
        if not result[key]:
            del result[key]
    return result


# ----------------------------------------------------------------------------- auth on/off


class AuthSwitch:
    """Turns the headend's token checking on (a viewer token in its token file, as ``der
    tokens create`` writes it) and off (revoke it: ``HEADEND_AUTH=auto`` on loopback with
    no active token checks nothing), and waits until the headend acts on it."""

    def __init__(self, tokens_path: Path, url: str) -> None:
        self.store = TokenFileStore(tokens_path)
        self.url = url
        self.token_id: str | None = None
        self.secret = ""

    async def on(self) -> str:
        token, secret, _, _ = await asyncio.to_thread(
            self.store.create, role="viewer", name="bench-rest", by_cli="bench@rest"
        )
        self.token_id, self.secret = token.id, secret
        await self._wait(401)
        status, _, _ = await http_get(self.url, {"Authorization": f"Bearer {secret}"})
        if status != 200:
            raise RuntimeError(f"GET {self.url} with the new token answered {status}")
        return secret

    async def off(self) -> None:
        if self.token_id is not None:
            await asyncio.to_thread(self.store.revoke, self.token_id, by_cli="bench@rest")
            self.token_id = None
            await self._wait(200)

    async def _wait(self, status: int, timeout_s: float = 10.0) -> None:
        """Until ``GET`` without a token answers ``status``."""
        deadline = time.perf_counter() + timeout_s
        while True:
            got, _, _ = await http_get(self.url)
            if got == status:
                return
            if time.perf_counter() > deadline:
                raise RuntimeError(f"auth switch: {self.url} still answers {got}, not {status}")
            await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- the benchmark


@contextlib.asynccontextmanager
async def _latest_sample(
    ctx: Context,
) -> AsyncIterator[tuple[HeadendProcess, str, bytes, dict[str, str]]]:
    """A headend whose first asset has a latest sample: the process, its URL for that
    asset, and the body and headers it answers."""
    spec = make_fleet(4, 5, prefix="bench-rest")
    inventory, _ = spec.write(ctx.scratch("rest-fleet"))
    db = ctx.scratch("rest-db")
    env = {"HEADEND_AUTH": "auto", "HEADEND_TOKENS_FILE": str(db / "tokens.json")}
    async with headend(ctx, "rest", inventory, f"sqlite:///{db / 'der.db'}", env) as process:
        fleet = Fleet(spec.slice(0, 1), process.grpc_addr, ticks_per_batch=1, window=1)
        try:
            await fleet.connect(timeout_s=30)
            await fleet.agents[0].send_batch()
            if not await fleet.wait_acked(10):
                raise RuntimeError("the headend did not acknowledge the telemetry batch")
        finally:
            await fleet.close()
        asset_id = spec.agents[0].asset_ids[0]
        url = process.http_url + PATH.format(asset_id=asset_id)
        status, headers, body = await http_get(url)
        if status != 200:
            raise RuntimeError(f"GET {url} answered {status}: {body[:300]!r}")
        yield process, url, body, headers


KINDS = ("bare", "headend", "auth")
CLIENT_LIMIT_CORES = 0.8
"""Above this the load client might be what limits a run: said, and in the details."""


async def run(ctx: Context) -> list[Figure]:
    if ctx.quick:
        rounds, warmup_s, seconds, connections = 1, 0.3, 1.0, 16
    else:
        rounds, warmup_s, seconds, connections = 5, 1.5, 5.0, 32
    workdir = ctx.scratch("rest")
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    async with _latest_sample(ctx) as (process, url, body, headers):
        assert process.pid is not None
        path = urlsplit(url).path
        body_path = workdir / "latest.json"
        body_path.write_bytes(body)
        ctx.say(
            f"GET {path}: {len(body)} bytes; {connections} connections, {rounds} rounds of "
            f"bare, headend, headend auth on ({warmup_s:g} s warm-up + {seconds:g} s each)"
        )
        async with RawServer("rest", str(body_path), workdir=workdir) as bare:
            bare_url = f"http://127.0.0.1:{bare.port}{path}"
            status, bare_headers, bare_body = await http_get(bare_url)
            if status != 200 or bare_body != body:
                raise RuntimeError(f"the bare route answers {status}, {bare_body[:200]!r}")
            auth = AuthSwitch(Path(process.env["HEADEND_TOKENS_FILE"]), url)
            common: dict[str, Any] = {
                "connections": connections,
                "warmup_s": warmup_s,
                "seconds": seconds,
                "workdir": workdir,
            }
            for i in range(rounds):
                runs["bare"].append(
                    await load(bare_url, server_pid=bare.pid, label=f"bare-{i}", **common)
                )
                runs["headend"].append(
                    await load(url, server_pid=process.pid, label=f"headend-{i}", **common)
                )
                secret = await auth.on()
                runs["auth"].append(
                    await load(
                        url,
                        server_pid=process.pid,
                        headers=[f"Authorization: Bearer {secret}"],
                        label=f"auth-{i}",
                        **common,
                    )
                )
                await auth.off()
                ctx.say(
                    f"round {i + 1}: bare {runs['bare'][-1]['rps']:,} req/s, headend "
                    f"{runs['headend'][-1]['rps']:,}, headend auth on {runs['auth'][-1]['rps']:,}"
                )
            status, _, after = await http_get(url)
            if status != 200 or after != body:
                ctx.say("note: the headend's answer changed during the run")
            if ctx.profile:
                await _profile(ctx, url, bare_url, process.pid, bare.pid, connections, workdir)
    return [_figure(ctx, runs, body, headers, bare_headers, connections, warmup_s, seconds)]


def _figure(
    ctx: Context,
    runs: dict[str, list[dict[str, Any]]],
    body: bytes,
    headers: dict[str, str],
    bare_headers: dict[str, str],
    connections: int,
    warmup_s: float,
    seconds: float,
) -> Figure:
    for kind_runs in runs.values():
        for r in kind_runs:
            r["server_us_per_request"] = round(r["server_cores"] / r["rps"] * 1e6, 1)

    def median(kind: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[kind]))

    def paired(kind: str) -> float:
        """Median over rounds of this kind's req/s over the bare route's in that round."""
        ratios = [r["rps"] / b["rps"] for r, b in zip(runs[kind], runs["bare"], strict=True)]
        return round(float(statistics.median(ratios)), 3)

    raw_value, value, auth_value = (median(kind, "rps") for kind in KINDS)
    ratio = value / raw_value if raw_value else 0.0
    errors = sum(r["errors"] for kind_runs in runs.values() for r in kind_runs)
    client_max = max(r["client_cores"] for kind_runs in runs.values() for r in kind_runs)
    if client_max > CLIENT_LIMIT_CORES:
        ctx.say(f"warning: the load client used up to {client_max} cores; it may be the limit")
    summary = {
        kind: {
            "rps": round(median(kind, "rps")),
            "p50_ms": median(kind, "p50_ms"),
            "p99_ms": median(kind, "p99_ms"),
            "server_cores": median(kind, "server_cores"),
            "client_cores": median(kind, "client_cores"),
            "server_us_per_request": median(kind, "server_us_per_request"),
        }
        for kind in KINDS
    }
    bare_us = summary["bare"]["server_us_per_request"]
    ctx.say(
        f"median: bare {raw_value:,.0f} req/s, headend {value:,.0f} (ratio {ratio:.2f}), "
        f"auth on {auth_value:,.0f} ({auth_value / raw_value:.2f} of bare); server CPU per "
        f"request: bare {bare_us:g} us, headend {summary['headend']['server_us_per_request']:g}, "
        f"auth on {summary['auth']['server_us_per_request']:g}; client "
        f"{summary['headend']['client_cores']:g} cores; errors {errors}"
    )
    return Figure(
        name="REST GET /telemetry/{id}, one worker",
        value=round(value),
        unit="req/s",
        goal=">= 0.8 of a bare Litestar route",
        met=ratio >= 0.8 and errors == 0,
        raw=round(raw_value),
        raw_label="bare Litestar route, same JSON, uvicorn httptools",
        ratio=round(ratio, 3),
        details={
            "connections": connections,
            "rounds": len(runs["bare"]),
            "warmup_s": warmup_s,
            "seconds": seconds,
            "body_bytes": len(body),
            "content_type": {
                "headend": headers.get("content-type"),
                "bare": bare_headers.get("content-type"),
            },
            "errors": errors,
            "client_cores_max": client_max,
            "ratio_paired_median": paired("headend"),
            "ratio_cpu_per_request": round(
                bare_us / summary["headend"]["server_us_per_request"], 3
            ),
            "auth_on_rps": round(auth_value),
            "auth_on_ratio_to_bare": round(auth_value / raw_value, 3),
            "auth_on_ratio_paired_median": paired("auth"),
            "auth_on_us_per_request_over_headend": round(
                summary["auth"]["server_us_per_request"]
                - summary["headend"]["server_us_per_request"],
                1,
            ),
            "median": summary,
            "runs": runs,
        },
    )


async def _profile(
    ctx: Context,
    url: str,
    bare_url: str,
    pid: int,
    bare_pid: int,
    connections: int,
    workdir: Path,
) -> None:
    """py-spy profiles of the headend and of the bare server under the same load (runs
    not counted: the sampler takes CPU of its own)."""
    seconds = 3.0 if ctx.quick else 10.0
    for name, target, server in (("rest", url, pid), ("rest-bare", bare_url, bare_pid)):
        async with profiling.maybe(ctx, name, server, seconds):
            await load(
                target,
                connections=connections,
                warmup_s=0.2,
                seconds=seconds,
                server_pid=server,
                workdir=workdir,
                label=f"profile-{name}",
            )
