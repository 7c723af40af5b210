"""Modbus point maps: device profiles compiled into points the adapter can poll and write.

A :class:`~der_sdk.extensions.DeviceProfile` with ``protocol: modbus`` keeps its Modbus
settings in each point's ``extra`` (see :data:`EXTRA_KEYS` and ``docs/modbus.md``).
:func:`compile_profile` checks every setting and resolves references between points
(scale-factor registers, enable registers) and SunSpec model offsets; :class:`PointMap`
turns one poll's decoded values into telemetry fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Final, Literal

from der_sdk.errors import DerSdkError
from der_sdk.extensions import DevicePoint, DeviceProfile
from der_sdk_modbus.codec import (
    ByteOrder,
    Codec,
    WordOrder,
    canonical_type,
    sunspec_not_implemented,
)

__all__ = [
    "CORE_FIELDS",
    "EXTRA_KEYS",
    "Point",
    "PointMap",
    "ProfileError",
    "Table",
    "compile_profile",
    "merge_points",
    "sunspec_models_of",
]

Table = Literal["holding", "input", "coil", "discrete"]
Value = int | float | str | bool | None

REGISTER_TABLES: Final = ("holding", "input")
BIT_TABLES: Final = ("coil", "discrete")
_TABLE_NAMES: Final[dict[str, Table]] = {
    "holding": "holding",
    "holding_register": "holding",
    "holding_registers": "holding",
    "hr": "holding",
    "input": "input",
    "input_register": "input",
    "input_registers": "input",
    "ir": "input",
    "coil": "coil",
    "coils": "coil",
    "co": "coil",
    "discrete": "discrete",
    "discrete_input": "discrete",
    "discrete_inputs": "discrete",
    "di": "discrete",
}

EXTRA_KEYS: Final = (
    "register",
    "table",
    "type",
    "length",
    "byte_order",
    "word_order",
    "scale_factor",
    "sunspec_model",
    "static",
    "enum",
    "bits",
    "true_values",
    "not_implemented",
    "enable",
    "write_function",
)
"""The Modbus settings a point may carry in ``extra`` (documented in ``docs/modbus.md``)."""

CORE_FIELDS: Final = ("mw", "mw_setpoint", "online", "status", "fault_code")

_POWER_UNITS: Final = {"w": 1e-6, "kw": 1e-3, "mw": 1.0}
_ENERGY_UNITS: Final = {"wh": 1e-6, "kwh": 1e-3, "mwh": 1.0}
_WRITE_FUNCTIONS: Final = {"holding": (6, 16), "coil": (5, 15)}


class ProfileError(DerSdkError):
    """A Modbus profile cannot be used; the message names the profile, point and setting."""


@dataclass(eq=False, slots=True)
class Point:
    """One compiled point: where it lives on the device and what it feeds.

    Compared and hashed by identity, so a poll can key decoded values by point.
    ``unit_factor`` converts the device's unit to the field's (W → MW is ``1e-6``).
    """

    name: str
    profile: str
    table: Table
    address: int
    codec: Codec | None
    access: Literal["r", "w", "rw"]
    field: str | None = None
    unit: str | None = None
    scale: float = 1.0
    unit_factor: float = 1.0
    scale_point: Point | None = None
    enum: dict[int, str] = dataclass_field(default_factory=dict)
    bits: dict[int, str] = dataclass_field(default_factory=dict)
    true_values: frozenset[int] | None = None
    static: bool = False
    enable: tuple[tuple[Point, int], ...] = ()
    write_function: int | None = None
    sunspec_model: int | None = None

    @property
    def count(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the point spans."""
        return 1 if self.codec is None else self.codec.registers

    @property
    def end(self) -> int:
        """The first address after the point."""
        return self.address + self.count

    @property
    def readable(self) -> bool:
        return "r" in self.access

    @property
    def writable(self) -> bool:
        return "w" in self.access

    def label(self) -> str:
        return f"{self.profile}:{self.name} ({self.table} {self.address})"

    # ---------------------------------------------------------------- values

    def exponent(self, scale_factor: int | None) -> int | None:
        """The power of ten from the device's unit and scale factor to the field's:
        ``value = raw * scale * 10**exponent``; ``None`` when the scale-factor register has
        no value. Powers of ten are applied by exact division, so 1234 W reads 0.001234 MW
        rather than 0.0012339999."""
        if self.scale_point is not None:
            if scale_factor is None:
                return None
            return scale_factor + self.unit_exponent
        return self.unit_exponent

    @property
    def unit_exponent(self) -> int:
        return round(math.log10(self.unit_factor))

    def to_field(self, raw: Value, scale_factor: int | None) -> Value:
        """The field value for a decoded raw value (``None`` stays ``None``)."""
        if raw is None or isinstance(raw, str | bool):
            return raw
        if self.field in ("status", "fault_code", "online"):
            return raw
        exponent = self.exponent(scale_factor)
        if exponent is None:
            return None
        if exponent == 0 and self.scale == 1.0:
            return raw if not self.field_is_power_or_energy else float(raw)
        return _times_pow10(raw * self.scale, exponent)

    @property
    def field_is_power_or_energy(self) -> bool:
        return self.field is not None and _quantity(self.field) is not None

    def to_raw(self, value: float, scale_factor: int | None) -> int | float:
        """The raw register value for a field value, rounded to the register's resolution.

        :raises ValueError: the scale-factor register has no value.
        """
        exponent = self.exponent(scale_factor)
        if exponent is None:
            raise ValueError(f"scale factor {self.scale_point_name} is not implemented")
        raw = _times_pow10(value / self.scale, -exponent)
        if self.codec is not None and self.codec.data_type.startswith("float"):
            return raw
        return round(raw)

    @property
    def scale_point_name(self) -> str:
        return self.scale_point.name if self.scale_point is not None else "-"


_Convert = Callable[["Point", Value, "int | None"], Value]


_Field = tuple["Point", str, "str | None", "Point | None", _Convert]
"""One field of a poll's telemetry: its point, name, ``details`` key (or ``None``),
scale-factor point and the function from raw value and scale factor to the field's value."""


def _field_of(point: Point) -> _Field:
    name = point.field
    assert name is not None
    detail = name.removeprefix("details.") if name.startswith("details.") else None
    if name in ("online", "status", "fault_code") or point.enum:
        convert: _Convert = PointMap._field_value
    else:
        convert = _number(point)
    return (point, name, detail, point.scale_point, convert)


def _number(point: Point) -> _Convert:
    """:meth:`Point.to_field` for a numeric point with no enum, its constants worked out
    once (a scaled point still follows its scale factor at each poll)."""
    unit_exponent = point.unit_exponent
    scale = point.scale
    scaled = point.scale_point is not None
    power_or_energy = point.field_is_power_or_energy

    def convert(_point: Point, raw: Value, scale_factor: int | None) -> Value:
        if raw is None or isinstance(raw, str | bool):
            return raw
        if scaled:
            if scale_factor is None:
                return None
            exponent = scale_factor + unit_exponent
        else:
            exponent = unit_exponent
        if exponent == 0 and scale == 1.0:
            return float(raw) if power_or_energy else raw
        return _times_pow10(raw * scale, exponent)

    return convert


def _times_pow10(value: float, exponent: int) -> float:
    """``value * 10**exponent``, dividing for negative exponents: 1234 * 10**-6 would be
    0.0012339999..., 1234 / 10**6 is 0.001234."""
    power = float(10 ** abs(exponent))  # exact for |exponent| <= 22
    return value * power if exponent >= 0 else value / power


def _quantity(field_name: str) -> dict[str, float] | None:
    leaf = field_name.rsplit(".", 1)[-1]
    if field_name in ("mw", "mw_setpoint") or leaf.endswith("_mw"):
        return _POWER_UNITS
    if leaf.endswith("_mwh"):
        return _ENERGY_UNITS
    return None


# --------------------------------------------------------------------------- compiling


class _Checker:
    """Reads one point's settings and collects what is wrong with them."""

    def __init__(self, profile: DeviceProfile, name: str, point: DevicePoint) -> None:
        self.profile = profile
        self.name = name
        self.point = point
        self.extra: Mapping[str, Any] = point.extra
        self.problems: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.problems.append(f"point {self.name!r} {key}: {message}")

    def choice(self, key: str, allowed: Sequence[str], default: str) -> str:
        value = self.extra.get(key, default)
        if not isinstance(value, str) or value.lower() not in allowed:
            self.error(key, f"must be one of {', '.join(allowed)}, got {value!r}")
            return default
        return value.lower()

    def integer(self, key: str, *, minimum: int | None = None) -> int | None:
        value = self.extra.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(str(value), 0)
            except ValueError:
                self.error(key, f"must be a whole number, got {value!r}")
                return None
        if minimum is not None and value < minimum:
            self.error(key, f"must be {minimum} or more, got {value}")
            return None
        return value

    def int_keyed(self, key: str) -> dict[int, str]:
        value = self.extra.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(key, f"must map raw values to labels, got {type(value).__name__}")
            return {}
        result: dict[int, str] = {}
        for raw, label in value.items():
            try:
                number = raw if isinstance(raw, int) else int(str(raw), 0)
            except ValueError:
                self.error(key, f"key {raw!r} is not a whole number")
                continue
            result[number] = str(label)
        return result


def _address(checker: _Checker) -> int | None:
    address = checker.point.address
    if isinstance(address, str):
        try:
            address = int(address.strip(), 0)
        except ValueError:
            checker.error("address", f"must be a register number, got {address!r}")
            return None
    if not 0 <= address <= 0xFFFF:
        checker.error("address", f"must be 0-65535, got {address}")
        return None
    return address


def _compile_point(
    checker: _Checker, base: int, profile_name: str
) -> tuple[Point | None, str | None, dict[str, Any]]:
    """The point (references unresolved), its scale-factor name and its enable mapping."""
    extra = checker.extra
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    for key in unknown:
        checker.error(key, f"unknown Modbus setting; known settings: {', '.join(EXTRA_KEYS)}")
    address = _address(checker)
    table_key = "register" if "register" in extra else "table"
    if "register" in extra and "table" in extra and extra["register"] != extra["table"]:
        checker.error("table", f"says {extra['table']!r} but register says {extra['register']!r}")
    table_name = extra.get(table_key, "holding")
    table = _TABLE_NAMES.get(str(table_name).lower())
    if table is None:
        checker.error(table_key, f"must be holding, input, coil or discrete, got {table_name!r}")
        table = "holding"
    sunspec_model = checker.integer("sunspec_model", minimum=1)
    codec: Codec | None = None
    if table in REGISTER_TABLES:
        type_name = str(extra.get("type", "uint16"))
        try:
            data_type = canonical_type(type_name)
        except ValueError as exc:
            checker.error("type", str(exc))
            data_type = "uint16"
        byte_order: ByteOrder = (
            "big" if checker.choice("byte_order", ("big", "little"), "big") == "big" else "little"
        )
        word_order: WordOrder = (
            "big" if checker.choice("word_order", ("big", "little"), "big") == "big" else "little"
        )
        not_implemented = checker.integer("not_implemented")
        if not_implemented is None and sunspec_model is not None:
            not_implemented = sunspec_not_implemented(type_name)
        try:
            codec = Codec.of(
                data_type,
                length=checker.integer("length", minimum=1),
                byte_order=byte_order,
                word_order=word_order,
                not_implemented=not_implemented,
            )
        except ValueError as exc:
            checker.error("length", str(exc))
    elif "type" in extra and str(extra["type"]).lower() not in ("bool", "bit"):
        checker.error("type", f"a {table} is one bit; leave type out or write bool")

    point = checker.point
    field_name = point.field
    unit_factor = 1.0
    if field_name is not None:
        if not (field_name in CORE_FIELDS or field_name.startswith("details.")):
            checker.error(
                "field", f"{field_name!r}: use one of {', '.join(CORE_FIELDS)} or details.NAME"
            )
        quantity = _quantity(field_name)
        # value = raw * scale, as device profiles define it (W -> MW is scale 0.000001);
        # a point without a scale of its own is converted from its unit instead
        if quantity is not None and point.unit is not None and point.scale == 1.0:
            factor = quantity.get(point.unit.strip().lower())
            if factor is None:
                checker.error(
                    "unit",
                    f"{point.unit!r} cannot feed {field_name}; use {', '.join(quantity)} "
                    "(case-insensitive), or a scale that converts the raw value",
                )
            else:
                unit_factor = factor
        if codec is not None and codec.data_type == "string" and quantity is not None:
            checker.error("type", f"text cannot feed {field_name}")
    if point.scale == 0 or not math.isfinite(point.scale):
        checker.error("scale", f"must be a finite non-zero number, got {point.scale}")

    scale_factor = extra.get("scale_factor")
    if scale_factor is not None and not isinstance(scale_factor, str):
        checker.error("scale_factor", "must name the point that holds the scale factor")
        scale_factor = None
    enable = extra.get("enable") or {}
    if not isinstance(enable, Mapping):
        checker.error("enable", "must map point names to the values written after a setpoint")
        enable = {}
    write_function = checker.integer("write_function")
    if write_function is not None and write_function not in _WRITE_FUNCTIONS.get(table, ()):
        allowed = _WRITE_FUNCTIONS.get(table, ())
        checker.error(
            "write_function",
            f"{write_function} cannot write a {table}"
            + (f"; use {' or '.join(map(str, allowed))}" if allowed else ""),
        )
    true_values = extra.get("true_values")
    truths: frozenset[int] | None = None
    if true_values is not None:
        if not isinstance(true_values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in true_values
        ):
            checker.error("true_values", "must be a list of whole numbers")
        else:
            truths = frozenset(true_values)
    static = extra.get("static", False)
    if not isinstance(static, bool):
        checker.error("static", f"must be true or false, got {static!r}")
        static = False

    if checker.problems or address is None:
        return None, None, {}
    return (
        Point(
            name=checker.name,
            profile=profile_name,
            table=table,
            address=base + address,
            codec=codec,
            access=point.access,
            field=field_name,
            unit=point.unit,
            scale=point.scale,
            unit_factor=unit_factor,
            enum=checker.int_keyed("enum"),
            bits=checker.int_keyed("bits"),
            true_values=truths,
            static=static,
            write_function=write_function,
            sunspec_model=sunspec_model,
        ),
        scale_factor,
        dict(enable),
    )


def sunspec_models_of(profile: DeviceProfile) -> set[int]:
    """The SunSpec model ids the points of ``profile`` are relative to."""
    models: set[int] = set()
    for point in profile.points.values():
        model = point.extra.get("sunspec_model")
        if isinstance(model, int) and not isinstance(model, bool):
            models.add(model)
    return models


def compile_profile(
    profile: DeviceProfile,
    model_bases: Mapping[int, tuple[int, int]] | None = None,
) -> list[Point]:
    """Every point of ``profile``, checked, with references resolved.

    :param model_bases: for SunSpec-relative points: model id → ``(address of the
        model's ID register, model length L)`` as a scan found them. Points of a model the
        device does not have, or past the end of a shorter model, are left out.
    :raises ProfileError: the profile is not for Modbus, or a setting is wrong; the message
        lists every problem with the point and setting.
    """
    if profile.protocol.lower() != "modbus":
        raise ProfileError(
            f"device profile {profile.name!r} is for protocol {profile.protocol!r}, not modbus"
        )
    where = f"device profile {profile.name!r} {profile.version}"
    problems: list[str] = []
    unresolved: set[int] = set()
    compiled: dict[str, Point] = {}
    references: dict[str, tuple[str | None, dict[str, Any]]] = {}
    for name, device_point in profile.points.items():
        checker = _Checker(profile, name, device_point)
        model = checker.integer("sunspec_model", minimum=1)
        if checker.problems:
            problems.extend(checker.problems)
            continue
        base = 0
        if model is not None:
            if model_bases is None:
                unresolved.add(model)
                continue
            found = model_bases.get(model)
            if found is None:
                continue  # the device does not implement this model
            base = found[0]
        point, scale_factor, enable = _compile_point(checker, base, profile.name)
        problems.extend(checker.problems)
        if point is None:
            continue
        if model is not None and model_bases is not None:
            start, length = model_bases[model]
            if point.end > start + 2 + length:
                continue  # an older, shorter revision of the model
        compiled[name] = point
        references[name] = (scale_factor, enable)

    if unresolved:
        problems.insert(
            0,
            f"its points are relative to SunSpec model(s) "
            f"{', '.join(map(str, sorted(unresolved)))}; set sunspec_scan: true so the adapter "
            "finds where the models start on the device",
        )
    fed: dict[str, str] = {}
    for name, point in compiled.items():
        scale_name, enable = references[name]
        if scale_name is not None:
            target = compiled.get(scale_name)
            if target is None:
                if scale_name not in profile.points:
                    problems.append(f"point {name!r} scale_factor: no point {scale_name!r}")
            elif target.codec is None or target.codec.data_type not in ("int16", "int32"):
                problems.append(
                    f"point {name!r} scale_factor: {scale_name!r} must be an int16 register"
                )
            else:
                point.scale_point = target
        resolved: list[tuple[Point, int]] = []
        for enable_name, value in enable.items():
            target = compiled.get(str(enable_name))
            if target is None:
                if enable_name not in profile.points:
                    problems.append(f"point {name!r} enable: no point {enable_name!r}")
                continue
            if not target.writable:
                problems.append(f"point {name!r} enable: {enable_name!r} is not writable")
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(
                    f"point {name!r} enable: value for {enable_name!r} must be a number"
                )
                continue
            resolved.append((target, value))
        point.enable = tuple(resolved)
        if point.field is not None:
            if point.field in fed:
                problems.append(
                    f"points {fed[point.field]!r} and {name!r} both feed {point.field}; "
                    "a field is fed by one point"
                )
            fed[point.field] = name
        if point.field == "mw_setpoint" and point.codec is None:
            problems.append(f"point {name!r}: mw_setpoint needs a register, not a {point.table}")
    if problems:
        raise ProfileError(f"{where}: " + "; ".join(problems))
    return list(compiled.values())


def merge_points(groups: Iterable[Sequence[Point]]) -> list[Point]:
    """Points of several profiles, the earlier group winning each telemetry field.

    A later point whose field is already fed keeps its place (it may still be a scale
    factor) but feeds nothing.
    """
    fed: set[str] = set()
    merged: list[Point] = []
    for points in groups:
        taken_here: set[str] = set()
        for point in points:
            if point.field is not None:
                if point.field in fed:
                    point.field = None
                else:
                    taken_here.add(point.field)
            merged.append(point)
        fed |= taken_here
    return merged


# --------------------------------------------------------------------------- point map


@dataclass(frozen=True)
class PointMap:
    """The points an adapter polls and writes, from one or more compiled profiles.

    ``polled``: readable points that feed a field and are read every poll, plus the
    scale-factor points they need; ``static``: the same for points marked ``static`` (read
    once per connection); ``setpoint``: the writable point feeding ``mw_setpoint``.
    """

    points: tuple[Point, ...]
    polled: tuple[Point, ...]
    static: tuple[Point, ...]
    setpoint: Point | None
    profiles: tuple[str, ...]
    _fields: tuple[_Field, ...] = dataclass_field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        # how each field comes out of a poll, worked out once rather than at every poll
        fields = tuple(_field_of(p) for p in (*self.polled, *self.static) if p.field is not None)
        object.__setattr__(self, "_fields", fields)

    @classmethod
    def build(cls, points: Sequence[Point], profiles: Sequence[str]) -> PointMap:
        fed = [p for p in points if p.field is not None and p.readable]
        wanted_static = {p for p in fed if p.static}
        wanted = {p for p in fed if not p.static}
        for group in (wanted, wanted_static):
            for point in list(group):
                if point.scale_point is not None:
                    group.add(point.scale_point)
        order = {id(p): i for i, p in enumerate(points)}
        setpoints = [p for p in points if p.field == "mw_setpoint" and p.writable]
        return cls(
            points=tuple(points),
            polled=tuple(sorted(wanted, key=lambda p: order[id(p)])),
            static=tuple(sorted(wanted_static - wanted, key=lambda p: order[id(p)])),
            setpoint=setpoints[0] if setpoints else None,
            profiles=tuple(profiles),
        )

    @property
    def feeds_mw(self) -> bool:
        return any(p.field == "mw" for p in self.polled)

    def telemetry(self, values: Mapping[Point, Value]) -> tuple[dict[str, Any], list[str]]:
        """Telemetry fields from one poll's decoded raw values.

        :return: ``(fields, missing)``: ``fields`` has the core fields found and a
            ``details`` dict; ``missing`` names fields whose point reported no value (the
            device's not-implemented marker, or its scale factor's).
        """
        fields: dict[str, Any] = {}
        details: dict[str, Any] = {}
        missing: list[str] = []
        get = values.get
        for point, name, detail, scale_point, convert in self._fields:
            if scale_point is None:
                value = convert(point, get(point), None)
            else:
                scale_raw = get(scale_point)
                value = convert(
                    point, get(point), scale_raw if isinstance(scale_raw, int) else None
                )
            if value is None:
                missing.append(name)
                continue
            if name == "fault_code" and value == "":
                fields[name] = None  # the device reports no fault
                continue
            if detail is not None:
                details[detail] = value
            else:
                fields[name] = value
        fields["details"] = details
        return fields, missing

    @staticmethod
    def _field_value(point: Point, raw: Value, scale_factor: int | None) -> Value:
        if raw is None:
            return None
        if point.field == "online":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, int):
                return raw in point.true_values if point.true_values is not None else raw != 0
            return None
        if point.field == "status":
            if isinstance(raw, int) and not isinstance(raw, bool):
                return point.enum.get(raw, str(raw))
            return str(raw)
        if point.field == "fault_code":
            if isinstance(raw, bool):
                return "fault" if raw else None
            if not isinstance(raw, int):
                return str(raw) or None
            if raw == 0:
                return ""
            if raw in point.enum:
                return point.enum[raw]
            if point.bits:
                names = [
                    point.bits.get(bit, f"bit{bit}")
                    for bit in range(raw.bit_length())
                    if raw >> bit & 1
                ]
                return ",".join(names)
            return str(raw)
        if isinstance(raw, int) and not isinstance(raw, bool) and point.enum:
            return point.enum.get(raw, str(raw))
        return point.to_field(raw, scale_factor)
