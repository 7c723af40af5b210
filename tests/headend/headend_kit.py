"""Helpers for the headend tests: the inventory, a raw gRPC agent, deadlines.

Everything talks over 127.0.0.1 sockets, exactly like a deployed agent and operator.
Every wait has a deadline (:data:`WAIT_S`), so a broken headend fails a test quickly
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest

from der_sdk.extensions import StorageBackendType
from der_sdk.models import TelemetrySample
from der_sdk.storage.contract import StorageBackend
from der_sdk.wire import codec, pb
from der_sdk_headend import HeadendConfig

WAIT_S = 5.0
TOKENS_FILE = "tokens.json"

SITE_A = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
SITE_B = "7a2d3c4e-5f60-4718-9a2b-3c4d5e6f7a8b"
BESS_1 = "00000000-0000-4000-8000-000000000001"  # 4 MWh, ±2 MW
BESS_2 = "00000000-0000-4000-8000-000000000002"  # 2 MWh, ±1 MW
BESS_3 = "00000000-0000-4000-8000-000000000003"  # 2 MWh, ±0.5 MW
PV_1 = "00000000-0000-4000-8000-000000000004"  # site B, 0..5 MW
NOT_IN_INVENTORY = "00000000-0000-4000-8000-0000000000ff"
SITE_A_ASSETS = (BESS_1, BESS_2, BESS_3)

INVENTORY_YAML = f"""
sites:
  - site_id: {SITE_A}
    name: North Yard
  - site_id: {SITE_B}
    name: South Field
assets:
  - asset_id: {BESS_1}
    site_id: {SITE_A}
    name: BESS 1
    asset_type: bess
    capacity_mwh: 4.0
    max_mw: 2.0
    min_mw: -2.0
  - asset_id: {BESS_2}
    site_id: {SITE_A}
    name: BESS 2
    asset_type: bess
    capacity_mwh: 2.0
    max_mw: 1.0
    min_mw: -1.0
  - asset_id: {BESS_3}
    site_id: {SITE_A}
    name: BESS 3
    asset_type: bess
    capacity_mwh: 2.0
    max_mw: 0.5
    min_mw: -0.5
  - asset_id: {PV_1}
    site_id: {SITE_B}
    name: PV 1
    asset_type: pv
    max_mw: 5.0
    min_mw: 0.0
"""


def make_config(inventory_path: Path, **env: str) -> HeadendConfig:
    """Memory storage on 127.0.0.1, free ports, and a token file beside the inventory: with
    no token in it, REST authentication is off (``HEADEND_AUTH=auto`` on loopback)."""
    return HeadendConfig.from_env(
        {
            "ASSETS_PATH": str(inventory_path),
            "DATABASE_URL": "memory://",
            "HEADEND_GRPC_ADDR": "127.0.0.1:0",
            "HEADEND_HTTP_ADDR": "127.0.0.1:0",
            "HEADEND_TOKENS_FILE": str(inventory_path.parent / TOKENS_FILE),
            **env,
        }
    )


class Observer:
    """A plugin recording every observer hook call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def make_observer_plugin(observer: Observer) -> object:
    from der_sdk import hookimpl

    class ObserverPlugin:
        @hookimpl
        def der_telemetry_received(self, samples: Sequence[TelemetrySample]) -> None:
            observer.calls.append(("der_telemetry_received", {"samples": list(samples)}))

        @hookimpl
        def der_dispatch_validated(self, dispatch: Any) -> None:
            observer.calls.append(("der_dispatch_validated", {"dispatch": dispatch}))

        @hookimpl
        def der_agent_connected(self, sessions: Any, assets: Any) -> None:
            observer.calls.append(("der_agent_connected", {"sessions": sessions, "assets": assets}))

        @hookimpl
        def der_agent_disconnected(self, sessions: Any) -> None:
            observer.calls.append(("der_agent_disconnected", {"sessions": sessions}))

        @hookimpl
        def der_alarm_changed(self, alarm: Any, change: str) -> None:
            observer.calls.append(("der_alarm_changed", {"alarm": alarm, "change": change}))

    return ObserverPlugin()


def make_storage_plugin(scheme: str, storage: StorageBackend) -> object:
    """A plugin serving ``storage`` itself for ``<scheme>://`` URLs, so a test can write
    records into a memory backend and then start a headend on it."""
    from der_sdk import hookimpl

    class StoragePlugin:
        @hookimpl
        def der_storage_backends(self) -> list[StorageBackendType]:
            return [StorageBackendType(name=scheme, schemes=(scheme,), factory=lambda _: storage)]

    return StoragePlugin()


def make_exploding_observer_plugin(called: list[str]) -> object:
    """A plugin implementing every observer hook; each notes its call in ``called``, then
    raises ``RuntimeError("boom in HOOK")``."""
    from der_sdk import hookimpl, hookspecs

    def exploding(hook: str) -> Callable[[], None]:
        def explode() -> None:
            called.append(hook)
            raise RuntimeError(f"boom in {hook}")

        return hookimpl(explode)

    return SimpleNamespace(**{hook: exploding(hook) for hook in hookspecs.OBSERVER_HOOKS})


# --------------------------------------------------------------------------- a raw agent


def sample(
    asset_id: str, site_id: str = SITE_A, *, seconds: int = 0, **fields: Any
) -> TelemetrySample:
    base = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)
    values: dict[str, Any] = {"mw": 1.0, **fields}
    return TelemetrySample(
        asset_id=asset_id, site_id=site_id, ts=base + timedelta(seconds=seconds), **values
    )


STREAM_METHOD = "/der.v1.AgentLink/Stream"


def _to_wire(message: pb.AgentMessage | bytes) -> bytes:
    """A message serialized, or bytes sent as they are (garbage a hostile peer sends)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class RawAgent:
    """One AgentLink stream driven by hand, messages built with the codec (or raw bytes)."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] | None = None
    ) -> None:
        self.channel = channel
        self.call = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=_to_wire,
            response_deserializer=pb.HeadendMessage.FromString,
        )(metadata=metadata)

    async def send(self, message: pb.AgentMessage | bytes) -> None:
        await asyncio.wait_for(self.call.write(message), WAIT_S)

    async def recv(self) -> pb.HeadendMessage:
        message = await asyncio.wait_for(self.call.read(), WAIT_S)
        assert message is not grpc.aio.EOF, "the headend ended the stream"
        return message

    async def recv_kind(self, kind: str) -> Any:
        """The next message, which must be of ``kind`` (register_ack, setpoint...)."""
        message = await self.recv()
        assert message.WhichOneof("msg") == kind, message
        return getattr(message, kind)

    async def register(
        self, assets: Sequence[str], site_id: str = SITE_A, agent_id: str = "gw-1"
    ) -> pb.RegisterAck:
        await self.send(
            codec.agent_register(
                agent_id=agent_id,
                site_id=site_id,
                assets={a: "sim-bess" for a in assets},
                sdk_version="test",
                plugins={},
            )
        )
        ack: pb.RegisterAck = await self.recv_kind("register_ack")
        return ack

    async def telemetry(
        self, seq: int, samples: Sequence[TelemetrySample], *, columns: bool = False
    ) -> pb.TelemetryAck:
        await self.send(codec.agent_telemetry(seq, samples, columns=columns))
        ack: pb.TelemetryAck = await self.recv_kind("telemetry_ack")
        return ack

    async def end(self) -> grpc.StatusCode:
        """Half-close and wait for the headend to finish the call."""
        await asyncio.wait_for(self.call.done_writing(), WAIT_S)
        while True:
            message = await asyncio.wait_for(self.call.read(), WAIT_S)
            if message is grpc.aio.EOF:
                break
        code: grpc.StatusCode = await asyncio.wait_for(self.call.code(), WAIT_S)
        return code

    async def outcome(self) -> tuple[grpc.StatusCode, str]:
        """Read until the headend ends the call; its status code and details."""
        try:
            while await asyncio.wait_for(self.call.read(), WAIT_S) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            pass  # the status is read below
        code: grpc.StatusCode = await asyncio.wait_for(self.call.code(), WAIT_S)
        details: str = await asyncio.wait_for(self.call.details(), WAIT_S)
        return code, details


ConnectAgent = Callable[[], Awaitable[RawAgent]]


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, deadline_s: float = WAIT_S
) -> None:
    """Wait until ``check()`` is true, failing with ``what`` after ``deadline_s``.

    For state the headend changes on its own time (a cancelled stream's cleanup); the
    REST API offers no event to wait on, so this polls, always under a deadline.
    """
    try:
        async with asyncio.timeout(deadline_s):
            while not await check():  # noqa: ASYNC110 - no event to wait on over REST
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {deadline_s}s waiting until {what}")


def bearer(secret: str) -> dict[str, str]:
    """The ``Authorization`` header for a REST token."""
    return {"Authorization": f"Bearer {secret}"}


async def agents_by_asset(http: httpx.AsyncClient) -> Mapping[str, dict[str, Any]]:
    response = await http.get("/agents")
    assert response.status_code == 200, response.text
    return {row["asset_id"]: row for row in response.json()}


# ----------------------------------------------------------------------------- console forms

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


async def csrf_of(http: httpx.AsyncClient, path: str = "/console/dispatch") -> str:
    """The CSRF token a console page carries."""
    response = await http.get(path)
    assert response.status_code == 200, response.text
    found = CSRF_META.search(response.text)
    assert found, "the page carries its CSRF token"
    return found.group(1)


async def post_form(
    http: httpx.AsyncClient, path: str, fields: dict[str, Any], *, htmx: bool = True
) -> httpx.Response:
    """Post a console form as a browser would: with the page's CSRF token."""
    token = await csrf_of(http)
    headers = {"HX-Request": "true"} if htmx else {}
    data = {"csrf_token": token, **{k: str(v) for k, v in fields.items()}}
    return await http.post(path, data=data, headers=headers)


def preview_rows(html: str) -> list[tuple[str, float]]:
    """(asset id, target MW) of each row of a console split preview."""
    rows = re.findall(
        r'<tr data-asset-id="([^"]+)"><td>[^<]*</td><td class="num" data-target-mw>([^<]+)</td>',
        html,
    )
    return [(asset_id, float(mw)) for asset_id, mw in rows]
