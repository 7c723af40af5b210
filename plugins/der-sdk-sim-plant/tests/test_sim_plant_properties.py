"""Properties of every simulator, whatever the seed, the time and the setpoint: a
generator's output stays within [0, min(available, limit, max_mw)] and what the limit
takes off is reported; a station never exports and never draws beyond its limit, its
demand or its rating."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from der_sdk_sim_plant import SimEvChargerAdapter, SimPvAdapter, SimWindAdapter
from hypothesis import given, settings
from hypothesis import strategies as st
from plant_kit import EV, PV, WIND, FakeClock, build

from der_sdk.models import Asset, TelemetrySample

TOLERANCE = 1e-6
SIGN_TOLERANCE_MW = 1e-9
"""A setpoint within this of 0 counts as 0 (neither export nor import)."""
seeds = st.integers(min_value=0, max_value=2**32)
setpoints = st.floats(min_value=-5.0, max_value=5.0, allow_nan=False)
elapsed = st.integers(min_value=0, max_value=2 * 3600)
instants = st.integers(min_value=0, max_value=365 * 24).map(
    lambda h: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=h)
)


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _generator_sample(
    adapter: SimPvAdapter | SimWindAdapter,
    clock: FakeClock,
    asset: Asset,
    limit: float,
    seconds: int,
) -> TelemetrySample:
    """Apply ``limit``, let ``seconds`` pass, read: the bounds every generator keeps."""
    await adapter.connect()
    result = await adapter.apply_setpoint(limit)
    assert result.status == ("rejected" if limit < -SIGN_TOLERANCE_MW else "applied")
    clock.advance(seconds)
    sample = await adapter.read()
    details = sample.details
    available = details["available_mw"]
    assert 0.0 <= sample.mw <= available + TOLERANCE
    assert available <= asset.max_mw
    if result.status == "applied":
        assert sample.mw <= max(limit, 0.0) + TOLERANCE
    # mw + curtailed_mw is the available power, to the last reported digit
    assert sample.mw + details["curtailed_mw"] == pytest.approx(available, abs=1e-9)
    assert (details["curtailment_reason"] is None) == (details["curtailed_mw"] <= TOLERANCE)
    return sample


@settings(max_examples=60, deadline=None)
@given(seed=seeds, limit=setpoints, seconds=elapsed, when=instants)
def test_pv_output_stays_within_what_the_sun_the_limit_and_the_inverter_allow(
    seed: int, limit: float, seconds: int, when: datetime
) -> None:
    adapter, clock, _ = build(SimPvAdapter, PV, {"seed": seed, "trip_rate_per_h": 2})
    clock.wall = when
    _run(_generator_sample(adapter, clock, PV, limit, seconds))


@settings(max_examples=60, deadline=None)
@given(seed=seeds, limit=setpoints, seconds=elapsed)
def test_wind_output_stays_within_the_curve_the_limit_and_the_rating(
    seed: int, limit: float, seconds: int
) -> None:
    options = {"seed": seed, "turbulence_ms": 1.5, "mean_wind_ms": 14}
    adapter, clock, _ = build(SimWindAdapter, WIND, options)
    sample = _run(_generator_sample(adapter, clock, WIND, limit, seconds))
    assert 0.0 <= sample.details["wind_speed_ms"] <= 35.0
    if sample.details["turbine_state"] == "stopped_high_wind":
        assert sample.mw == 0.0


@settings(max_examples=40, deadline=None)
@given(seed=seeds, limit=setpoints, seconds=elapsed)
def test_a_station_never_exports_nor_draws_beyond_its_limit_demand_or_rating(
    seed: int, limit: float, seconds: int
) -> None:
    async def check() -> None:
        adapter, clock, _ = build(
            SimEvChargerAdapter,
            EV,
            {"seed": seed, "arrivals_per_h": 10, "initial_sessions": 2, "fault_rate_per_h": 1},
        )
        await adapter.connect()
        result = await adapter.apply_setpoint(limit)
        assert result.status == ("rejected" if limit > SIGN_TOLERANCE_MW else "applied")
        clock.advance(seconds)
        sample = await adapter.read()
        draw = -sample.mw
        details = sample.details
        assert 0.0 <= draw <= details["demand_mw"] + TOLERANCE
        assert draw <= abs(EV.min_mw) + TOLERANCE
        if result.status == "applied":
            assert draw <= -max(min(limit, 0.0), EV.min_mw) + TOLERANCE
        total = details["connectors_total"]
        assert details["active_sessions"] + details["connectors_available"] <= total

    _run(check())
