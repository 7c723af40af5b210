"""Data types, byte and word orders, scaling and unit conversion: pure codec tests, then the
same values read through a real Modbus server."""

from __future__ import annotations

import math
import random
import struct

import pytest
from der_sdk_modbus.codec import Codec, canonical_type, sunspec_not_implemented
from modbus_kit import MakeAdapter, Serve, good_sample

from der_sdk.extensions import DevicePoint, DeviceProfile

ORDERS = {
    "ABCD": ("big", "big"),
    "CDAB": ("big", "little"),
    "BADC": ("little", "big"),
    "DCBA": ("little", "little"),
}


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        ("ABCD", [0x0102, 0x0304]),
        ("CDAB", [0x0304, 0x0102]),
        ("BADC", [0x0201, 0x0403]),
        ("DCBA", [0x0403, 0x0201]),
    ],
)
def test_32_bit_layouts_match_the_usual_byte_order_names(order: str, registers: list[int]) -> None:
    byte_order, word_order = ORDERS[order]
    codec = Codec.of("uint32", byte_order=byte_order, word_order=word_order)  # type: ignore[arg-type]
    assert codec.encode(0x01020304) == registers
    assert codec.decode(registers) == 0x01020304


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    ("data_type", "value"),
    [
        ("int16", -12345),
        ("uint16", 54321),
        ("int32", -123_456_789),
        ("uint32", 3_000_000_000),
        ("int64", -9_000_000_000_000_000_000),
        ("uint64", 18_000_000_000_000_000_000),
        ("float32", 3.25),
        ("float64", -1234.5678),
    ],
)
def test_every_type_round_trips_in_every_order(data_type: str, value: float, order: str) -> None:
    byte_order, word_order = ORDERS[order]
    codec = Codec.of(canonical_type(data_type), byte_order=byte_order, word_order=word_order)  # type: ignore[arg-type]
    registers = codec.encode(value)
    assert len(registers) == codec.registers
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert codec.decode(registers) == value


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "data_type",
    ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"],
)
@pytest.mark.parametrize("marked", [False, True])
def test_the_fast_reader_gives_what_decode_gives_at_any_offset(
    data_type: str, order: str, marked: bool
) -> None:
    byte_order, word_order = ORDERS[order]
    codec = Codec.of(
        data_type,  # type: ignore[arg-type]
        length=3 if data_type == "string" else None,
        byte_order=byte_order,  # type: ignore[arg-type]
        word_order=word_order,  # type: ignore[arg-type]
        not_implemented=sunspec_not_implemented(data_type) if marked else None,
    )
    rng = random.Random(f"{data_type}{order}{marked}")
    words = [rng.choice([0, 1, 0x7FFF, 0x8000, 0xFFFF, rng.randrange(0x10000)]) for _ in range(64)]
    marker = sunspec_not_implemented(data_type)
    if marked and marker is not None:  # the marker itself, in this layout, somewhere
        words[10 : 10 + codec.registers] = codec.from_bytes(
            marker.to_bytes(2 * codec.registers, "big")
        )
    read = codec.reader()
    for offset in range(len(words) - codec.registers + 1):
        expected = codec.decode(words[offset : offset + codec.registers])
        got = read(words, offset)
        if isinstance(expected, float) and math.isnan(expected):
            assert isinstance(got, float) and math.isnan(got)
        else:
            assert got == expected and type(got) is type(expected), (offset, got, expected)


def test_float32_big_endian_matches_ieee_754() -> None:
    codec = Codec.of("float32")
    assert codec.decode([0x4050, 0x0000]) == 3.25
    assert codec.to_bytes(codec.encode(-2.5)) == struct.pack(">f", -2.5)


def test_strings_are_padded_with_nul_and_trimmed() -> None:
    codec = Codec.of("string", length=4)
    registers = codec.encode("SN-42")
    assert registers == [0x534E, 0x2D34, 0x3200, 0x0000]
    assert codec.decode(registers) == "SN-42"
    with pytest.raises(ValueError, match="does not fit"):
        codec.encode("much too long")


def test_sunspec_types_map_to_plain_types_and_not_implemented_markers() -> None:
    assert canonical_type("sunssf") == "int16"
    assert canonical_type("acc32") == "uint32"
    assert canonical_type("bitfield32") == "uint32"
    marked = Codec.of("int16", not_implemented=sunspec_not_implemented("int16"))
    assert marked.decode([0x8000]) is None
    assert marked.decode([0x7FFF]) == 32767
    unsigned = Codec.of("uint32", not_implemented=sunspec_not_implemented("uint32"))
    assert unsigned.decode([0xFFFF, 0xFFFF]) is None
    floats = Codec.of("float32", not_implemented=sunspec_not_implemented("float32"))
    assert floats.decode([0x7FC0, 0x0000]) is None
    text = Codec.of("string", length=2, not_implemented=0)
    assert text.decode([0, 0]) is None
    with pytest.raises(ValueError, match="unknown data type 'int17'"):
        canonical_type("int17")


def test_encoding_refuses_values_the_type_cannot_hold() -> None:
    with pytest.raises(ValueError, match="out of range for int16"):
        Codec.of("int16").encode(40000)
    with pytest.raises(ValueError, match="out of range for uint16"):
        Codec.of("uint16").encode(-1)
    with pytest.raises(ValueError, match="whole number"):
        Codec.of("int32").encode(1.5)


# --------------------------------------------------------------------------- on the wire

TYPED_POINTS = {
    "i16": ("int16", "ABCD", -1234),
    "u16": ("uint16", "ABCD", 54321),
    "i32": ("int32", "CDAB", -123_456_789),
    "u32": ("uint32", "BADC", 3_000_000_000),
    "i64": ("int64", "DCBA", -1_234_567_890_123),
    "u64": ("uint64", "CDAB", 9_876_543_210_987),
    "f32": ("float32", "CDAB", 3.25),
    "f64": ("float64", "ABCD", -1234.5678),
}


def _typed_profile() -> DeviceProfile:
    points: dict[str, DevicePoint] = {
        "power": DevicePoint(
            address=0, unit="W", field="mw", extra={"type": "int32", "table": "input"}
        ),
        "label": DevicePoint(
            address=2, field="details.label", extra={"type": "string", "length": 4}
        ),
        "running": DevicePoint(address=5, field="online", extra={"table": "coil"}),
    }
    address = 10
    for name, (data_type, order, _) in TYPED_POINTS.items():
        byte_order, word_order = ORDERS[order]
        points[name] = DevicePoint(
            address=address,
            field=f"details.{name}",
            extra={"type": data_type, "byte_order": byte_order, "word_order": word_order},
        )
        address += 4
    return DeviceProfile(
        name="typed", vendor="Test", model="T", version="1.0", protocol="modbus", points=points
    )


async def test_every_type_and_order_reads_back_through_a_real_server(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    profile = _typed_profile()
    device, server = await serve([profile], noise=0.0)

    def put_values(_: object) -> None:  # after each physics step, as a device would hold them
        for name, (_, _, value) in TYPED_POINTS.items():
            device.set_raw(device.point(name), value)
        device.set_raw(device.point("label"), "DER-1")
        device.set_raw(device.point("power"), -1_500_000)  # W
        device.set_raw(device.point("running"), True)

    device.before_request = put_values
    adapter = make_adapter(server, profile="typed", profiles={"typed": profile})
    await adapter.connect()
    sample = await good_sample(adapter)
    for name, (_, _, value) in TYPED_POINTS.items():
        assert sample.details[name] == value, name
    assert sample.details["label"] == "DER-1"
    assert sample.mw == -1.5  # W → MW
    assert sample.online is True


def test_scale_factor_and_unit_conversion_are_exact_powers_of_ten() -> None:
    from der_sdk_modbus.points import compile_profile

    profile = DeviceProfile(
        name="scaled",
        vendor="Test",
        model="S",
        version="1.0",
        protocol="modbus",
        points={
            "W": DevicePoint(address=0, unit="W", field="mw", extra={"scale_factor": "W_SF"}),
            "W_SF": DevicePoint(address=1, extra={"type": "sunssf"}),
            "E": DevicePoint(address=2, unit="kWh", scale=0.0001, field="details.energy_mwh"),
            "K": DevicePoint(address=3, unit="kW", field="details.ac_mw"),
        },
    )
    points = {p.name: p for p in compile_profile(profile)}
    assert points["W"].to_field(1234, -3) == 1.234e-6  # 1.234 W
    assert points["W"].to_field(1234, 2) == 0.1234  # 123400 W
    assert points["W"].to_field(1234, None) is None  # a scale factor without a value
    assert points["W"].to_raw(0.75, -1) == 7_500_000
    assert points["E"].to_field(12345, None) == pytest.approx(1.2345)
    assert math.isclose(points["E"].to_raw(1.2345, None), 12345)
    assert points["K"].to_field(1500, None) == 1.5  # no scale of its own: converted by unit
