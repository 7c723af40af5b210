"""A lean HTTP/1.1 load client for the REST benchmark: keep-alive connections, each with
one ``GET`` in flight at a time, on uvloop protocols (no HTTP library on the hot path).

A response is parsed as little as correctness allows: the status from the status line,
the body length from ``Content-Length`` (a response without one is an error: the servers
measured always send it). Every non-200 is counted as an error, as is a connection the
server closes (it is opened again).

::

    python -m bench.rest_client http://127.0.0.1:8080/telemetry/ID 32 10 --warmup 2 \
        --header "Authorization: Bearer der_..."

It prints ``{"phase": "measuring"}`` when the measured window starts (after the warm-up),
``{"phase": "done"}`` when it ends, then one JSON line of the window's results:
``requests``, ``errors``, ``rps``, ``statuses`` (counts by status), latency percentiles
(``p50_ms`` ...), ``cpu_cores`` (this process's CPU over the window), ``bytes`` (the body
size of the last response), ``connections``, and ``reconnects`` and ``failures``.

It costs about a quarter to a third of the server's CPU per request (60 us against about
180 us for a bare Litestar route on the 2-CPU machine of the docs), so one process keeps
one uvicorn worker saturated with room to spare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from urllib.parse import urlsplit

__all__ = ["LoadClient"]


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class _Connection(asyncio.Protocol):
    __slots__ = ("buf", "client", "length", "need", "sent_at", "status", "transport")

    def __init__(self, client: LoadClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.need = -1  # bytes of the whole response once its head is parsed, else -1
        self.length = 0  # its body's
        self.status = b""
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.client.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = buf
                    return
                head = buf[:end].lower()
                self.status = head[9:12]
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self.client.fail("response without Content-Length")
                    self.buf = b""
                    assert self.transport is not None
                    self.transport.close()
                    return
                stop = head.find(b"\r\n", at + 17)
                self.length = int(head[at + 17 : stop if stop > 0 else len(head)])
                self.need = end + 4 + self.length
            if len(buf) < self.need:
                self.buf = buf
                return
            self.client.done(self.status, self.sent_at, self.length)
            buf = buf[self.need :]
            self.need = -1
            if self.client.running:
                self._send()
            if not buf:
                self.buf = b""
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client.lost(self)


class LoadClient:
    """``connections`` keep-alive connections sending ``GET path`` one at a time each."""

    def __init__(self, url: str, connections: int, headers: list[str] | None = None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        extra = "".join(f"{h}\r\n" for h in headers or ())
        self.request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{extra}\r\n".encode()
        self.connections = connections
        self.running = True
        self.measuring = False
        self.requests = 0
        self.errors = 0
        self.reconnects = 0
        self.statuses: dict[str, int] = {}
        self.latencies: list[float] = []
        self.body_bytes = 0
        self.failures: list[str] = []
        self._conns: set[_Connection] = set()

    async def open(self) -> None:
        await asyncio.gather(*(self._connect() for _ in range(self.connections)))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        self._conns.add(conn)

    def done(self, status: bytes, sent_at: float, body_bytes: int) -> None:
        if not self.measuring:
            return
        now = time.perf_counter()
        self.requests += 1
        self.latencies.append(now - sent_at)
        self.body_bytes = body_bytes
        if status != b"200":
            self.errors += 1
            key = status.decode(errors="replace")
            self.statuses[key] = self.statuses.get(key, 0) + 1

    def fail(self, why: str) -> None:
        self.errors += 1
        if len(self.failures) < 5:
            self.failures.append(why)

    def lost(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        if self.running:
            self.errors += 1
            self.reconnects += 1
            asyncio.get_running_loop().create_task(self._connect())

    def close(self) -> None:
        self.running = False
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.close()

    async def measure(self, warmup_s: float, seconds: float) -> dict[str, object]:
        await self.open()
        await asyncio.sleep(warmup_s)
        print(json.dumps({"phase": "measuring"}), flush=True)
        cpu0, t0 = _cpu_s(), time.perf_counter()
        self.measuring = True
        await asyncio.sleep(seconds)
        self.measuring = False
        cpu1, t1 = _cpu_s(), time.perf_counter()
        print(json.dumps({"phase": "done"}), flush=True)
        self.close()
        elapsed = t1 - t0
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            if not lat:
                return float("nan")
            return round(lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] * 1000, 3)

        self.statuses["200"] = self.requests - sum(self.statuses.values())
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": self.requests / elapsed,
            "seconds": round(elapsed, 3),
            "connections": self.connections,
            "statuses": self.statuses,
            "reconnects": self.reconnects,
            "failures": self.failures,
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "max_ms": pct(100),
            "cpu_cores": round((cpu1 - cpu0) / elapsed, 3),
            "bytes": self.body_bytes,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("connections", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--header", action="append", default=[], help='"Name: value"')
    args = parser.parse_args()
    import uvloop

    client = LoadClient(args.url, args.connections, args.header)
    result = uvloop.run(client.measure(args.warmup, args.seconds))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
