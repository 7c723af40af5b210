"""Fixtures for the headend tests: a real headend on ephemeral ports (memory storage), an
HTTP client for its REST API, and raw gRPC agents dialling it.

``headend`` needs no REST token (loopback, empty token file: ``HEADEND_AUTH=auto`` is off).
``auth_headend`` runs with ``HEADEND_AUTH=on`` and one token per role (``role_tokens``).
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from headend_kit import (
    INVENTORY_YAML,
    TOKENS_FILE,
    WAIT_S,
    ConnectAgent,
    Observer,
    RawAgent,
    make_config,
    make_observer_plugin,
)

from der_sdk.plugins import Plugins, load_plugins
from der_sdk_headend import Headend
from der_sdk_headend.tokens import ROLES, TokenFileStore


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
def headend_env() -> dict[str, str]:
    """Settings of ``headend`` beyond the test defaults; a test module overrides it."""
    return {}


@pytest.fixture
async def headend(
    inventory_path: Path, plugins: Plugins, headend_env: dict[str, str]
) -> AsyncIterator[Headend]:
    server = Headend(make_config(inventory_path, **headend_env), plugins=plugins)
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


@pytest.fixture
def tokens_path(inventory_path: Path) -> Path:
    """The token file of the test headends (beside the inventory)."""
    return inventory_path.parent / TOKENS_FILE


@pytest.fixture
def role_tokens(tokens_path: Path) -> dict[str, str]:
    """One active token per role, written before the headend starts: role -> secret."""
    store = TokenFileStore(tokens_path)
    return {role: store.create(role=role, name=f"test {role}")[1] for role in ROLES}


@pytest.fixture
async def auth_headend(
    inventory_path: Path, plugins: Plugins, role_tokens: dict[str, str]
) -> AsyncIterator[Headend]:
    """A headend with ``HEADEND_AUTH=on`` and the tokens of ``role_tokens``."""
    server = Headend(make_config(inventory_path, HEADEND_AUTH="on"), plugins=plugins)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def auth_http(auth_headend: Headend) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``auth_headend`` that sends no token (pass ``headers=bearer(...)``)."""
    async with httpx.AsyncClient(base_url=auth_headend.http_url, timeout=WAIT_S) as client:
        yield client
