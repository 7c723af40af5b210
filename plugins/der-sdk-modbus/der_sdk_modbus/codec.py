"""Register codec: Modbus registers (16-bit words) to and from numbers and text.

Pure functions, no I/O. A value of ``n`` registers is decoded by putting its registers in
``word_order`` (``big``: the first register holds the most significant word), writing each
register in ``byte_order`` (``big``: high byte first, as the Modbus specification sends
it) and reading the resulting bytes big-endian. The four combinations are the usual
``ABCD`` (big, big), ``CDAB`` (word order little), ``BADC`` (byte order little) and
``DCBA`` (both little).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "DATA_TYPES",
    "SUNSPEC_TYPES",
    "ByteOrder",
    "Codec",
    "DataType",
    "WordOrder",
    "canonical_type",
]

DataType = Literal[
    "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
ByteOrder = Literal["big", "little"]
WordOrder = Literal["big", "little"]

DATA_TYPES: Final[dict[str, int]] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
}
"""Register count of each numeric type (``string`` takes a ``length``)."""

SUNSPEC_TYPES: Final[dict[str, str]] = {
    "sunssf": "int16",
    "enum16": "uint16",
    "bitfield16": "uint16",
    "acc16": "uint16",
    "count": "uint16",
    "raw16": "uint16",
    "pad": "uint16",
    "enum32": "uint32",
    "bitfield32": "uint32",
    "acc32": "uint32",
    "ipaddr": "uint32",
    "bitfield64": "uint64",
    "acc64": "uint64",
}
"""SunSpec type names and the plain type each is stored as."""

_SUNSPEC_NOT_IMPLEMENTED: Final[dict[str, int | None]] = {
    # SunSpec marks an unimplemented point with a fixed raw value per type; None: no marker
    "int16": 0x8000,
    "sunssf": 0x8000,
    "uint16": 0xFFFF,
    "enum16": 0xFFFF,
    "bitfield16": 0xFFFF,
    "count": 0xFFFF,
    "raw16": 0xFFFF,
    "acc16": 0,
    "int32": 0x8000_0000,
    "uint32": 0xFFFF_FFFF,
    "enum32": 0xFFFF_FFFF,
    "bitfield32": 0xFFFF_FFFF,
    "ipaddr": 0,
    "acc32": 0,
    "int64": 0x8000_0000_0000_0000,
    "uint64": 0xFFFF_FFFF_FFFF_FFFF,
    "bitfield64": 0xFFFF_FFFF_FFFF_FFFF,
    "acc64": 0,
    "float32": 0x7FC0_0000,
    "float64": 0x7FF8_0000_0000_0000,
    "pad": None,
}

_SIGNED: Final = {"int16", "int32", "int64"}
_FLOAT_FORMAT: Final = {"float32": ">f", "float64": ">d"}


def canonical_type(name: str) -> DataType:
    """The plain data type for ``name`` (a plain type or a SunSpec type name).

    :raises ValueError: ``name`` is neither.
    """
    lowered = name.strip().lower()
    lowered = SUNSPEC_TYPES.get(lowered, lowered)
    if lowered in DATA_TYPES or lowered == "string":
        return lowered  # type: ignore[return-value]
    known = ", ".join([*DATA_TYPES, "string", *SUNSPEC_TYPES])
    raise ValueError(f"unknown data type {name!r}; use one of {known}")


def sunspec_not_implemented(type_name: str) -> int | None:
    """The raw value SunSpec uses for "not implemented" for ``type_name``, if any."""
    return _SUNSPEC_NOT_IMPLEMENTED.get(type_name.strip().lower())


@dataclass(frozen=True, slots=True)
class Codec:
    """How one value sits in registers: its type, size and byte and word order.

    :param registers: the register count; fixed for numbers, the ``length`` for strings.
    :param not_implemented: a raw value (as an unsigned integer of the value's width, or
        the raw bit pattern for floats) that means "no value"; decoding gives ``None``.
        Strings of only NUL bytes are "no value" whenever this is set.
    """

    data_type: DataType
    registers: int
    byte_order: ByteOrder = "big"
    word_order: WordOrder = "big"
    not_implemented: int | None = None

    @classmethod
    def of(
        cls,
        data_type: DataType,
        *,
        length: int | None = None,
        byte_order: ByteOrder = "big",
        word_order: WordOrder = "big",
        not_implemented: int | None = None,
    ) -> Codec:
        """A codec for ``data_type``; ``length`` (registers) is required for strings only."""
        if data_type == "string":
            if length is None or length < 1:
                raise ValueError("a string needs a length of 1 or more registers")
            registers = length
        else:
            registers = DATA_TYPES[data_type]
            if length is not None and length != registers:
                raise ValueError(f"{data_type} takes {registers} register(s), not {length}")
        return cls(data_type, registers, byte_order, word_order, not_implemented)

    # ---------------------------------------------------------------- bytes

    def to_bytes(self, registers: Sequence[int]) -> bytes:
        """The value's bytes, most significant first, from its registers."""
        words = list(registers) if self.word_order == "big" else list(reversed(registers))
        fmt = f">{len(words)}H" if self.byte_order == "big" else f"<{len(words)}H"
        return struct.pack(fmt, *words)

    def from_bytes(self, data: bytes) -> list[int]:
        """The registers that hold ``data`` (the inverse of :meth:`to_bytes`)."""
        count = len(data) // 2
        fmt = f">{count}H" if self.byte_order == "big" else f"<{count}H"
        words = list(struct.unpack(fmt, data))
        return words if self.word_order == "big" else list(reversed(words))

    # ---------------------------------------------------------------- decode

    def decode(self, registers: Sequence[int]) -> int | float | str | None:
        """The value in ``registers`` (exactly :attr:`registers` of them); ``None`` when it
        is the not-implemented marker."""
        data = self.to_bytes(registers)
        if self.data_type == "string":
            if self.not_implemented is not None and not data.strip(b"\x00"):
                return None
            return data.split(b"\x00", 1)[0].decode("utf-8", errors="replace").strip()
        raw = int.from_bytes(data, "big")
        if self.not_implemented is not None and raw == self.not_implemented:
            return None
        float_format = _FLOAT_FORMAT.get(self.data_type)
        if float_format is not None:
            value = float(struct.unpack(float_format, data)[0])
            if self.not_implemented is not None and math.isnan(value):
                return None
            return value
        if self.data_type in _SIGNED and raw >= 1 << (16 * self.registers - 1):
            raw -= 1 << (16 * self.registers)
        return raw

    def reader(self) -> Callable[[Sequence[int], int], int | float | str | None]:
        """A function ``(registers, offset)`` giving what :meth:`decode` gives for the
        value at ``offset`` of ``registers`` (a whole read's registers), without slicing
        or packing bytes for integer types: a poll decodes every point this way."""
        count = self.registers
        if self.data_type == "string" or self.data_type in _FLOAT_FORMAT:
            decode = self.decode
            return lambda data, offset: decode(data[offset : offset + count])
        marker = self.not_implemented
        signed = self.data_type in _SIGNED
        if count == 1 and self.byte_order == "big":
            if signed:

                def int16(data: Sequence[int], offset: int) -> int | None:
                    raw = data[offset]
                    if raw == marker:
                        return None
                    return raw - 0x10000 if raw >= 0x8000 else raw

                return int16

            def uint16(data: Sequence[int], offset: int) -> int | None:
                raw = data[offset]
                return None if raw == marker else raw

            return uint16
        half, full = 1 << (16 * count - 1), 1 << (16 * count)
        if count == 2 and self.byte_order == "big":  # the usual 32-bit layouts
            high, low = (0, 1) if self.word_order == "big" else (1, 0)

            def int32(data: Sequence[int], offset: int) -> int | None:
                raw = data[offset + high] << 16 | data[offset + low]
                if raw == marker:
                    return None
                return raw - full if signed and raw >= half else raw

            return int32
        order = tuple(range(count)) if self.word_order == "big" else tuple(range(count - 1, -1, -1))
        swap = self.byte_order == "little"

        def integer(data: Sequence[int], offset: int) -> int | None:
            raw = 0
            for index in order:
                word = data[offset + index]
                if swap:
                    word = (word & 0xFF) << 8 | word >> 8
                raw = raw << 16 | word
            if raw == marker:
                return None
            return raw - full if signed and raw >= half else raw

        return integer

    # ---------------------------------------------------------------- encode

    def encode(self, value: int | float | str) -> list[int]:
        """The registers for ``value``.

        :raises ValueError: ``value`` does not fit the type (out of range, text too long,
            a fraction for an integer type).
        """
        if self.data_type == "string":
            data = str(value).encode("utf-8")
            size = 2 * self.registers
            if len(data) > size:
                raise ValueError(f"text of {len(data)} bytes does not fit {size} bytes")
            return self.from_bytes(data.ljust(size, b"\x00"))
        if isinstance(value, str):
            raise ValueError(f"{self.data_type} needs a number, got text {value!r}")
        float_format = _FLOAT_FORMAT.get(self.data_type)
        if float_format is not None:
            return self.from_bytes(struct.pack(float_format, float(value)))
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{self.data_type} needs a whole number, got {value}")
            value = int(value)
        bits = 16 * self.registers
        low, high = (
            (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            if self.data_type in _SIGNED
            else (0, (1 << bits) - 1)
        )
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range for {self.data_type} [{low}, {high}]")
        return self.from_bytes((value & ((1 << bits) - 1)).to_bytes(2 * self.registers, "big"))

    @property
    def max_magnitude(self) -> float:
        """The largest magnitude this type holds (for choosing scale factors)."""
        if self.data_type in _FLOAT_FORMAT:
            return 3.4e38 if self.data_type == "float32" else 1.7e308
        if self.data_type == "string":
            return 0.0
        bits = 16 * self.registers
        return float((1 << (bits - 1)) - 1 if self.data_type in _SIGNED else (1 << bits) - 1)
