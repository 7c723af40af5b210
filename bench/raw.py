"""The raw limits: the same libraries doing the least the job needs, nothing of der-sdk.

Each mode is a server in its own process, started by :class:`bench.common.RawServer`.
It prints ``{"port": N}`` once it listens, then answers one JSON line per command read
from stdin (``stats``, ``push N``, ``quit``).

* ``ingest-pg DSN [WRITERS]``: ``AgentLink.Stream`` on grpc aio. Each ``TelemetryBatch``
  is decoded into COPY rows and queued; each writer (2 by default, as the headend) takes
  up to 5,000 rows, COPYs them into a temporary staging table, ``INSERT ... SELECT ...
  ON CONFLICT (asset_id, ts) DO NOTHING`` into a table like the headend's, commits, then
  acknowledges the batches.
  No inventory, no validation, no latest-sample cache, no sequence tracking.
* ``idle``: answers ``Register`` and then holds the stream open, doing nothing.
* ``push``: holds streams open; ``push N`` sends N ``Setpoint`` messages one at a time,
  each to a random stream, and times each until its ``SetpointAck`` is back.
* ``rest JSON_FILE``: a bare Litestar app on uvicorn (httptools, one worker, like the
  headend) serving the file's bytes at ``GET /telemetry/{asset_id}``.

    python -m bench.raw ingest-pg postgresql://postgres@127.0.0.1/der_bench_raw
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import msgspec
from litestar import Litestar, Response, get

from der_sdk.wire import pb

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WRITE_ROWS = 5000
QUEUE_ROWS = 50_000


@dataclass
class _Stream:
    outbox: asyncio.Queue[pb.HeadendMessage | None] = field(default_factory=asyncio.Queue)
    acks: dict[str, asyncio.Future[float]] = field(default_factory=dict)


class RawLink:
    """A minimal ``AgentLink.Stream`` server: register, then hand messages to ``on``."""

    def __init__(self) -> None:
        self.streams: list[_Stream] = []
        self.server: grpc.aio.Server | None = None

    async def start(self) -> int:
        handler = grpc.method_handlers_generic_handler(
            "der.v1.AgentLink",
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=pb.AgentMessage.FromString,
                    response_serializer=pb.HeadendMessage.SerializeToString,
                )
            },
        )
        self.server = grpc.aio.server(
            options=(
                ("grpc.so_reuseport", 0),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
            )
        )
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    async def _stream(self, requests: Any, context: Any) -> None:
        first = await anext(requests)
        register = first.register
        stream = _Stream()
        self.streams.append(stream)
        await context.write(
            pb.HeadendMessage(
                register_ack=pb.RegisterAck(
                    accepted=True,
                    accepted_asset_ids=[a.asset_id for a in register.assets],
                    telemetry_columns=True,
                )
            )
        )
        reader = asyncio.create_task(self._read(requests, stream))
        try:
            while (message := await stream.outbox.get()) is not None:
                await context.write(message)
        finally:
            reader.cancel()
            self.streams.remove(stream)

    async def _read(self, requests: Any, stream: _Stream) -> None:
        try:
            async for message in requests:
                await self.on(stream, message)
        finally:
            stream.outbox.put_nowait(None)

    async def on(self, stream: _Stream, message: pb.AgentMessage) -> None:
        kind = message.WhichOneof("msg")
        if kind == "setpoint_ack":
            future = stream.acks.pop(message.setpoint_ack.command_id, None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())


_split_array = msgspec.json.Decoder(list[msgspec.Raw]).decode


def _column_rows(c: pb.TelemetryColumns) -> list[tuple[Any, ...]]:
    """The rows of a batch sent by column: each column made a list in C, one table lookup
    per string column, the details array split into each sample's JSON text by msgspec
    (its values are not parsed, as the rows' ``details_json`` is passed on as it is)."""
    n = c.count

    def pick(table: Any, index: Any, default: str) -> list[str]:
        values = list(table) or [default]
        return list(map(values.__getitem__, index)) if index else [values[0]] * n

    def optional(table: Any, index: Any) -> list[str | None]:
        values = [None, *table]
        return list(map(values.__getitem__, index)) if index else [None] * n

    stamps = [EPOCH + timedelta(microseconds=t) for t in c.ts_us]
    setpoints: list[float | None] = list(c.mw_setpoint) if len(c.mw_setpoint) == n else [None] * n
    details = (
        [bytes(d).decode() for d in _split_array(c.details_json)] if c.details_json else ["{}"] * n
    )
    return list(
        zip(
            pick(c.asset_ids, c.asset, ""),
            pick(c.site_ids, c.site, ""),
            stamps,
            list(c.mw),
            setpoints,
            list(c.online),
            optional(c.statuses, c.status),
            optional(c.fault_codes, c.fault_code),
            list(c.seq) or [0] * n,
            pick(c.qualities, c.quality, "good"),
            optional(c.quality_reasons, c.quality_reason),
            details,
            strict=True,
        )
    )


class RawIngestPg(RawLink):
    def __init__(self, dsn: str, writers: int = 2) -> None:
        super().__init__()
        self.dsn = dsn
        self.writers = writers
        self.queue: deque[tuple[_Stream, int, list[tuple[Any, ...]]]] = deque()
        self.queued = 0
        self.space = asyncio.Condition()
        self.work = asyncio.Event()
        self.stored = 0
        self.batches = 0

    async def open(self) -> None:
        import asyncpg

        self.conns = [await asyncpg.connect(self.dsn) for _ in range(self.writers)]
        self.conn = self.conns[0]
        await self.conn.execute(
            "CREATE TABLE IF NOT EXISTS raw_telemetry ("
            " asset_id text NOT NULL, site_id text NOT NULL, ts timestamptz NOT NULL,"
            " mw double precision NOT NULL, mw_setpoint double precision, online boolean"
            " NOT NULL, status text, fault_code text, seq bigint NOT NULL, quality text NOT"
            " NULL, quality_reason text, details jsonb NOT NULL, PRIMARY KEY (asset_id, ts));"
            " CREATE INDEX IF NOT EXISTS raw_telemetry_ts ON raw_telemetry USING brin (ts)"
        )
        for conn in self.conns:
            await conn.execute(
                "CREATE TEMPORARY TABLE staging (LIKE raw_telemetry) ON COMMIT DELETE ROWS"
            )
        self.tasks = [asyncio.create_task(self._write_loop(conn)) for conn in self.conns]

    async def on(self, stream: _Stream, message: pb.AgentMessage) -> None:
        if message.WhichOneof("msg") != "telemetry":
            return
        batch = message.telemetry
        rows = [
            (
                s.asset_id,
                s.site_id,
                EPOCH + timedelta(microseconds=s.ts_us),
                s.mw,
                s.mw_setpoint if s.HasField("mw_setpoint") else None,
                s.online,
                s.status if s.HasField("status") else None,
                s.fault_code if s.HasField("fault_code") else None,
                s.seq,
                s.quality or "good",
                s.quality_reason if s.HasField("quality_reason") else None,
                s.details_json.decode() if s.details_json else "{}",
            )
            for s in batch.samples
        ]
        if batch.HasField("columns"):
            rows.extend(_column_rows(batch.columns))
        async with self.space:
            await self.space.wait_for(lambda: self.queued + len(rows) <= QUEUE_ROWS)
        self.queue.append((stream, batch.seq, rows))
        self.queued += len(rows)
        self.work.set()

    async def _write_loop(self, conn: Any) -> None:
        while True:
            while not self.queue:
                self.work.clear()
                await self.work.wait()
            items = []
            rows: list[tuple[Any, ...]] = []
            while self.queue and (not rows or len(rows) + len(self.queue[0][2]) <= WRITE_ROWS):
                item = self.queue.popleft()
                items.append(item)
                rows.extend(item[2])
            async with conn.transaction():
                await conn.copy_records_to_table("staging", records=rows)
                await conn.execute(
                    "INSERT INTO raw_telemetry SELECT * FROM staging"
                    " ON CONFLICT (asset_id, ts) DO NOTHING"
                )
            self.queued -= len(rows)
            self.stored += len(rows)
            async with self.space:
                self.space.notify_all()
            for stream, seq, _ in items:
                self.batches += 1
                stream.outbox.put_nowait(
                    pb.HeadendMessage(telemetry_ack=pb.TelemetryAck(seq=seq, stored_through=seq))
                )

    async def command(self, words: list[str]) -> dict[str, Any]:
        if words[0] == "stats":
            count = await self.conn.fetchval("SELECT count(*) FROM raw_telemetry")
            return {"samples_stored": self.stored, "rows": count, "batches": self.batches}
        return await super_command(self, words)


class RawPush(RawLink):
    async def command(self, words: list[str]) -> dict[str, Any]:
        if words[0] == "push":
            count = int(words[1])
            times: list[float] = []
            for i in range(count):
                stream = random.choice(self.streams)
                command_id = f"raw-{i}"
                future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                stream.acks[command_id] = future
                start = time.perf_counter()
                stream.outbox.put_nowait(
                    pb.HeadendMessage(setpoint=pb.Setpoint(command_id=command_id, mw=0.5))
                )
                times.append(await asyncio.wait_for(future, 10) - start)
                await asyncio.sleep(0.002)
            return {"latencies_s": times}
        return await super_command(self, words)


async def super_command(server: Any, words: list[str]) -> dict[str, Any]:
    if words[0] == "streams":
        return {"streams": len(server.streams)}
    return {"error": f"unknown command {words[0]!r}"}


async def _commands(server: Any) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        words = line.decode().split()
        if not words:
            continue
        if words[0] == "quit":
            print(json.dumps({"bye": True}), flush=True)
            return
        command = getattr(server, "command", None)
        result = await command(words) if command else await super_command(server, words)
        print(json.dumps(result), flush=True)


async def _grpc_mode(server: RawLink) -> None:
    if isinstance(server, RawIngestPg):
        await server.open()
    port = await server.start()
    print(json.dumps({"port": port}), flush=True)
    await _commands(server)
    assert server.server is not None
    await server.server.stop(grace=None)


async def _rest(path: Path) -> None:
    import uvicorn

    body = await asyncio.to_thread(path.read_bytes)

    @get("/telemetry/{asset_id:str}")
    async def latest(asset_id: str) -> Response[bytes]:
        return Response(body, media_type="application/json")

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    config = uvicorn.Config(
        Litestar([latest], openapi_config=None),
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
        log_config=None,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    await _commands(object())
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)


def main() -> None:
    mode = sys.argv[1]
    if mode == "ingest-pg":
        coro = _grpc_mode(RawIngestPg(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2))
    elif mode == "idle":
        coro = _grpc_mode(RawLink())
    elif mode == "push":
        coro = _grpc_mode(RawPush())
    elif mode == "rest":
        coro = _rest(Path(sys.argv[2]))
    else:
        sys.exit(f"unknown mode {mode!r}; one of ingest-pg, idle, push, rest")
    import uvloop

    uvloop.run(coro)


if __name__ == "__main__":
    main()
