"""Helpers for the NATS plugin's tests: a NATS server of a test's own (``nats-server`` on
a free loopback port, for what the shared server cannot show: no JetStream, a password, a
kill), and the type of the ``open_nats_bus`` fixture."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from der_sdk_nats import NatsBus

from der_sdk.testing import free_port, services_required

OpenNatsBus = Callable[..., Awaitable[NatsBus]]
"""The ``open_nats_bus`` fixture: ``await open_nats_bus(url=None, **options)``."""


@asynccontextmanager
async def own_nats_server(*args: str) -> AsyncIterator[int]:
    """Run ``nats-server ARGS`` on a free port of 127.0.0.1; yield the port."""
    binary = shutil.which("nats-server")
    if binary is None:
        reason = "nats-server is not installed (apt-get install nats-server)"
        if services_required():
            pytest.fail(f"{reason}; DER_SDK_REQUIRE_SERVICES=1 requires it", pytrace=False)
        pytest.skip(reason)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        binary,
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(250):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            break
        else:
            pytest.fail(f"nats-server did not listen on {port} within 5 s", pytrace=False)
        yield port
    finally:
        process.kill()
        await process.wait()
