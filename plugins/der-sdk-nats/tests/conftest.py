"""Fixtures for the NATS plugin's tests.

Every test that touches the shared NATS server gates on
:func:`der_sdk_nats.testing.require_nats`: without a server the tests skip with a reason,
and fail under ``DER_SDK_REQUIRE_SERVICES=1``. Each test works in a namespace of its own
and deletes its stream and bucket afterwards, since other runs share the server.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from der_sdk_nats import NatsBus
from der_sdk_nats.testing import require_nats
from nats_kit import OpenNatsBus

from der_sdk.bus import BusOptions


@pytest.fixture
def nats_url() -> str:
    return require_nats()


@pytest.fixture
async def open_nats_bus(nats_url: str) -> AsyncIterator[OpenNatsBus]:
    """``await open_nats_bus(url=None, **options)``: a connected bus in this test's namespace;
    every bus is closed and the namespace destroyed afterwards."""
    namespace = f"test-{secrets.token_hex(5)}"
    opened: list[NatsBus] = []

    async def open_one(url: str | None = None, **options: Any) -> NatsBus:
        bus = NatsBus.from_url(url or nats_url, BusOptions(namespace=namespace, **options))
        await bus.connect()
        opened.append(bus)
        return bus

    try:
        yield open_one
    finally:
        cleaner = NatsBus.from_url(nats_url, BusOptions(namespace=namespace))
        await cleaner.connect()
        await cleaner.destroy()
        await cleaner.close()
        for bus in opened:
            await bus.close()
