"""The load generator: many agent streams from one process, as real gateways would send.

Each :class:`FleetAgent` is one agent with its own gRPC connection (a local subchannel
pool, like ``der_sdk_agent``), one ``AgentLink.Stream``, and telemetry sent as
**pre-encoded** ``AgentMessage`` bytes: the sample part of every message is encoded once,
per asset, when the fleet is built; a batch is spliced together from those bytes with the
timestamp and seq fields that change. Batches go by column (``TelemetryColumns``, as
``der_sdk_agent`` sends them to a headend that reads columns), or as rows (``--rows``, as
older agents send them). The stream's request serializer is the identity, so nothing is
encoded on the hot path but the time stamps and seqs.

:func:`make_fleet` builds the inventory (sites, assets, agents) and writes it as YAML for
the headend. :class:`Fleet` connects the agents, drives telemetry at a rate (or flat out),
answers setpoints like an agent that applies them at once, and counts what comes back.
With :class:`ClientTls` every agent dials over mutual TLS with its own client certificate
(the handshake and the record encryption run in gRPC's C core, as in ``der_sdk_agent``).

Run standalone it is a load process (used by the dispatch benchmark to add ingest load
from a second process)::

    python -m bench.loadgen --target 127.0.0.1:50051 --inventory fleet.json --rate 20000 \
        --seconds 30 [--tls PKI_DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import msgspec
import yaml

from der_sdk import certs
from der_sdk.wire import pb

__all__ = [
    "AgentSpec",
    "ClientTls",
    "Fleet",
    "FleetAgent",
    "FleetSpec",
    "encode_batch",
    "encode_columns_batch",
    "make_fleet",
]

NAMESPACE = uuid.UUID("6f1d7c1e-8b0e-4c1c-9a53-2a4bde5e0b01")
METHOD = "/der.v1.AgentLink/Stream"
CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),  # one connection per agent, as in the field
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
)
T0_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
DETAILS = msgspec.json.encode({"soc_pct": 55.5, "soh_pct": 98.5, "energy_mwh": 2.2})


# ----------------------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class AgentSpec:
    agent_id: str
    site_id: str
    asset_ids: tuple[str, ...]


@dataclass(frozen=True)
class FleetSpec:
    agents: tuple[AgentSpec, ...]

    @property
    def assets(self) -> int:
        return sum(len(a.asset_ids) for a in self.agents)

    def inventory(self) -> dict[str, Any]:
        sites = [
            {"site_id": a.site_id, "name": f"bench site {i}"} for i, a in enumerate(self.agents)
        ]
        assets = [
            {
                "asset_id": asset_id,
                "site_id": a.site_id,
                "name": f"bench bess {i}.{j}",
                "asset_type": "bess",
                "capacity_mwh": 4.0,
                "max_mw": 2.0,
                "min_mw": -2.0,
            }
            for i, a in enumerate(self.agents)
            for j, asset_id in enumerate(a.asset_ids)
        ]
        return {"sites": sites, "assets": assets}

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write the headend inventory (YAML) and this spec (JSON); return both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        inventory = directory / "assets.yaml"
        inventory.write_text(yaml.safe_dump(self.inventory(), sort_keys=False))
        spec = directory / "fleet.json"
        spec.write_text(
            json.dumps(
                [
                    {"agent_id": a.agent_id, "site_id": a.site_id, "asset_ids": a.asset_ids}
                    for a in self.agents
                ]
            )
        )
        return inventory, spec

    @classmethod
    def read(cls, path: Path) -> FleetSpec:
        return cls(
            tuple(
                AgentSpec(d["agent_id"], d["site_id"], tuple(d["asset_ids"]))
                for d in json.loads(path.read_text())
            )
        )

    def slice(self, start: int, stop: int) -> FleetSpec:
        return FleetSpec(self.agents[start:stop])


def make_fleet(agents: int, assets_per_agent: int, *, prefix: str = "bench") -> FleetSpec:
    """``agents`` agents, each alone on its site with ``assets_per_agent`` batteries."""

    def uid(name: str) -> str:
        return str(uuid.uuid5(NAMESPACE, f"{prefix}/{name}"))

    return FleetSpec(
        tuple(
            AgentSpec(
                agent_id=f"{prefix}-agent-{i:05d}",
                site_id=uid(f"site-{i}"),
                asset_ids=tuple(uid(f"asset-{i}-{j}") for j in range(assets_per_agent)),
            )
            for i in range(agents)
        )
    )


@dataclass(frozen=True)
class ClientTls:
    """Mutual TLS for a fleet: the CA that signed the headend's certificate and each
    agent's key and certificate (PEM) by agent id, read once before anything connects."""

    root: bytes
    pairs: Mapping[str, tuple[bytes, bytes]]

    @classmethod
    def read(cls, directory: Path, spec: FleetSpec) -> ClientTls:
        """The files :func:`der_sdk.certs.issue_agent` wrote in ``directory`` for the
        agents of ``spec`` (each certificate's CN is its agent id)."""
        pairs = {}
        for agent in spec.agents:
            stem = certs.agent_files(agent.agent_id)
            pairs[agent.agent_id] = (
                (directory / f"{stem}.key").read_bytes(),
                (directory / f"{stem}.pem").read_bytes(),
            )
        return cls((directory / certs.CA_CERT_FILE).read_bytes(), pairs)

    def channel(self, agent_id: str, target: str) -> grpc.aio.Channel:
        key, chain = self.pairs[agent_id]
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root, private_key=key, certificate_chain=chain
        )
        return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


# ----------------------------------------------------------------------------- encoding


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _sample_template(asset_id: str, site_id: str) -> bytes:
    """A ``Telemetry`` message without ``ts_us`` (field 3) and ``seq`` (field 9)."""
    return pb.Telemetry(
        asset_id=asset_id,
        site_id=site_id,
        mw=0.75,
        mw_setpoint=0.75,
        online=True,
        status="running",
        quality="good",
        details_json=DETAILS,
    ).SerializeToString()


def _columns_template(asset_ids: list[str], site_id: str, ticks: int) -> bytes:
    """The ``TelemetryColumns`` of ``ticks`` ticks of every asset without ``ts_us`` and
    ``seq``, which :func:`encode_columns_batch` appends per batch: the same samples as
    :func:`_sample_template` makes, by column."""
    n = ticks * len(asset_ids)
    return pb.TelemetryColumns(
        count=n,
        asset_ids=asset_ids,
        asset=list(range(len(asset_ids))) * ticks if len(asset_ids) > 1 else [],
        site_ids=[site_id],
        mw=[0.75] * n,
        mw_setpoint=[0.75] * n,
        online=[True] * n,
        statuses=["running"],
        status=[1] * n,
        details_json=b"[" + b",".join([DETAILS] * n) + b"]",
    ).SerializeToString()


def encode_columns_batch(
    template: bytes,
    assets: int,
    seq: int,
    ts_us: int,
    ticks: int,
    tick_us: int = 1_000_000,
) -> bytes:
    """An ``AgentMessage{telemetry}`` of the samples of :func:`_columns_template` by column
    (what an agent sends a headend that reads columns): the template's bytes with the
    time stamps and seqs appended (protobuf merges concatenated messages), as
    :func:`encode_batch` numbers them."""
    n = ticks * assets
    varying = pb.TelemetryColumns(
        ts_us=[ts_us + k * tick_us for k in range(ticks) for _ in range(assets)],
        seq=range(seq * 100_000 + 1, seq * 100_000 + n + 1),
    ).SerializeToString()
    columns = template + varying
    batch = b"\x08" + _varint(seq) + b"\x32" + _varint(len(columns)) + columns
    return b"\x12" + _varint(len(batch)) + batch


def encode_batch(
    templates: list[bytes], seq: int, ts_us: int, ticks: int, tick_us: int = 1_000_000
) -> bytes:
    """An ``AgentMessage{telemetry}`` of ``ticks`` samples of every template, spliced from
    pre-encoded bytes: for tick ``k`` each sample gets ``ts_us + k*tick_us`` and a seq."""
    parts: list[bytes] = []
    n = 0
    for k in range(ticks):
        ts = b"\x18" + _varint(ts_us + k * tick_us)
        for template in templates:
            n += 1
            body = template + ts + b"\x48" + _varint(seq * 100_000 + n)
            parts.append(b"\x12" + _varint(len(body)) + body)
    batch = b"\x08" + _varint(seq) + b"".join(parts)
    return b"\x12" + _varint(len(batch)) + batch


# ----------------------------------------------------------------------------- one agent


@dataclass
class AgentStats:
    registered_at: float | None = None
    batches_sent: int = 0
    batches_acked: int = 0
    samples_acked: int = 0
    setpoints: int = 0
    error: str | None = None


class FleetAgent:
    """One agent: a connection, a stream, a register, then whatever the fleet drives."""

    def __init__(
        self,
        spec: AgentSpec,
        target: str,
        *,
        ticks_per_batch: int,
        window: int,
        on_outcome_ack: Callable[[str, float], None] | None = None,
        auto_apply: bool = True,
        tls: ClientTls | None = None,
        columns: bool = True,
    ) -> None:
        self.spec = spec
        self.target = target
        self.tls = tls
        self.ticks = ticks_per_batch
        self.window = window
        self.stats = AgentStats()
        self.samples_per_batch = ticks_per_batch * len(spec.asset_ids)
        self._templates = [_sample_template(a, spec.site_id) for a in spec.asset_ids]
        # By column (as der_sdk_agent sends them) unless told otherwise or the headend's
        # RegisterAck does not say it reads columns.
        self.columns = columns
        self._columns_template = _columns_template(
            list(spec.asset_ids), spec.site_id, ticks_per_batch
        )
        self._on_outcome_ack = on_outcome_ack
        self._auto_apply = auto_apply
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._inflight = asyncio.Semaphore(window)
        self._seq = 0
        self._ts_us = T0_US + (hash(spec.agent_id) % 1000) * 1000
        self.registered = asyncio.Event()
        self.closed = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"fleet-{self.spec.agent_id}")

    async def close(self) -> None:
        await self._out.put(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._channel is not None:
            await self._channel.close(grace=None)

    def register_bytes(self) -> bytes:
        return pb.AgentMessage(
            register=pb.Register(
                agent_id=self.spec.agent_id,
                site_id=self.spec.site_id,
                assets=[pb.ServedAsset(asset_id=a, adapter="bench") for a in self.spec.asset_ids],
                sdk_version="bench",
                stream_id=f"{self.spec.agent_id}-stream",
            )
        ).SerializeToString()

    async def send_batch(self) -> None:
        """Send one batch; wait first while ``window`` batches are unacknowledged."""
        await self._inflight.acquire()
        if self.closed.is_set():  # the stream ended: nothing will acknowledge it
            return
        self._seq += 1
        if self.columns:
            message = encode_columns_batch(
                self._columns_template, len(self.spec.asset_ids), self._seq, self._ts_us, self.ticks
            )
        else:
            message = encode_batch(self._templates, self._seq, self._ts_us, self.ticks)
        self._ts_us += self.ticks * 1_000_000
        self.stats.batches_sent += 1
        self._out.put_nowait(message)

    def send_raw(self, message: bytes) -> None:
        self._out.put_nowait(message)

    async def _requests(self) -> Any:
        yield self.register_bytes()
        while True:
            message = await self._out.get()
            if message is None:
                return
            yield message

    async def _run(self) -> None:
        if self.tls is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        else:
            self._channel = self.tls.channel(self.spec.agent_id, self.target)
        call = self._channel.stream_stream(
            METHOD,
            request_serializer=None,
            response_deserializer=pb.HeadendMessage.FromString,
        )(self._requests())
        try:
            async for message in call:
                self._received(message)
        except grpc.aio.AioRpcError as exc:
            self.stats.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.closed.set()
            self.registered.set()  # never leave a waiter hanging; stats.error says why
            for _ in range(self.window):  # nor a sender waiting for a window slot
                self._inflight.release()

    def _received(self, message: pb.HeadendMessage) -> None:
        kind = message.WhichOneof("msg")
        if kind == "telemetry_ack":
            self.stats.batches_acked += 1
            self.stats.samples_acked += self.samples_per_batch
            self._inflight.release()
        elif kind == "register_ack":
            if not message.register_ack.telemetry_columns:
                self.columns = False
            if message.register_ack.accepted:
                self.stats.registered_at = time.perf_counter()
            else:
                self.stats.error = f"refused: {message.register_ack.message}"
            self.registered.set()
        elif kind == "setpoint":
            self.stats.setpoints += 1
            if self._auto_apply:
                setpoint = message.setpoint
                self._out.put_nowait(
                    pb.AgentMessage(
                        setpoint_ack=pb.SetpointAck(
                            command_id=setpoint.command_id,
                            status="applied",
                            applied_mw=setpoint.mw,
                            ts_us=int(time.time() * 1e6),
                        )
                    ).SerializeToString()
                )
        elif kind == "outcome_ack" and self._on_outcome_ack is not None:
            self._on_outcome_ack(message.outcome_ack.command_id, time.perf_counter())


# ----------------------------------------------------------------------------- many agents


@dataclass
class Fleet:
    """Agents of ``spec`` against ``target``, all in this process; over mutual TLS with
    ``tls``. ``target`` may list several addresses separated by commas (the replicas of
    a cluster): agent ``i`` dials the ``i``-th, round-robin."""

    spec: FleetSpec
    target: str
    ticks_per_batch: int = 10
    window: int = 8
    on_outcome_ack: Callable[[str, float], None] | None = None
    tls: ClientTls | None = None
    columns: bool = True  # telemetry by column (as der_sdk_agent sends it), else rows
    agents: list[FleetAgent] = field(default_factory=list)

    async def connect(self, timeout_s: float = 60.0, *, concurrency: int | None = None) -> float:
        """Start every agent; return the seconds until the last one was registered.

        :raises RuntimeError: an agent was refused or its stream failed.
        """
        targets = [t.strip() for t in self.target.split(",")]
        self.agents = [
            FleetAgent(
                a,
                targets[i % len(targets)],
                ticks_per_batch=self.ticks_per_batch,
                window=self.window,
                on_outcome_ack=self.on_outcome_ack,
                tls=self.tls,
                columns=self.columns,
            )
            for i, a in enumerate(self.spec.agents)
        ]
        started = time.perf_counter()
        if concurrency is None:
            for agent in self.agents:
                agent.start()
        else:
            for i in range(0, len(self.agents), concurrency):
                group = self.agents[i : i + concurrency]
                for agent in group:
                    agent.start()
                await asyncio.gather(*(a.registered.wait() for a in group))
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(a.registered.wait() for a in self.agents))
        errors = [a for a in self.agents if a.stats.error]
        if errors:
            raise RuntimeError(
                f"{len(errors)} of {len(self.agents)} agents failed; first: "
                f"{errors[0].spec.agent_id}: {errors[0].stats.error}"
            )
        return max(a.stats.registered_at or started for a in self.agents) - started

    async def close(self) -> None:
        await asyncio.gather(*(a.close() for a in self.agents))

    @property
    def samples_acked(self) -> int:
        return sum(a.stats.samples_acked for a in self.agents)

    @property
    def samples_sent(self) -> int:
        return sum(a.stats.batches_sent * a.samples_per_batch for a in self.agents)

    async def drive(self, seconds: float, rate: float | None = None) -> None:
        """Send telemetry for ``seconds``: flat out (each agent keeps its window full) or
        at ``rate`` samples/s in total, spread over the agents round-robin."""
        deadline = time.perf_counter() + seconds
        if rate is None:

            async def pump(agent: FleetAgent) -> None:
                while time.perf_counter() < deadline and not agent.closed.is_set():
                    await agent.send_batch()

            await asyncio.gather(*(pump(a) for a in self.agents))
            return
        per_batch = self.agents[0].samples_per_batch
        interval = per_batch / rate
        start = time.perf_counter()
        n = 0
        while True:
            due = start + n * interval
            now = time.perf_counter()
            if now >= deadline:
                return
            if due > now:
                await asyncio.sleep(due - now)
            agent = self.agents[n % len(self.agents)]
            if agent._inflight.locked():
                n += 1
                continue
            await agent.send_batch()
            n += 1

    async def wait_acked(self, timeout_s: float) -> bool:
        """Wait until every sent batch is acknowledged; ``False`` on timeout."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if all(
                a.stats.batches_acked >= a.stats.batches_sent or a.closed.is_set()
                for a in self.agents
            ):
                return True
            await asyncio.sleep(0.05)
        return False


# ----------------------------------------------------------------------------- standalone


async def _main(args: argparse.Namespace) -> None:
    spec = FleetSpec.read(Path(args.fleet))
    tls = await asyncio.to_thread(ClientTls.read, Path(args.tls), spec) if args.tls else None
    fleet = Fleet(
        spec,
        args.target,
        ticks_per_batch=args.ticks,
        window=args.window,
        tls=tls,
        columns=not args.rows,
    )
    await fleet.connect(timeout_s=120)
    print(json.dumps({"ready": True}), flush=True)
    started = time.perf_counter()
    await fleet.drive(args.seconds, rate=args.rate or None)
    elapsed = time.perf_counter() - started
    await fleet.wait_acked(10)
    print(
        json.dumps(
            {
                "samples_sent": fleet.samples_sent,
                "samples_acked": fleet.samples_acked,
                "seconds": elapsed,
            }
        ),
        flush=True,
    )
    await fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", required=True, help="host:port, or several separated by commas (round-robin)"
    )
    parser.add_argument("--fleet", required=True, help="fleet.json written by FleetSpec.write")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="samples/s; 0 = flat out")
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument(
        "--rows", action="store_true", help="send telemetry as rows (older agents), not by column"
    )
    parser.add_argument(
        "--tls", default="", help="mutual TLS: the folder with ca.pem and the agents' certificates"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # Never outlive the benchmark that started this process by much.
    signal.alarm(int(args.seconds) + 180)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
