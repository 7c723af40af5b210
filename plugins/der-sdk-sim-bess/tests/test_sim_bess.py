"""The simulated battery: the pure model, the adapter around it, and its registration."""

from __future__ import annotations

import math

import msgspec
import pytest
from der_sdk_sim_bess import SimBattery, SimBessAdapter, SimBessOptions

from der_sdk import load_plugins
from der_sdk.extensions import AdapterContext
from der_sdk.models import Asset


def battery(
    *,
    capacity_mwh: float = 4.0,
    max_mw: float = 2.0,
    min_mw: float = -2.0,
    ramp_rate_mw_per_min: float | None = None,
    efficiency: float = 1.0,
    soc_pct: float = 50.0,
) -> SimBattery:
    return SimBattery(
        capacity_mwh=capacity_mwh,
        max_mw=max_mw,
        min_mw=min_mw,
        ramp_rate_mw_per_min=ramp_rate_mw_per_min,
        efficiency=efficiency,
        soc_pct=soc_pct,
    )


# --------------------------------------------------------------------------- model


def test_ramp_rate_limits_how_fast_output_moves() -> None:
    bess = battery(ramp_rate_mw_per_min=1.0)
    bess.set_setpoint(2.0)
    bess.step(30)  # 1 MW/min for 30 s
    assert bess.mw == pytest.approx(0.5)
    bess.step(60)
    assert bess.mw == pytest.approx(1.5)
    bess.step(60)  # reaches the setpoint part-way through and stays there
    assert bess.mw == pytest.approx(2.0)
    bess.set_setpoint(-2.0)
    bess.step(120)
    assert bess.mw == pytest.approx(0.0)
    bess.step(240)
    assert bess.mw == pytest.approx(-2.0)


def test_without_ramp_rate_output_steps_at_once() -> None:
    bess = battery()
    bess.set_setpoint(-1.5)
    bess.step(0.001)
    assert bess.mw == -1.5


def test_soc_integrates_with_round_trip_efficiency_split_evenly() -> None:
    bess = battery(capacity_mwh=10.0, efficiency=0.81, soc_pct=50.0)  # sqrt(eff) = 0.9
    bess.set_setpoint(-2.0)
    bess.step(3600)  # 2 MWh in at the terminals, 1.8 MWh stored
    assert bess.energy_mwh == pytest.approx(5.0 + 1.8)
    assert bess.soc_pct == pytest.approx(68.0)
    bess.set_setpoint(1.8)
    bess.step(3600)  # 1.8 MWh out at the terminals, 2.0 MWh drawn from the cells
    assert bess.energy_mwh == pytest.approx(6.8 - 2.0)
    assert bess.usable_energy_mwh == pytest.approx(4.8 * 0.9)


def test_a_full_cycle_returns_the_round_trip_efficiency() -> None:
    bess = battery(capacity_mwh=10.0, efficiency=0.81, soc_pct=0.0)
    bess.set_setpoint(-1.0)
    bess.step(3600)  # 1 MWh in
    bess.set_setpoint(1.0)
    delivered = 0.0
    while not bess.empty:
        bess.step(1.0)
        delivered += bess.mw / 3600 if bess.mw > 0 else 0.0
    assert delivered == pytest.approx(0.81, abs=1e-3)


def test_soc_integration_follows_the_ramp_and_its_zero_crossing() -> None:
    bess = battery(capacity_mwh=10.0, efficiency=0.64, ramp_rate_mw_per_min=2.0, soc_pct=50.0)
    bess.mw = 1.0
    bess.set_setpoint(-1.0)
    bess.step(60)  # 1 → -1 in 60 s: 30 s discharging (avg 0.5 MW), 30 s charging (avg 0.5)
    out_mwh = 0.5 * 30 / 3600
    in_mwh = 0.5 * 30 / 3600
    assert bess.energy_mwh == pytest.approx(5.0 - out_mwh / 0.8 + in_mwh * 0.8)


def test_stops_charging_when_full() -> None:
    bess = battery(capacity_mwh=1.0, soc_pct=99.0)
    bess.set_setpoint(-2.0)
    bess.step(60)  # would store 0.033 MWh; only 0.01 fits
    assert bess.soc_pct == 100.0
    assert bess.mw == 0.0
    assert bess.status == "full"
    assert bess.mw_setpoint == -2.0  # kept, but not followed
    bess.step(60)
    assert (bess.soc_pct, bess.mw) == (100.0, 0.0)
    bess.set_setpoint(1.0)
    bess.step(36)
    assert bess.mw == 1.0
    assert bess.soc_pct == pytest.approx(99.0)


def test_stops_discharging_when_empty() -> None:
    bess = battery(capacity_mwh=1.0, soc_pct=1.0)
    bess.set_setpoint(2.0)
    bess.step(60)
    assert bess.soc_pct == 0.0
    assert bess.mw == 0.0
    assert bess.status == "empty"
    bess.step(600)
    assert (bess.soc_pct, bess.mw) == (0.0, 0.0)
    bess.set_setpoint(-1.0)
    bess.step(36)
    assert bess.status == "charging"
    assert bess.soc_pct == pytest.approx(1.0)


def test_setpoints_are_clamped_to_limits() -> None:
    bess = battery(max_mw=2.0, min_mw=-1.0)
    assert bess.set_setpoint(5.0) == 2.0
    assert bess.set_setpoint(-5.0) == -1.0
    assert bess.set_setpoint(0.5) == 0.5
    with pytest.raises(ValueError, match="finite"):
        bess.set_setpoint(math.nan)


def test_status_follows_output() -> None:
    bess = battery()
    assert bess.status == "idle"
    bess.set_setpoint(1.0)
    bess.step(1)
    assert bess.status == "discharging"
    bess.set_setpoint(-1.0)
    bess.step(1)
    assert bess.status == "charging"


# --------------------------------------------------------------------------- adapter

ASSET = Asset(
    asset_id="ea24a015-a7de-4c6b-991d-d191f0888b02",
    site_id="ed7332b8-d686-44d3-938c-9ddfd76b4791",
    name="North BESS 1",
    capacity_mwh=2.0,
    max_mw=1.0,
    min_mw=-1.0,
    ramp_rate_mw_per_min=0.5,
    efficiency=0.9,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_adapter(options: object = None) -> tuple[SimBessAdapter, FakeClock]:
    clock = FakeClock()
    adapter = SimBessAdapter(AdapterContext(asset=ASSET, options=options), clock=clock)
    return adapter, clock


async def test_adapter_steps_by_the_monotonic_clock_on_each_read() -> None:
    adapter, clock = make_adapter(SimBessOptions(initial_soc_pct=40.0))
    await adapter.connect()
    result = await adapter.apply_setpoint(1.0)
    assert result.status == "applied"
    assert result.applied_mw == 1.0
    assert result.reason is None
    clock.now += 60  # 0.5 MW/min ramp
    sample = await adapter.read()
    assert sample.mw == pytest.approx(0.5)
    assert sample.mw_setpoint == 1.0
    assert sample.status == "discharging"
    assert sample.online and sample.quality == "good"
    assert sample.asset_id == ASSET.asset_id and sample.site_id == ASSET.site_id
    assert sample.ts.tzinfo is not None
    drawn = 0.25 * 60 / 3600 / math.sqrt(0.9)
    assert sample.details["soc_pct"] == pytest.approx(40.0 - drawn / 2.0 * 100, abs=1e-5)
    assert sample.details["soh_pct"] == 100.0
    assert sample.details["energy_mwh"] == pytest.approx(0.8 - drawn, abs=1e-8)
    assert 25.0 < sample.details["inverter_temp_c"] < 60.0
    await adapter.close()


async def test_adapter_clamps_and_says_so() -> None:
    adapter, _ = make_adapter()
    await adapter.connect()
    result = await adapter.apply_setpoint(-3.0)
    assert result.status == "applied"
    assert result.applied_mw == -1.0
    assert result.reason == "clamped to [-1.0, 1.0] MW"
    assert (await adapter.apply_setpoint(math.inf)).status == "rejected"


async def test_timed_setpoint_returns_to_zero() -> None:
    adapter, clock = make_adapter()
    await adapter.connect()
    await adapter.apply_setpoint(0.5, duration_s=60)
    clock.now += 600
    sample = await adapter.read()
    assert sample.mw_setpoint == 0.0
    assert sample.mw == pytest.approx(0.0)
    assert sample.status == "idle"


async def test_details_are_valid_bess_details() -> None:
    from der_sdk.asset_types import BUILTIN_ASSET_TYPES, validate_details

    adapter, _ = make_adapter({"initial_soc_pct": 70})
    await adapter.connect()
    details = (await adapter.read()).details
    bess = next(t for t in BUILTIN_ASSET_TYPES if t.name == "bess")
    checked, problems = validate_details(bess, details)
    assert problems == []
    assert checked["soc_pct"] == 70.0


async def test_read_before_connect_is_a_bad_sample_not_a_stale_one() -> None:
    adapter, _ = make_adapter()
    sample = await adapter.read()
    assert sample.quality == "bad"
    assert sample.online is False
    assert (await adapter.apply_setpoint(0.5)).status == "failed"


async def test_noise_is_repeatable_with_a_seed() -> None:
    first, _ = make_adapter(SimBessOptions(noise_mw=0.1, seed=3))
    second, _ = make_adapter(SimBessOptions(noise_mw=0.1, seed=3))
    await first.connect()
    await second.connect()
    a, b = await first.read(), await second.read()
    assert a.mw == b.mw != 0.0


def test_options_refuse_unknown_and_out_of_range_values() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `initial_soc`"):
        msgspec.convert({"initial_soc": 10}, SimBessOptions)
    with pytest.raises(msgspec.ValidationError, match="<= 100"):
        msgspec.convert({"initial_soc_pct": 120}, SimBessOptions)


# --------------------------------------------------------------------------- registration


def test_entry_point_registers_sim_bess_adapter_type() -> None:
    plugins = load_plugins()
    assert "sim-bess" in plugins.adapter_types.names()
    assert plugins.adapter_types.provider("sim-bess") == "der-sdk-sim-bess"
    adapter_type = plugins.adapter_types.get("sim-bess")
    assert adapter_type.options is SimBessOptions
    adapter = adapter_type.factory(AdapterContext(asset=ASSET, options=SimBessOptions()))
    assert isinstance(adapter, SimBessAdapter)
    assert "der-sdk-sim-bess" in plugins.versions()
