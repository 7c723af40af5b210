"""The agent's dispatch path per control kind: clamp to the kind's range before the
adapter, split a site within what each asset can do now (from its last reading), lift a
limit when a duration ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from der_sdk import load_plugins
from der_sdk.extensions import Adapter, SetpointResult
from der_sdk.models import Asset, TelemetrySample, utc_now
from der_sdk_agent.adapters import AdapterRuntime
from der_sdk_agent.dispatch import Dispatcher

SITE = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
PLUGINS = load_plugins(entry_points=False, env={})
CONTROLS = {t.name: t.control for t in PLUGINS.asset_types}


class Device(Adapter):
    """A device that reports what it is told to and remembers every command."""

    def __init__(self, asset: Asset, **details: Any) -> None:
        self.asset = asset
        self.mw = 0.0
        self.details = details
        self.applied: list[float] = []

    async def connect(self) -> None:
        pass

    async def read(self) -> TelemetrySample:
        return TelemetrySample(
            asset_id=self.asset.asset_id,
            site_id=self.asset.site_id,
            ts=utc_now(),
            mw=self.mw,
            details=dict(self.details),
        )

    async def apply_setpoint(self, mw: float, duration_s: float | None = None) -> SetpointResult:
        self.applied.append(mw)
        return SetpointResult(status="applied", applied_mw=mw)

    async def close(self) -> None:
        pass


def _asset(asset_id: str, asset_type: str, lo: float, hi: float, capacity: float = 0.0) -> Asset:
    return Asset(
        asset_id=asset_id,
        site_id=SITE,
        name=asset_id,
        asset_type=asset_type,
        min_mw=lo,
        max_mw=hi,
        capacity_mwh=capacity,
    )


def _dispatcher(*devices: Device, policy: str = "headroom") -> Dispatcher:
    runtimes = {
        d.asset.asset_id: AdapterRuntime(
            asset=d.asset, adapter=d, adapter_name="device", package="tests", timeout_s=1.0
        )
        for d in devices
    }
    return Dispatcher(
        agent_id="gw",
        site_id=SITE,
        runtimes=runtimes,
        policy=PLUGINS.split_policies.get(policy),
        controls=CONTROLS,
    )


async def test_a_negative_export_limit_reaches_the_adapter_as_zero() -> None:
    pv = Device(_asset("pv", "pv", 0.0, 5.0))
    outcome = await _dispatcher(pv).handle("c1", asset_id="pv", site_id=None, mw=-2.0)
    assert pv.applied == [0.0]
    assert outcome.allocations[0].mw == 0.0
    assert "export limit 0..5" in (outcome.reason or "")


async def test_a_positive_import_limit_reaches_the_adapter_as_zero() -> None:
    ev = Device(_asset("ev", "ev_charger", -1.0, 0.3))
    await _dispatcher(ev).handle("c1", asset_id="ev", site_id=None, mw=0.3)
    assert ev.applied == [0.0]


async def test_a_site_split_uses_each_assets_last_reading() -> None:
    bess = Device(_asset("bess", "bess", -2.0, 2.0, capacity=4.0), soc_pct=50.0)
    pv = Device(_asset("pv", "pv", 0.0, 5.0), curtailed_mw=1.0)
    pv.mw = 2.0  # 3 MW available now
    dispatcher = _dispatcher(bess, pv)
    for runtime in dispatcher.runtimes.values():
        await runtime.read()
    outcome = await dispatcher.handle("c1", asset_id=None, site_id=SITE, mw=4.0, duration_s=3600)
    shares = {a.asset_id: a.mw for a in outcome.allocations}
    # headroom up: bess 2 (2 MWh over 1 h, power-limited), pv 3 (available): 2 : 3
    assert shares == pytest.approx({"bess": 1.6, "pv": 2.4})
    charge = await dispatcher.handle("c2", asset_id=None, site_id=SITE, mw=-3.0)
    shares = {a.asset_id: a.mw for a in charge.allocations}
    assert shares["pv"] == 0.0, "PV is never asked to consume"
    assert shares["bess"] == -2.0
    assert charge.unallocated_mw == pytest.approx(-1.0)


async def test_when_a_duration_ends_a_limit_is_lifted_not_set_to_zero() -> None:
    pv = Device(_asset("pv", "pv", 0.0, 5.0))
    dispatcher = _dispatcher(pv)
    await dispatcher.handle("c1", asset_id="pv", site_id=None, mw=1.0, duration_s=0.05)
    for _ in range(100):
        if len(pv.applied) == 2:
            break
        await asyncio.sleep(0.01)
    assert pv.applied == [1.0, 5.0]
    await dispatcher.close()
