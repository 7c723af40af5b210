"""The setpoint path: MW → the device's unit and scale → the register, then the enable
registers; the device's power follows and the setpoint reads back."""

from __future__ import annotations

import pytest
from modbus_kit import SUNSPEC_BESS, MakeAdapter, Serve, eventually, good_sample

from der_sdk.extensions import DevicePoint, DeviceProfile


async def test_vendor_setpoint_writes_the_scaled_register_then_the_enable(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    device, server = await serve(["acme-bess@1.0.0"], rating_mw=2.0, ramp_s=0)
    adapter = make_adapter(server, profile="acme-bess@1.0.0")
    await adapter.connect()
    await good_sample(adapter)
    writes_before = len([r for r in device.recent if r.function in (6, 16)])

    result = await adapter.apply_setpoint(1.25)

    assert result.status == "applied" and result.applied_mw == 1.25 and result.reason is None
    assert device.raw(device.point("setpoint")) == 12_500  # 1250 kW in 0.1 kW steps
    assert device.read_registers("holding", 200, 2) == [0, 12_500]  # int32, high word first
    assert device.raw(device.point("control_enable")) == 1
    writes = [r for r in device.recent if r.function in (6, 16)][writes_before:]
    assert [(w.function, w.address, w.count) for w in writes] == [(16, 200, 2), (6, 202, 1)]
    assert device.target_mw == 1.25

    async def follows() -> bool:
        sample = await adapter.read()
        return sample.quality == "good" and sample.mw_setpoint == 1.25 and sample.mw > 1.2

    await eventually(follows, within=3, what="power to follow the setpoint")


async def test_sunspec_setpoint_uses_the_scale_factor_register_and_704_enables(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    device, server = await serve(SUNSPEC_BESS, rating_mw=2.0, ramp_s=0)
    adapter = make_adapter(server, sunspec_scan=True)
    await adapter.connect()
    await good_sample(adapter)
    scale = device.raw(device.point("WSet_SF"))
    assert isinstance(scale, int)

    result = await adapter.apply_setpoint(-0.8)

    assert result.status == "applied" and result.applied_mw == pytest.approx(-0.8)
    assert device.raw(device.point("WSet")) == round(-800_000 / 10**scale)
    assert device.raw(device.point("WSetMod")) == 1  # watts
    assert device.raw(device.point("WSetEna")) == 1  # enabled
    assert device.setpoint_mw == pytest.approx(-0.8)

    async def charging() -> bool:
        sample = await adapter.read()
        return (
            sample.quality == "good"
            and sample.mw_setpoint == pytest.approx(-0.8)
            and sample.mw < -0.75
            and sample.status == "running"
        )

    await eventually(charging, within=3, what="the battery to charge at 0.8 MW")


async def test_setpoints_are_clamped_to_the_asset_and_rounded_to_the_register(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    device, server = await serve(["acme-bess@1.0.0"], rating_mw=3.0)
    adapter = make_adapter(server, profile="acme-bess@1.0.0")
    await adapter.connect()
    clamped = await adapter.apply_setpoint(5.0)  # the asset allows [-2, 2] MW
    assert clamped.status == "applied" and clamped.applied_mw == 2.0
    assert "clamped to [-2, 2] MW" in (clamped.reason or "")
    rounded = await adapter.apply_setpoint(0.123456)
    assert rounded.status == "applied" and rounded.applied_mw == pytest.approx(0.1235)
    assert "rounded to the register's resolution" in (rounded.reason or "")
    assert device.raw(device.point("setpoint")) == 1235


async def test_a_setpoint_the_register_cannot_hold_is_rejected(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    small = DeviceProfile(
        name="small",
        vendor="T",
        model="T",
        version="1",
        protocol="modbus",
        points={
            "p": DevicePoint(address=0, unit="W", field="mw", extra={"type": "int16"}),
            "sp": DevicePoint(
                address=1, unit="W", access="w", field="mw_setpoint", extra={"type": "int16"}
            ),
        },
    )
    device, server = await serve([small])
    adapter = make_adapter(server, profile="small", profiles={"small": small})
    await adapter.connect()
    result = await adapter.apply_setpoint(1.0)  # 1 000 000 W in an int16
    assert result.status == "rejected"
    assert "out of range for int16" in (result.reason or "")
    ok = await adapter.apply_setpoint(0.02)
    assert ok.status == "applied" and device.raw(device.point("sp")) == 20_000


async def test_a_failed_write_is_reported_failed_with_the_reason(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    device, server = await serve(["acme-bess@1.0.0"])
    adapter = make_adapter(server, profile="acme-bess@1.0.0")
    await adapter.connect()
    device.inject_fault("exception", code=0x03, addresses=(200, 202))
    result = await adapter.apply_setpoint(1.0)
    assert result.status == "failed"
    assert "exception response 03 (illegal data value) to write holding 200..201" in (
        result.reason or ""
    )
    assert device.raw(device.point("control_enable")) == 0  # not enabled after a failed write


async def test_a_device_pack_profile_in_the_documented_format_reads_and_writes(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    """``register:`` for the table and ``scale`` for W → MW, as docs/device_packs.md
    writes profiles (the example pack's battery inverter)."""
    pytest.importorskip("der_sdk_example_pack", reason="needs der-sdk-example-pack installed")
    device, server = await serve(["example-bess-inverter"], rating_mw=2.0, ramp_s=0)
    adapter = make_adapter(server, profile="example-bess-inverter")
    await adapter.connect()
    sample = await good_sample(adapter)
    assert sample.status == "running" and sample.details["soc_pct"] == pytest.approx(50, abs=1)
    result = await adapter.apply_setpoint(-1.5)
    assert result.status == "applied" and result.applied_mw == -1.5
    assert device.raw(device.point("active_power_setpoint")) == -1_500_000  # W

    async def charging() -> bool:
        sample = await adapter.read()
        return sample.quality == "good" and sample.mw == pytest.approx(-1.5, abs=0.02)

    await eventually(charging, within=3, what="the inverter to charge at 1.5 MW")
