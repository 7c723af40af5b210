"""The console's live stream: what 50 open consoles cost stored ingest.

The ``ingest-sqlite`` load (200 agents x 5 assets, flat out) twice against one headend
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

from bench.common import Context, Figure, headend
from bench.ingest import _shape, _through

__all__ = ["run_sse"]

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
