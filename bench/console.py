"""The console: the Fleet page's server time with 1,000 assets, and what 50 open consoles'
live stream costs stored ingest.

``console-fleet``: a headend with 200 gateway agents of 5 assets each (1,000 assets), all
connected and each asset with a latest sample, answers ``GET /`` (the Fleet page, first
page of 200 rows, with the whole fleet's summary), ``GET /?q=...`` (a search) and, as the
reference, ``GET /agents`` (the REST list of the same 1,000 assets as JSON), one request
at a time on loopback; p50 and p99 of each.

``console-sse``:
the ``ingest-sqlite`` load (200 agents x 5 assets, flat out) twice against one headend
each: once with no console open, once with :data:`CONSOLES` streams of
``/console/events?assets=*`` (every asset: the Fleet page's subscription, the costliest),
each read as fast as it comes. The figure is the stored samples/s with the consoles beside
the same run without them; the consoles' events and bytes are in the details.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.common import Context, Figure, headend, percentile
from bench.ingest import _shape, _through
from bench.loadgen import Fleet

__all__ = ["run_fleet", "run_sse"]

PAGE_REQUESTS = 200

CONSOLES = 50


class _Console:
    """One SSE stream read with a raw socket: counts events and bytes, parses nothing."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0
        self.task: asyncio.Task[None] | None = None
        self.status = ""

    async def run(self, http_url: str) -> None:
        parts = urlsplit(http_url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            f"GET /console/events?assets=*&dispatch=1 HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        try:
            self.status = (await reader.readline()).decode().strip()
            while chunk := await reader.read(65536):
                self.bytes += len(chunk)
                self.events += chunk.count(b"\nevent: ")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _run_once(ctx: Context, consoles: int) -> dict[str, Any]:
    spec, warmup_s, seconds = _shape(ctx, 200)
    inventory, _ = spec.write(ctx.scratch(f"console-fleet-{consoles}"))
    workdir = ctx.scratch(f"console-db-{consoles}")
    url = f"sqlite:///{workdir / 'der.db'}"
    async with headend(ctx, f"console-sse-{consoles}", inventory, url) as process:
        assert process.pid is not None
        readers = [_Console() for _ in range(consoles)]
        for reader in readers:
            reader.task = asyncio.create_task(reader.run(process.http_url))
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        try:
            result = await _through(
                ctx, spec, process.grpc_addr, warmup_s, seconds, process.pid, process.http_url
            )
        finally:
            elapsed = time.perf_counter() - started
            for reader in readers:
                assert reader.task is not None
                reader.task.cancel()
            await asyncio.gather(*(r.task for r in readers if r.task), return_exceptions=True)
    if readers:
        refused = [r.status for r in readers if " 200 " not in f"{r.status} "]
        if refused:
            raise RuntimeError(f"console streams refused: {refused[:3]}")
        result["console_events_per_s"] = round(sum(r.events for r in readers) / elapsed, 1)
        result["console_mbytes_per_s"] = round(sum(r.bytes for r in readers) / elapsed / 1e6, 2)
    return result


async def run_sse(ctx: Context) -> list[Figure]:
    consoles = 5 if ctx.quick else CONSOLES
    ctx.say(f"ingest-sqlite load without consoles, then with {consoles} live consoles")
    alone = await _run_once(ctx, 0)
    ctx.say(f"no console: {alone['samples_per_s']:,.0f} samples/s")
    watched = await _run_once(ctx, consoles)
    ctx.say(
        f"{consoles} consoles: {watched['samples_per_s']:,.0f} samples/s, "
        f"{watched.get('console_events_per_s', 0):,.0f} events/s, "
        f"{watched.get('console_mbytes_per_s', 0):,.2f} MB/s to the consoles"
    )
    ratio = watched["samples_per_s"] / alone["samples_per_s"]
    return [
        Figure(
            name=f"SQLite stored ingest with {consoles} live consoles",
            value=round(watched["samples_per_s"]),
            unit="samples/s",
            goal="beside the same run without consoles",
            met=None,
            raw=round(alone["samples_per_s"]),
            raw_label="the same load, no console open",
            ratio=round(ratio, 3),
            details={"consoles": consoles, "with": watched, "without": alone},
        )
    ]


async def _timed(client: httpx.AsyncClient, url: str, count: int) -> list[float]:
    """Milliseconds of ``count`` GETs of ``url``, one at a time (each must answer 200)."""
    timings: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        response = await client.get(url)
        timings.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:200]}")
    return timings


async def run_fleet(ctx: Context) -> list[Figure]:
    spec, _, _ = _shape(ctx, 200)
    assets = spec.assets
    count = 20 if ctx.quick else PAGE_REQUESTS
    ctx.say(f"the Fleet page with {assets} assets, {len(spec.agents)} agents connected")
    inventory, _ = spec.write(ctx.scratch("console-fleet-page"))
    url = f"sqlite:///{ctx.scratch('console-fleet-db') / 'der.db'}"
    async with headend(ctx, "console-fleet", inventory, url) as process:
        fleet = Fleet(spec, process.grpc_addr, ticks_per_batch=20, window=8)
        try:
            await fleet.connect(timeout_s=120, concurrency=200)
            await fleet.drive(1.0)  # every asset gets a latest sample
            async with httpx.AsyncClient(base_url=process.http_url, timeout=30) as client:
                await _timed(client, "/", 3)  # templates compiled, caches warm
                page = await _timed(client, "/", count)
                search = await _timed(client, "/?q=bess+7", count)
                rest = await _timed(client, "/agents", count)
                size = len((await client.get("/")).content)
        finally:
            await fleet.close()
    figures: list[Figure] = []
    for label, timings in (("fleet page", page), ("fleet page search", search)):
        for pct in (50, 99):
            figures.append(
                Figure(
                    name=f"console {label}, {assets} assets (p{pct})",
                    value=round(percentile(timings, pct), 2),
                    unit="ms",
                    goal="issue 18 asks for the figure, sets no goal",
                    met=None,
                    raw=round(percentile(rest, pct), 2),
                    raw_label="GET /agents, the same assets as JSON",
                    ratio=round(percentile(timings, pct) / percentile(rest, pct), 2),
                    details={"requests": count, "page_bytes": size},
                )
            )
    ctx.say(
        f"GET / p50 {percentile(page, 50):.1f} ms p99 {percentile(page, 99):.1f} ms "
        f"({size:,} bytes); search p50 {percentile(search, 50):.1f} ms; "
        f"GET /agents p50 {percentile(rest, 50):.1f} ms p99 {percentile(rest, 99):.1f} ms"
    )
    return figures
