"""Fixtures for the agent tests: assets, fast configs, test plugins, a fake headend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from der_sdk import hookimpl, load_plugins
from der_sdk.agent_config import AgentConfig, AssetAdapterConfig
from der_sdk.extensions import (
    Adapter,
    AdapterContext,
    AdapterType,
    ConditionReporter,
    EdgeService,
    EdgeServiceContext,
    EdgeServiceType,
    SetpointResult,
)
from der_sdk.models import Asset, TelemetrySample, utc_now
from der_sdk.plugins import Plugins
from der_sdk_agent.agent import Agent
from tests.agent.fake_headend import FakeHeadend

SITE = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
OTHER_SITE = "7a2d3c4b-5e6f-4a1b-9c8d-1e2f3a4b5c6d"
A1 = "00000000-0000-4000-8000-000000000001"
A2 = "00000000-0000-4000-8000-000000000002"
UNSERVED = "00000000-0000-4000-8000-0000000000ff"

# Capacity 2 : 6, so a capacity-weighted split gives A1 a quarter; A1 tops out at 1 MW.
ASSET_1 = Asset(asset_id=A1, site_id=SITE, name="BESS 1", capacity_mwh=2.0, max_mw=1.0, min_mw=-1.0)
ASSET_2 = Asset(asset_id=A2, site_id=SITE, name="BESS 2", capacity_mwh=6.0, max_mw=4.0, min_mw=-4.0)
ASSETS = (ASSET_1, ASSET_2)


def flaky_config(**overrides: Any) -> AgentConfig:
    """:func:`fast_config` with both assets on the ``test-flaky`` adapter (its writes are
    recorded in the :class:`FaultBox`)."""
    assets = {a: AssetAdapterConfig(adapter="test-flaky") for a in (A1, A2)}
    return fast_config(assets=assets, **overrides)


def fast_config(**overrides: Any) -> AgentConfig:
    """An agent config with short intervals so tests finish in a few seconds."""
    values: dict[str, Any] = {
        "telemetry_interval_s": 0.05,
        "heartbeat_interval_s": 0.2,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.2,
    }
    values.update(overrides)
    return AgentConfig(**values)


def site_inventory(*agents: str, extra: str = "") -> str:
    """An inventory of ``SITE`` with A1 and A2 (plus ``extra`` asset lines), bound to
    ``agents`` (inventory binding entries) when given."""
    bound = "".join(f"      - {entry}\n" for entry in agents)
    return f"""\
sites:
  - site_id: {SITE}
    name: Test Site
{"    agents:" + chr(10) + bound if agents else ""}assets:
  - {{asset_id: {A1}, site_id: {SITE}, name: BESS 1, capacity_mwh: 2, max_mw: 1, min_mw: -1}}
  - {{asset_id: {A2}, site_id: {SITE}, name: BESS 2, capacity_mwh: 6, max_mw: 4, min_mw: -4}}
{extra}"""


# ----------------------------------------------------------------------------- test adapter


class FlakyOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    port: int = 502


@dataclass
class FaultBox:
    """Faults to inject into every ``test-flaky`` adapter, and what they saw."""

    connect_error: Exception | None = None
    read_error: Exception | None = None
    apply_error: Exception | None = None
    apply_delay_s: float = 0.0
    read_fields: dict[str, Any] = field(default_factory=dict)
    """Fields every read reports instead of the adapter's own (e.g. ``mw=nan``)."""
    connects: int = 0
    closes: int = 0
    applied: list[tuple[str, float, float | None]] = field(default_factory=list)
    conditions: dict[str, ConditionReporter] = field(default_factory=dict)
    """Each adapter's condition reporter, by asset id: raise and clear through it as the
    adapter would."""


class FlakyAdapter(Adapter):
    def __init__(self, context: AdapterContext, box: FaultBox) -> None:
        self.asset = context.asset
        self.options = context.options
        self.box = box
        self.mw = 0.0
        box.conditions[context.asset.asset_id] = context.conditions

    async def connect(self) -> None:
        self.box.connects += 1
        if self.box.connect_error is not None:
            raise self.box.connect_error

    async def read(self) -> TelemetrySample:
        if self.box.read_error is not None:
            raise self.box.read_error
        fields: dict[str, Any] = {"mw": self.mw, **self.box.read_fields}
        return TelemetrySample(
            asset_id=self.asset.asset_id, site_id=self.asset.site_id, ts=utc_now(), **fields
        )

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        if self.box.apply_delay_s:
            await asyncio.sleep(self.box.apply_delay_s)
        if self.box.apply_error is not None:
            raise self.box.apply_error
        self.mw = mw
        self.box.applied.append((self.asset.asset_id, mw, duration_s))
        return SetpointResult(status="applied", applied_mw=mw)

    async def close(self) -> None:
        self.box.closes += 1


class FlakyAdapterPlugin:
    """A plugin object providing the ``test-flaky`` adapter type."""

    def __init__(self, box: FaultBox) -> None:
        self.box = box

    @hookimpl
    def der_adapter_types(self) -> list[AdapterType]:
        return [
            AdapterType(
                name="test-flaky",
                factory=lambda ctx: FlakyAdapter(ctx, self.box),
                options=FlakyOptions,
            )
        ]


# ----------------------------------------------------------------------------- test service


class RecorderOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fail_start: bool = False


@dataclass
class ServiceRecord:
    context: EdgeServiceContext | None = None
    started: bool = False
    stopped: bool = False
    batches: list[list[TelemetrySample]] = field(default_factory=list)


class RecorderService(EdgeService):
    def __init__(self, context: EdgeServiceContext, record: ServiceRecord) -> None:
        self.context = context
        self.record = record
        record.context = context

    async def start(self) -> None:
        if self.context.options.fail_start:
            raise RuntimeError("port 4840 is already in use")
        self.record.started = True

    async def stop(self) -> None:
        self.record.stopped = True

    def on_telemetry(self, samples: Sequence[TelemetrySample]) -> None:
        self.record.batches.append(list(samples))


class RecorderServicePlugin:
    """A plugin object providing the ``test-recorder`` edge service."""

    def __init__(self, record: ServiceRecord) -> None:
        self.record = record

    @hookimpl
    def der_edge_services(self) -> list[EdgeServiceType]:
        return [
            EdgeServiceType(
                name="test-recorder",
                factory=lambda ctx: RecorderService(ctx, self.record),
                options=RecorderOptions,
            )
        ]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def box() -> FaultBox:
    return FaultBox()


@pytest.fixture
def record() -> ServiceRecord:
    return ServiceRecord()


@pytest.fixture
def plugins(box: FaultBox, record: ServiceRecord) -> Plugins:
    """Installed plugins (sim-bess) plus the test adapter and edge service."""
    loaded = load_plugins(env={})
    loaded.register(FlakyAdapterPlugin(box), "test-adapters")
    loaded.register(RecorderServicePlugin(record), "test-services")
    return loaded


@pytest.fixture
async def headend() -> AsyncIterator[FakeHeadend]:
    async with FakeHeadend() as server:
        yield server


MakeAgent = Callable[..., Agent]


@pytest.fixture
async def make_agent(plugins: Plugins) -> AsyncIterator[MakeAgent]:
    """Build agents (gateway for ``SITE`` by default); every one is stopped afterwards.

    Their buffer is in memory unless ``buffer_path`` is given."""
    made: list[Agent] = []

    def make(
        headend: str,
        *,
        assets: Sequence[Asset] = ASSETS,
        config: AgentConfig | None = None,
        agent_id: str = "gateway-test",
        site_id: str = SITE,
        **kwargs: Any,
    ) -> Agent:
        agent = Agent(
            agent_id=agent_id,
            site_id=site_id,
            assets=assets,
            headend=headend,
            config=config or fast_config(),
            plugins=plugins,
            **kwargs,
        )
        made.append(agent)
        return agent

    yield make
    async with asyncio.timeout(10):
        await asyncio.gather(*(agent.stop() for agent in made))
