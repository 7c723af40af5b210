"""Built-in asset types (``bess``, ``pv``, ``wind``, ``ev_charger``) and ``details`` checks.

Each asset type's ``details`` Struct lists the extension fields a sample of that type may
carry. Every field is optional, and unknown keys are kept, not refused: a newer agent may
send fields an older headend does not know (schema evolution). :func:`validate_details`
checks the known fields one by one so that one bad field never hides another.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from der_sdk.control import (
    ControlModel,
    battery_energy_rule,
    charger_demand_rule,
    generation_rule,
)
from der_sdk.extensions import AssetType
from der_sdk.plugins import hookimpl
from der_sdk.yamlconf import describe_validation_error

__all__ = [
    "BUILTIN_ASSET_TYPES",
    "BessDetails",
    "EvChargerDetails",
    "PvDetails",
    "WindDetails",
    "der_asset_types",
    "validate_details",
]

Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Degrees = Annotated[float, msgspec.Meta(ge=-360, le=360)]


class BessDetails(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Battery energy storage: state of charge and health, energy, DC side, temperatures."""

    soc_pct: Percent | None = None
    soh_pct: Percent | None = None
    energy_mwh: NonNegative | None = None
    usable_energy_mwh: NonNegative | None = None
    dc_voltage_v: float | None = None
    dc_current_a: float | None = None
    inverter_temp_c: float | None = None
    ambient_temp_c: float | None = None


class PvDetails(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Photovoltaic plant: irradiance, module temperature, AC/DC power, curtailment."""

    irradiance_wm2: NonNegative | None = None
    module_temp_c: float | None = None
    ac_mw: float | None = None
    dc_mw: float | None = None
    inverter_state: str | None = None
    curtailment_reason: str | None = None
    curtailed_mw: NonNegative | None = None
    export_limit_mw: NonNegative | None = None
    """The export limit in force (``None``: none)."""
    available_mw: NonNegative | None = None
    """What the plant could make now without a limit (the uncurtailed potential)."""


class WindDetails(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Wind turbine or farm: wind, rotor, pitch and yaw, availability, state."""

    wind_speed_ms: NonNegative | None = None
    turbine_rpm: NonNegative | None = None
    pitch_deg: Degrees | None = None
    yaw_deg: Degrees | None = None
    availability_pct: Percent | None = None
    turbine_state: str | None = None
    nacelle_temp_c: float | None = None
    curtailed_mw: NonNegative | None = None
    curtailment_reason: str | None = None
    export_limit_mw: NonNegative | None = None
    """The export limit in force (``None``: none)."""
    available_mw: NonNegative | None = None
    """What the turbine could make now without a limit (the uncurtailed potential)."""


class EvChargerDetails(msgspec.Struct, kw_only=True, omit_defaults=True):
    """EV charging station: state, sessions, energy delivered, connectors."""

    station_state: str | None = None
    active_sessions: Count | None = None
    energy_delivered_mwh: NonNegative | None = None
    connectors_available: Count | None = None
    connectors_total: Count | None = None
    max_session_kw: NonNegative | None = None
    demand_mw: NonNegative | None = None
    """What the connected sessions would draw without a cap, as a positive magnitude."""
    import_limit_mw: NonNegative | None = None
    """The magnitude of the import cap in force (``None``: none)."""


BESS_CONTROL = ControlModel(
    kind="setpoint",
    range_rule=battery_energy_rule,
    description="signed setpoint; the energy left (soc_pct, capacity_mwh) bounds it for "
    "the duration",
)
GENERATION_CONTROL = ControlModel(
    kind="export_limit",
    range_rule=generation_rule,
    description="export limit in [0, max_mw]; output is min(available, limit)",
)
CHARGER_CONTROL = ControlModel(
    kind="import_limit",
    range_rule=charger_demand_rule,
    description="import limit in [min_mw, 0]; draw is max(limit, -demand_mw)",
)

BUILTIN_ASSET_TYPES: tuple[AssetType, ...] = (
    AssetType(
        name="bess",
        details=BessDetails,
        description="Battery energy storage system",
        control=BESS_CONTROL,
    ),
    AssetType(
        name="pv",
        details=PvDetails,
        description="Photovoltaic (solar) generation",
        control=GENERATION_CONTROL,
    ),
    AssetType(
        name="wind", details=WindDetails, description="Wind generation", control=GENERATION_CONTROL
    ),
    AssetType(
        name="ev_charger",
        details=EvChargerDetails,
        description="EV charging station",
        control=CHARGER_CONTROL,
    ),
)


@hookimpl
def der_asset_types() -> list[AssetType]:
    return list(BUILTIN_ASSET_TYPES)


def _without_none(annotation: Any) -> Any:
    """``X | None`` → ``X``, so a bad value reads "expected float", not "float | None"."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return typing.Union[tuple(args)]  # noqa: UP007 - built from a runtime tuple
    return annotation


@functools.cache
def _attr_names(details: type[msgspec.Struct]) -> dict[str, str]:
    """Encoded field name → attribute name."""
    return {f.encode_name: f.name for f in msgspec.structs.fields(details)}


# Field types whose conversion from a decoded JSON value is that value unchanged, except
# ``int`` → ``float`` for a float field.
_SCALAR_TYPES = (
    msgspec.inspect.BoolType,
    msgspec.inspect.FloatType,
    msgspec.inspect.IntType,
    msgspec.inspect.LiteralType,
    msgspec.inspect.NoneType,
    msgspec.inspect.StrType,
)
# Value types that a successful conversion to a scalar field returns as they are.
_KEPT_TYPES = frozenset((bool, float, str, type(None)))


@functools.cache
def _float_fields(details: type[msgspec.Struct]) -> frozenset[str] | None:
    """The encoded names of the fields that take a ``float``, when every field of
    ``details`` is a scalar (bool, float, int, str, literal, each optional, with or without
    bounds); ``None`` when some field's conversion may give another type (a date, an enum,
    a nested Struct...)."""
    info = msgspec.inspect.type_info(details)
    assert isinstance(info, msgspec.inspect.StructType)
    floats: set[str] = set()
    for field in info.fields:
        kinds = (
            field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
        )
        if not all(isinstance(kind, _SCALAR_TYPES) for kind in kinds):
            return None
        if any(isinstance(kind, msgspec.inspect.FloatType) for kind in kinds):
            floats.add(field.encode_name)
    return frozenset(floats)


@functools.cache
def _field_types(details: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.encode_name: _without_none(f.type) for f in msgspec.structs.fields(details)}


Checked = tuple[dict[str, Any], list[str]]
"""What :func:`validate_details` returns: the checked details and the problems."""

_VALIDATORS: dict[type[msgspec.Struct], Callable[[dict[str, Any]], Checked]] = {}


def validate_details(asset_type: AssetType, details: dict[str, Any]) -> Checked:
    """Check ``details`` against ``asset_type.details``, field by field.

    :return: ``(checked, problems)``. ``checked`` holds every known field whose value is
        valid (converted, e.g. ``5`` → ``5.0`` for a float field), ``None`` values, and every
        unknown key untouched, in the input order; a field with a bad value is left out.
        ``problems`` has one message per bad field, naming it:
        ``"details.soc_pct: expected float, got str"``. Missing fields are fine.
    """
    details_type = asset_type.details
    validator = _VALIDATORS.get(details_type)
    if validator is None:
        validator = _VALIDATORS[details_type] = _validator(details_type)
    return validator(details)


def _validator(details_type: type[msgspec.Struct]) -> Callable[[dict[str, Any]], Checked]:
    """The check of ``details_type``, made once per type (what it is, looked up now).

    Every field valid, the common case, is one conversion in C. The result keeps the input's
    keys and order; ``details`` itself comes back when no value changed, which for a type of
    scalar fields (:func:`_float_fields`) the types of its values tell, again in C.
    Otherwise each converted field is compared with its value (:func:`_converted`), and
    when the conversion fails each field is checked alone (:func:`_check_each`).
    """
    floats = _float_fields(details_type)
    convert = msgspec.convert
    kept = _KEPT_TYPES.issuperset
    invalid = msgspec.ValidationError

    def validate(details: dict[str, Any]) -> Checked:
        try:
            converted = convert(details, details_type)
        except invalid:
            return _check_each(details_type, details)
        if floats is not None and kept(map(type, details.values())):
            return details, []
        return _converted(details_type, floats, details, converted), []

    return validate


def _converted(
    details_type: type[msgspec.Struct],
    floats: frozenset[str] | None,
    details: dict[str, Any],
    converted: msgspec.Struct,
) -> dict[str, Any]:
    """``details`` with the values its conversion to ``details_type`` changed (``converted``
    holds them), in a copy; ``details`` itself when none changed."""
    # Scalar fields keep an int as it is, except a float field (5 -> 5.0).
    if (
        floats is not None
        and {int} == set(map(type, details.values())) - _KEPT_TYPES
        and floats.isdisjoint([key for key, value in details.items() if type(value) is int])
    ):
        return details
    attrs = _attr_names(details_type)
    checked = details
    for key, value in details.items():
        attr = attrs.get(key)
        if attr is None or value is None:
            continue
        new = getattr(converted, attr)
        if new is not value and (type(new) is not type(value) or new != value):
            if checked is details:
                checked = dict(details)
            checked[key] = new
    return checked


def _check_each(details_type: type[msgspec.Struct], details: dict[str, Any]) -> Checked:
    """:func:`validate_details` one field at a time: what the faster paths above must
    agree with, and the path that names each bad field."""
    known = _field_types(details_type)
    checked: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in details.items():
        expected = known.get(key)
        if expected is None or value is None:
            checked[key] = value
            continue
        try:
            checked[key] = msgspec.convert(value, expected)
        except msgspec.ValidationError as exc:
            _, message = describe_validation_error(exc)
            if ", got " not in message:  # range errors do not say what they got
                message += f", got {value!r}"
            problems.append(f"details.{key}: {message}")
    return checked, problems
