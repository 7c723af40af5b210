"""Fixtures for the headend tests: a real headend on ephemeral ports (memory storage), an
HTTP client for its REST API, and raw gRPC agents dialling it."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from headend_kit import (
    INVENTORY_YAML,
    WAIT_S,
    ConnectAgent,
    Observer,
    RawAgent,
    make_config,
    make_observer_plugin,
)

from der_sdk.plugins import Plugins, load_plugins
from der_sdk_headend import Headend


@pytest.fixture
def inventory_path(tmp_path: Path) -> Path:
    path = tmp_path / "assets.yaml"
    path.write_text(textwrap.dedent(INVENTORY_YAML))
    return path


@pytest.fixture
def observer() -> Observer:
    return Observer()


@pytest.fixture
def plugins(observer: Observer) -> Plugins:
    return load_plugins(
        entry_points=False, extra=[("test-observer", make_observer_plugin(observer))], env={}
    )


@pytest.fixture
async def headend(inventory_path: Path, plugins: Plugins) -> AsyncIterator[Headend]:
    server = Headend(make_config(inventory_path), plugins=plugins)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http(headend: Headend) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S) as client:
        yield client


@pytest.fixture
async def connect_agent(headend: Headend) -> AsyncIterator[ConnectAgent]:
    channels: list[grpc.aio.Channel] = []

    async def connect() -> RawAgent:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{headend.grpc_port}")
        channels.append(channel)
        return RawAgent(channel)

    yield connect
    for channel in channels:
        await channel.close()
