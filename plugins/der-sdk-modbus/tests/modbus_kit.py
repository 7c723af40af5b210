"""Helpers and fixtures for the Modbus plugin's tests: real pymodbus servers on loopback
(the plugin's own simulator), adapters built the way the agent builds them, test profiles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import pytest_asyncio
from der_sdk_modbus import ModbusAdapter
from der_sdk_modbus.simulator import ModbusSimServer, SimulatedDevice

from der_sdk import load_plugins
from der_sdk.device_packs import parse_profile
from der_sdk.extensions import AdapterContext, DeviceProfile
from der_sdk.models import Asset, TelemetrySample
from der_sdk.yamlconf import Issues, parse_yaml
from der_sdk_agent.adapters import convert_options

T = TypeVar("T")

PROFILES = Path(__file__).parent / "profiles"

ASSET = Asset(
    asset_id="aaaaaaaa-0000-4000-8000-00000000b001",
    site_id="11111111-1111-4111-8111-111111111111",
    name="Modbus BESS",
    capacity_mwh=4.0,
    max_mw=2.0,
    min_mw=-2.0,
)

SUNSPEC_BESS = ("sunspec-1", "sunspec-701", "sunspec-704", "sunspec-802")
"""A SunSpec battery inverter: common, DER AC measurement, DER controls, battery."""


def load_test_profile(filename: str) -> DeviceProfile:
    label = str(PROFILES / filename)
    issues = Issues(label)
    profile = parse_profile(parse_yaml((PROFILES / filename).read_text(), label), issues)
    assert profile is not None, [str(i) for i in issues.items]
    return profile


_INSTALLED: dict[str, DeviceProfile] | None = None


def all_profiles() -> dict[str, DeviceProfile]:
    """Installed profiles plus the test profiles, keyed ``name@version``."""
    global _INSTALLED
    if _INSTALLED is None:
        installed = {f"{p.name}@{p.version}": p for p in load_plugins().device_profiles}
        for path in sorted(PROFILES.glob("*.yaml")):
            profile = load_test_profile(path.name)
            installed[f"{profile.name}@{profile.version}"] = profile
        _INSTALLED = installed
    return dict(_INSTALLED)


def profile(name: str) -> DeviceProfile:
    """The highest version of ``name`` among :func:`all_profiles`."""
    from der_sdk_modbus.pack import find_profile

    return find_profile(all_profiles(), name)


async def eventually(
    probe: Callable[[], Awaitable[T]], *, within: float = 10.0, what: str = "condition"
) -> T:
    """Await ``probe`` until it returns something truthy; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last  # type: ignore[no-any-return]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.02)


class Serve(Protocol):
    async def __call__(
        self, profiles: Iterable[str | DeviceProfile], **device: Any
    ) -> tuple[SimulatedDevice, ModbusSimServer]: ...


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a simulated device on a free loopback port: ``device, server = await
    serve(["acme-bess"], ramp_s=0)``. Stopped after the test."""
    servers: list[ModbusSimServer] = []

    async def start(
        profiles: Iterable[str | DeviceProfile], **device: Any
    ) -> tuple[SimulatedDevice, ModbusSimServer]:
        chosen = [profile(p) if isinstance(p, str) else p for p in profiles]
        device.setdefault("common_model", profile("sunspec-1"))
        device.setdefault("seed", 1)
        sim = SimulatedDevice(chosen, **device)
        server = ModbusSimServer(sim)
        await server.start()
        servers.append(server)
        return sim, server

    try:
        yield start
    finally:
        for server in servers:
            await server.stop()


class MakeAdapter(Protocol):
    def __call__(
        self,
        server: ModbusSimServer,
        *,
        asset: Asset = ...,
        profiles: Mapping[str, DeviceProfile] | None = None,
        **options: Any,
    ) -> ModbusAdapter: ...


@pytest_asyncio.fixture
async def make_adapter() -> AsyncIterator[MakeAdapter]:
    """Build a ``modbus`` adapter for a served device, options validated as the agent
    does; fast polling by default. Closed after the test."""
    built: list[ModbusAdapter] = []

    def make(
        server: ModbusSimServer,
        *,
        asset: Asset = ASSET,
        profiles: Mapping[str, DeviceProfile] | None = None,
        **options: Any,
    ) -> ModbusAdapter:
        from der_sdk_modbus import ModbusOptions

        raw = {
            "host": "127.0.0.1",
            "port": server.port,
            "poll_interval_s": 0.1,
            "timeout_s": 0.3,
            "retries": 0,
            **options,
        }
        validated = convert_options(raw, ModbusOptions, what="test adapter")
        adapter = ModbusAdapter(
            AdapterContext(
                asset=asset,
                options=validated,
                profiles=all_profiles() if profiles is None else profiles,
            )
        )
        built.append(adapter)
        return adapter

    try:
        yield make
    finally:
        for adapter in built:
            await adapter.close()


async def good_sample(adapter: ModbusAdapter, within: float = 5.0) -> TelemetrySample:
    async def probe() -> TelemetrySample | None:
        sample = await adapter.read()
        return sample if sample.quality == "good" else None

    return await eventually(probe, within=within, what="a good sample")


@pytest.fixture
def asset() -> Asset:
    return ASSET


class Recorder:
    """Reads an adapter every ``every_s`` in a task of its own and keeps every sample:
    ``async with Recorder(adapter) as rec: ...; rec.samples``."""

    def __init__(self, adapter: ModbusAdapter, every_s: float = 0.01) -> None:
        self.adapter = adapter
        self.every_s = every_s
        self.samples: list[TelemetrySample] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append(await self.adapter.read())
            await asyncio.sleep(self.every_s)

    async def __aenter__(self) -> Recorder:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def since(self, ts: Any) -> list[TelemetrySample]:
        """Samples stamped at or after ``ts``."""
        return [s for s in self.samples if s.ts >= ts]
