"""SunSpec: the scan finds the marker and walks the model chain; the adapter picks the
profiles and base addresses for what it found."""

from __future__ import annotations

import pytest
from der_sdk_modbus.link import ModbusLink
from der_sdk_modbus.sunspec import SunSpecModel, scan
from modbus_kit import SUNSPEC_BESS, MakeAdapter, Serve, good_sample

from der_sdk.extensions import DevicePoint, DeviceProfile


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_scan_finds_the_marker_and_every_model(serve: Serve, base: int) -> None:
    _device, server = await serve(SUNSPEC_BESS, sunspec_base=base, strict=True)
    link = ModbusLink("127.0.0.1", server.port, 1, timeout_s=1.0)
    await link.connect()
    try:
        found_base, models = await scan(lambda a, n: link.read("holding", a, n))
    finally:
        link.close()
    assert found_base == base
    assert models == [
        SunSpecModel(1, base + 2, 66),
        SunSpecModel(701, base + 70, 153),
        SunSpecModel(704, base + 225, 65),
        SunSpecModel(802, base + 292, 62),
    ]


async def test_scanned_battery_reads_every_core_field_in_two_requests(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    _device, server = await serve(SUNSPEC_BESS, rating_mw=2.0, ramp_s=0)
    adapter = make_adapter(server, sunspec_scan=True)
    await adapter.connect()
    sample = await good_sample(adapter)
    assert [m.model_id for m in adapter.sunspec_models] == [1, 701, 704, 802]
    assert adapter.point_map is not None
    assert adapter.point_map.profiles == (
        "sunspec-701 1.0.0",
        "sunspec-704 1.0.0",
        "sunspec-802 1.0.0",
        "sunspec-1 1.0.0",
    )
    # 701, 704 and 802 follow one another: the readable chain reads as two requests
    assert len(adapter.read_plan) == 2
    assert sample.online is True and sample.status == "standby" and sample.fault_code is None
    assert sample.mw_setpoint == 0.0
    assert sample.details["soc_pct"] == pytest.approx(50.0, abs=0.1)
    assert sample.details["frequency_hz"] == pytest.approx(50.0, abs=0.05)
    assert sample.details["serial_number"] == "SIM-001"
    assert "manufacturer" in sample.details
    # model 1 is static: read once per connection, not every poll
    assert all(b.start >= 40070 for b in adapter.read_plan)


async def test_devices_of_one_kind_share_one_compiled_map_and_another_layout_gets_its_own(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    servers = [(await serve(SUNSPEC_BESS, seed=seed))[1] for seed in (1, 2)]
    _, elsewhere = await serve(SUNSPEC_BESS, sunspec_base=50000)
    same = [make_adapter(server, sunspec_scan=True) for server in servers]
    other = make_adapter(elsewhere, sunspec_scan=True)
    for adapter in (*same, other):
        await adapter.connect()
        await good_sample(adapter)
    first, second = (a.point_map for a in same)
    assert first is not None and first is second  # compiled once, not per device
    assert other.point_map is not None and other.point_map is not first
    assert {p.address for p in other.point_map.polled}.isdisjoint({p.address for p in first.polled})
    assert all(b.start >= 50070 for b in other.read_plan)


async def test_legacy_inverter_103_is_read_too(serve: Serve, make_adapter: MakeAdapter) -> None:
    device, server = await serve(["sunspec-103"], rating_mw=0.5, ramp_s=0)
    adapter = make_adapter(server, sunspec_scan=True)
    await adapter.connect()
    sample = await good_sample(adapter)
    assert [m.model_id for m in adapter.sunspec_models] == [1, 103]
    assert sample.mw == pytest.approx(device.mw, abs=0.01)
    assert sample.mw > 0.2 and sample.status == "mppt"  # a PV inverter in the sun
    result = await adapter.apply_setpoint(0.1)
    assert result.status == "rejected" and "no writable point feeding mw_setpoint" in (
        result.reason or ""
    )


async def test_der_models_win_over_legacy_ones_for_the_same_field(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    device, server = await serve(["sunspec-103", "sunspec-701"], rating_mw=1.0, ramp_s=0)
    device.before_request = lambda _: device.set_value("W", 0.123, profile="sunspec-103")
    adapter = make_adapter(server, sunspec_scan=True)
    await adapter.connect()
    sample = await good_sample(adapter)
    assert device.value("W", profile="sunspec-103") == pytest.approx(0.123)
    assert sample.mw == pytest.approx(device.value("W", profile="sunspec-701"), abs=1e-6)
    assert sample.mw != pytest.approx(0.123, abs=0.01)


async def test_a_vendor_profile_can_build_on_sunspec_offsets(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    vendor = DeviceProfile(
        name="acme-sunspec",
        vendor="Acme",
        model="S",
        version="1.0",
        protocol="modbus",
        points={
            "W": DevicePoint(
                address=10,
                unit="W",
                field="mw",
                extra={"sunspec_model": 701, "type": "int16", "scale_factor": "W_SF"},
            ),
            "W_SF": DevicePoint(address=116, extra={"sunspec_model": 701, "type": "sunssf"}),
            "fan": DevicePoint(address=7, field="details.fan_rpm", extra={"table": "input"}),
        },
    )
    device, server = await serve(["sunspec-701", vendor], ramp_s=0)
    device.before_request = lambda _: device.set_raw(device.point("fan"), 1450)
    adapter = make_adapter(
        server, profile="acme-sunspec", sunspec_scan=True, profiles={"acme-sunspec": vendor}
    )
    await adapter.connect()
    sample = await good_sample(adapter)
    assert sample.details == {"fan_rpm": 1450}
    assert sample.mw == pytest.approx(device.value("W", profile="sunspec-701"), abs=1e-6)


async def test_a_device_without_sunspec_says_so(serve: Serve, make_adapter: MakeAdapter) -> None:
    _device, server = await serve(["acme-bess"], strict=True)
    adapter = make_adapter(server, sunspec_scan=True)
    await adapter.connect()
    sample = await adapter.read()
    assert sample.quality == "bad"
    assert "no SunSpec marker 'SunS' at 40000, 0, 50000" in (sample.quality_reason or "")
