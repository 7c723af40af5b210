"""A simulated Modbus device: registers laid out from device profiles, values that move
plausibly, setpoints that take effect, and fault injection.

:class:`SimulatedDevice` is the datastore a :class:`~der_sdk_modbus.simulator.server.
ModbusSimServer` serves (it implements the ``async_getValues``/``async_setValues`` pair
pymodbus request objects call). Time advances lazily: each request first steps the
physics to now, so an idle simulator costs nothing and a busy one stays exact.

Faults are the simulator's own (not pymodbus's): ``delay`` (answer late), ``exception``
(answer with an exception code), ``drop`` (never answer) and ``disconnect`` (close the
connection instead of answering). Each may be limited to a register range and to a number
of requests, and is cleared with :meth:`SimulatedDevice.clear_faults`.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

from pymodbus.constants import ExcCodes

from der_sdk.errors import DerSdkError
from der_sdk.extensions import DevicePoint, DeviceProfile
from der_sdk_modbus.codec import DATA_TYPES, canonical_type
from der_sdk_modbus.points import Point, Table, compile_profile, sunspec_models_of
from der_sdk_modbus.sunspec import SUNS_MARKER

__all__ = ["SERVED_FUNCTIONS", "Fault", "FaultKind", "RequestRecord", "SimulatedDevice"]

FaultKind = Literal["delay", "exception", "drop", "disconnect"]
FAULT_KINDS: Final = ("delay", "exception", "drop", "disconnect")

_FUNCTION_TABLES: Final[dict[int, Table]] = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}
SERVED_FUNCTIONS: Final = frozenset(_FUNCTION_TABLES)
"""The function codes a simulated device answers: reads and writes of its four tables.
Any other is answered with exception 01 (illegal function), as a device that does not
implement it would."""
_SIZE: Final = 0x10000
_MIN_STEP_S: Final = 0.02


_V = TypeVar("_V")


class _OnDemand(Generic[_V]):
    """Storage per table, made on first use."""

    def __init__(self, make: Callable[[], _V]) -> None:
        self._make = make
        self._tables: dict[str, _V] = {}

    def __getitem__(self, table: str) -> _V:
        value = self._tables.get(table)
        if value is None:
            value = self._tables[table] = self._make()
        return value


@dataclass
class Fault:
    """One injected fault. ``addresses`` (``[start, end)``) limits it to requests that
    touch those registers; ``remaining`` to that many requests (``None``: until cleared)."""

    kind: FaultKind
    delay_s: float = 0.0
    code: int = 0x04
    addresses: tuple[int, int] | None = None
    remaining: int | None = None

    def matches(self, start: int, end: int) -> bool:
        if self.addresses is None:
            return True
        low, high = self.addresses
        return start < high and low < end


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A request as the simulator received it."""

    function: int
    table: Table
    address: int
    count: int


class SimulatedDevice:
    """A device laid out from ``profiles``, answering as unit ``unit_id``.

    Profiles with absolute addresses are placed as they say. Single-model SunSpec
    profiles are laid out as a SunSpec map: ``SunS`` at ``sunspec_base``, the common
    model (1) first (added from ``common_model`` when not given), the others in the
    order given, then the end marker.

    :param rating_mw: the largest power the device makes or takes.
    :param capacity_mwh: battery capacity, for devices that report a state of charge.
    :param ramp_s: seconds the output takes to cross the whole rating (0: at once).
    :param strict: answer reads of unmapped registers with exception 02, as many real
        devices do; by default they read as 0.
    :param clock: monotonic seconds (inject a fake one in tests).
    """

    def __init__(
        self,
        profiles: Sequence[DeviceProfile],
        *,
        unit_id: int = 1,
        rating_mw: float = 1.0,
        capacity_mwh: float = 2.0,
        ramp_s: float = 2.0,
        initial_soc_pct: float = 50.0,
        noise: float = 0.002,
        seed: int | None = None,
        strict: bool = False,
        sunspec_base: int = 40000,
        common_model: DeviceProfile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not profiles:
            raise DerSdkError("a simulated device needs at least one device profile")
        self.unit_id = unit_id
        self.rating_mw = rating_mw
        self.capacity_mwh = capacity_mwh
        self.ramp_s = ramp_s
        self.noise = noise
        self.strict = strict
        self.profiles = list(profiles)
        self._rng = random.Random(seed)
        self._clock = clock
        # a device uses one or two of the four tables: allocate each on first use
        self.registers: _OnDemand[array[int]] = _OnDemand(lambda: array("H", bytes(2 * _SIZE)))
        self.bits: _OnDemand[bytearray] = _OnDemand(lambda: bytearray(_SIZE))
        self._mapped: _OnDemand[bytearray] = _OnDemand(lambda: bytearray(_SIZE))
        self.points: list[Point] = []
        self.sunspec_models: list[tuple[int, int, int]] = []  # (model id, address, length)
        self._layout(self.profiles, sunspec_base, common_model)

        # what the device is doing, in engineering units
        self.mw = 0.0
        self.target_mw = 0.0
        self.soc_pct = initial_soc_pct
        self.energy_exported_mwh = 0.0
        self.energy_imported_mwh = 0.0
        self.fault_code = 0
        self._last_step: float | None = None
        self._setpoints = [p for p in self.points if p.field == "mw_setpoint" and p.writable]
        self._has_battery = any(p.field == "details.soc_pct" for p in self.points)
        self._controllable = bool(self._setpoints)
        self._choose_scale_factors()
        self._seed_values()

        self.faults: list[Fault] = []
        self.requests = 0
        self.by_function: Counter[int] = Counter()
        self.recent: deque[RequestRecord] = deque(maxlen=4096)
        self.before_request: Callable[[RequestRecord], None] | None = None
        """Called with each request before it is answered (tests change values here)."""
        self.step(force=True)

    # ---------------------------------------------------------------- layout

    def _layout(
        self,
        profiles: Sequence[DeviceProfile],
        sunspec_base: int,
        common_model: DeviceProfile | None,
    ) -> None:
        sunspec = [p for p in profiles if _single_model(p)]
        others = [p for p in profiles if not _single_model(p)]
        bases: dict[int, tuple[int, int]] = {}
        if sunspec:
            if common_model is not None and not any(sunspec_models_of(p) == {1} for p in sunspec):
                sunspec.insert(0, common_model)
            sunspec.sort(key=lambda p: 0 if sunspec_models_of(p) == {1} else 1)
            address = sunspec_base + 2
            self._put_registers("holding", sunspec_base, list(SUNS_MARKER))
            for profile in sunspec:
                (model_id,) = sunspec_models_of(profile)
                length = max(_point_end(pt) for pt in profile.points.values()) - 2
                self.sunspec_models.append((model_id, address, length))
                bases.setdefault(model_id, (address, length))
                self.points.extend(compile_profile(profile, {model_id: (address, length)}))
                self._put_registers("holding", address, [model_id, length])
                address += 2 + length
            self._put_registers("holding", address, [0xFFFF, 0])
            self._map("holding", sunspec_base, address + 2)
        for profile in others:
            # absolute addresses as given; SunSpec-relative points on the models laid out
            points = compile_profile(profile, bases if sunspec_models_of(profile) else None)
            self.points.extend(points)
            for point in points:
                self._map(point.table, point.address, point.end)

    def _map(self, table: Table, start: int, end: int) -> None:
        self._mapped[table][start:end] = b"\x01" * (end - start)

    def point(self, name: str, profile: str | None = None) -> Point:
        """The point called ``name`` (of ``profile``, when several profiles have one)."""
        for point in self.points:
            if point.name == name and (profile is None or point.profile == profile):
                return point
        raise KeyError(f"no point {name!r}" + (f" in profile {profile!r}" if profile else ""))

    # ---------------------------------------------------------------- raw access

    def _put_registers(self, table: Table, address: int, values: Sequence[int]) -> None:
        self.registers[table][address : address + len(values)] = array("H", values)

    def read_registers(self, table: Table, address: int, count: int) -> list[int]:
        return list(self.registers[table][address : address + count])

    def raw(self, point: Point) -> int | float | str | bool | None:
        """The decoded raw value of ``point`` as the device holds it now."""
        if point.codec is None:
            return bool(self.bits[point.table][point.address])
        return point.codec.decode(self.read_registers(point.table, point.address, point.count))

    def scale_factor(self, point: Point) -> int | None:
        if point.scale_point is None:
            return None
        value = self.raw(point.scale_point)
        return value if isinstance(value, int) else None

    def value(self, name: str, profile: str | None = None) -> float | int | str | bool | None:
        """``name``'s value in its field's unit (MW for power), as a client would read it."""
        point = self.point(name, profile)
        raw = self.raw(point)
        if point.field in ("status", "fault_code", "online") or isinstance(raw, str | bool):
            return raw
        return point.to_field(raw, self.scale_factor(point))

    def set_raw(self, point: Point, raw: int | float | str | bool) -> None:
        if point.codec is None:
            self.bits[point.table][point.address] = 1 if raw else 0
            return
        self._put_registers(point.table, point.address, point.codec.encode(raw))

    def set_value(self, name: str, value: float, profile: str | None = None) -> None:
        """Put ``value`` (in the field's unit) into ``name``'s registers."""
        point = self.point(name, profile)
        self.set_raw(point, point.to_raw(value, self.scale_factor(point)))

    # ---------------------------------------------------------------- seeding

    def _choose_scale_factors(self) -> None:
        """The smallest exponent (-3 or more) that fits each scaled value's range."""
        needs: dict[int, tuple[Point, int]] = {}
        for point in self.points:
            scale = point.scale_point
            if scale is None or point.codec is None or point.field is None:
                continue
            peak = self._peak(point.field)
            if peak is None:
                continue
            raw_peak = (
                peak / (abs(point.scale) * point.unit_factor) / (point.codec.max_magnitude * 0.9)
            )
            exponent = max(-3, math.ceil(math.log10(raw_peak))) if raw_peak > 0 else 0
            current = needs.get(id(scale))
            if current is None or exponent > current[1]:
                needs[id(scale)] = (scale, exponent)
        for scale, exponent in needs.values():
            self.set_raw(scale, int(exponent))

    def _peak(self, field: str) -> float | None:
        leaf = field.rsplit(".", 1)[-1]
        if field in ("mw", "mw_setpoint") or leaf.endswith("_mw"):
            return self.rating_mw * 1.5
        if leaf.endswith("_mwh"):
            return max(self.capacity_mwh, self.rating_mw) * 1000
        if leaf.endswith("_pct"):
            return 100.0
        if leaf.endswith("_temp_c"):
            return 150.0
        if leaf.endswith("_hz"):
            return 70.0
        if leaf.endswith("_v"):
            return 1500.0
        if leaf.endswith("_a"):
            return self.rating_mw * 1e6 / 100
        return None

    def _seed_values(self) -> None:
        """Writable points start at 0; SunSpec points the simulation does not drive hold
        SunSpec's not-implemented value, as on a device that lacks them."""
        for point in self.points:
            if point.codec is None or point.field is not None or point.writable:
                continue
            if point.name in ("ID", "L") or _is_scale_factor(point, self.points):
                continue
            marker = point.codec.not_implemented
            if marker is not None and point.sunspec_model is not None:
                width = 2 * point.count
                self._put_registers(
                    point.table,
                    point.address,
                    point.codec.from_bytes(marker.to_bytes(width, "big")),
                )

    # ---------------------------------------------------------------- physics

    def step(self, *, force: bool = False) -> None:
        """Advance the simulation to now and write every simulated value."""
        now = self._clock()
        if self._last_step is None:
            self._last_step = now
        dt = now - self._last_step
        if dt < _MIN_STEP_S and not force:
            return
        self._last_step = now
        target = self.target_mw if self._controllable else self._free_running_mw(now)
        if self.ramp_s > 0 and dt > 0:
            limit = self.rating_mw / self.ramp_s * dt
            self.mw += max(-limit, min(limit, target - self.mw))
        else:
            self.mw = target
        if self._has_battery and self.capacity_mwh > 0:
            self.soc_pct -= self.mw * dt / 3600 / self.capacity_mwh * 100
            if self.soc_pct >= 100 or self.soc_pct <= 0:
                self.soc_pct = min(100.0, max(0.0, self.soc_pct))
        if self.mw > 0:
            self.energy_exported_mwh += self.mw * dt / 3600
        else:
            self.energy_imported_mwh -= self.mw * dt / 3600
        self._write_values(now)

    def _free_running_mw(self, now: float) -> float:
        """A generator without setpoints: most of its rating, drifting slowly."""
        return self.rating_mw * (0.6 + 0.1 * math.sin(now / 30))

    def _write_values(self, now: float) -> None:
        noise = self._rng.gauss(0.0, self.noise * self.rating_mw) if self.noise else 0.0
        measured = self.mw + noise if abs(self.mw) > 1e-9 else 0.0
        load = abs(self.mw) / self.rating_mw if self.rating_mw else 0.0
        for point in self.points:
            if point.field is None or point.field == "mw_setpoint":
                continue  # setpoint registers hold what the client wrote
            value = self._field_value(point, measured, load, now)
            if value is None:
                continue
            with contextlib.suppress(ValueError):  # out of range: keep the last value
                self.set_raw(point, value)

    def _field_value(
        self, point: Point, measured: float, load: float, now: float
    ) -> int | float | str | bool | None:
        field = point.field or ""
        leaf = field.rsplit(".", 1)[-1]
        if field == "online":
            return next(iter(sorted(point.true_values)), 1) if point.true_values else 1
        if field == "fault_code":
            return self.fault_code
        if field == "status" or leaf in ("charge_status", "battery_state"):
            return self._enum_raw(point, self._status_words(leaf))
        scale_factor = self.scale_factor(point)
        quantity: float | str
        if field == "mw" or leaf in ("dc_mw", "ac_mw"):
            quantity = measured
        elif leaf == "soc_pct":
            quantity = self.soc_pct
        elif leaf == "soh_pct":
            quantity = 98.5
        elif leaf.endswith("_temp_c"):
            quantity = 25.0 + 15.0 * load
        elif leaf == "frequency_hz":
            quantity = 50.0 + 0.02 * math.sin(now)
        elif leaf == "dc_voltage_v":
            quantity = 800.0
        elif leaf.endswith("_v"):
            quantity = 400.0
        elif leaf == "dc_current_a":
            quantity = measured * 1e6 / 800.0
        elif leaf in ("energy_exported_mwh", "energy_delivered_mwh"):
            quantity = self.energy_exported_mwh
        elif leaf == "energy_imported_mwh":
            quantity = self.energy_imported_mwh
        elif leaf == "energy_mwh":
            quantity = self.capacity_mwh * self.soc_pct / 100
        elif leaf == "rated_energy_mwh":
            quantity = self.capacity_mwh
        elif leaf == "max_charge_mw":
            quantity = self.rating_mw
        elif point.codec is not None and point.codec.data_type == "string":
            quantity = {
                "manufacturer": "der-sdk",
                "device_model": "der sim modbus",
                "firmware_version": "0.1.0",
                "serial_number": f"SIM-{self.unit_id:03d}",
            }.get(leaf, leaf)
            return quantity[: 2 * point.count]
        else:
            return None
        if isinstance(quantity, str):
            return quantity
        try:
            return point.to_raw(quantity, scale_factor)
        except ValueError:
            return None

    def _status_words(self, leaf: str) -> tuple[str, ...]:
        if leaf == "battery_state":
            return ("connected", "running", "on")
        if self.mw > 1e-6:
            words: tuple[str, ...] = ("discharging", "running", "mppt", "on")
        elif self.mw < -1e-6:
            words = ("charging", "running", "on")
        else:
            words = ("idle", "holding", "standby", "running", "on")
        return words if self._has_battery or leaf != "status" else ("mppt", "running", "on")

    @staticmethod
    def _enum_raw(point: Point, preferred: Sequence[str]) -> int | str | None:
        if point.codec is not None and point.codec.data_type == "string":
            return preferred[0]
        by_label = {label: raw for raw, label in point.enum.items()}
        for word in preferred:
            if word in by_label:
                return by_label[word]
        return min(point.enum) if point.enum else 1

    # ---------------------------------------------------------------- setpoints

    def _apply_writes(self, table: Table, start: int, end: int) -> None:
        for point in self._setpoints:
            touched = point.table == table and point.address < end and start < point.end
            touched = touched or any(
                e.table == table and e.address < end and start < e.end for e, _ in point.enable
            )
            if not touched:
                continue
            enabled = all(self.raw(e) == value for e, value in point.enable)
            if not enabled:
                self.target_mw = 0.0
                continue
            raw = self.raw(point)
            value = point.to_field(raw, self.scale_factor(point))
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.target_mw = max(-self.rating_mw, min(self.rating_mw, float(value)))

    @property
    def setpoint_mw(self) -> float | None:
        """The setpoint held in the device's setpoint register (MW), if it has one."""
        if not self._setpoints:
            return None
        value = self.value(self._setpoints[0].name, self._setpoints[0].profile)
        return float(value) if isinstance(value, int | float) else None

    # ---------------------------------------------------------------- faults

    def inject_fault(
        self,
        kind: FaultKind,
        *,
        delay_s: float = 0.0,
        code: int = 0x04,
        addresses: tuple[int, int] | None = None,
        count: int | None = None,
    ) -> Fault:
        """Start a fault; it applies to matching requests until cleared (or ``count``
        requests). ``delay`` needs ``delay_s``; ``exception`` takes ``code`` (1-11)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(FAULT_KINDS)}")
        if kind == "exception" and not 1 <= code <= 0x0B:
            raise ValueError(f"exception code must be 1-11, got {code}")
        if kind == "delay" and delay_s <= 0:
            raise ValueError("a delay fault needs delay_s > 0")
        fault = Fault(kind, delay_s=delay_s, code=code, addresses=addresses, remaining=count)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def begin_request(self, function: int, address: int, count: int) -> Fault | None:
        """Count a request, step the physics, and say which fault (if any) applies."""
        table = _FUNCTION_TABLES.get(function, "holding")
        record = RequestRecord(function, table, address, count)
        self.requests += 1
        self.by_function[function] += 1
        self.recent.append(record)
        self.step()
        if self.before_request is not None:
            self.before_request(record)
        for fault in self.faults:
            if fault.matches(address, address + max(count, 1)):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def read_requests(self) -> int:
        """Read requests so far (functions 1-4)."""
        return sum(self.by_function[f] for f in (1, 2, 3, 4))

    # ---------------------------------------------------------------- datastore

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        table = _FUNCTION_TABLES.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if address < 0 or address + count > _SIZE:
            return ExcCodes.ILLEGAL_ADDRESS
        if self.strict and not all(self._mapped[table][address : address + count]):
            return ExcCodes.ILLEGAL_ADDRESS
        if table in ("coil", "discrete"):
            return [bool(b) for b in self.bits[table][address : address + count]]
        return self.read_registers(table, address, count)

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        table = _FUNCTION_TABLES.get(func_code)
        if table not in ("holding", "coil"):
            return ExcCodes.ILLEGAL_FUNCTION
        end = address + len(values)
        if address < 0 or end > _SIZE:
            return ExcCodes.ILLEGAL_ADDRESS
        if self.strict and not all(self._mapped[table][address:end]):
            return ExcCodes.ILLEGAL_ADDRESS
        if table == "coil":
            self.bits["coil"][address:end] = bytes(1 if v else 0 for v in values)
        else:
            self._put_registers("holding", address, [int(v) for v in values])
        self._apply_writes(table, address, end)
        return None


def _point_end(point: DevicePoint) -> int:
    """The first address after a profile point, from its own settings."""
    address = int(point.address)
    type_name = str(point.extra.get("type", "uint16"))
    if type_name == "string":
        return address + int(point.extra.get("length", 1))
    return address + DATA_TYPES.get(canonical_type(type_name), 1)


def _single_model(profile: DeviceProfile) -> bool:
    """Whether every point of ``profile`` is relative to one and the same SunSpec model."""
    return len(sunspec_models_of(profile)) == 1 and all(
        "sunspec_model" in point.extra for point in profile.points.values()
    )


def _is_scale_factor(point: Point, points: Sequence[Point]) -> bool:
    return any(other.scale_point is point for other in points)
