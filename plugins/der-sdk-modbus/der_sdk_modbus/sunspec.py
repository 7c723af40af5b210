"""SunSpec discovery: find the ``SunS`` marker, walk the model chain, pick profiles.

A SunSpec device holds ``0x5375 0x6E53`` ("SunS") at a base address (40000, else 0, else
50000), then a chain of models: each starts with its model id and its length ``L`` (the
registers after those two), and the next model follows directly. Model id ``0xFFFF`` ends
the chain. Profiles in the SunSpec device pack give point addresses as offsets from a
model's id register (the offsets of the SunSpec model definitions) and name the model in
``extra.sunspec_model``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from der_sdk.extensions import DeviceProfile
from der_sdk_modbus.link import ModbusFault
from der_sdk_modbus.pack import version_key
from der_sdk_modbus.points import ProfileError, sunspec_models_of

__all__ = [
    "MODEL_PREFERENCE",
    "SCAN_BASES",
    "SUNS_MARKER",
    "SunSpecModel",
    "SunSpecScanError",
    "choose_model_profiles",
    "model_bases",
    "scan",
]

SUNS_MARKER: Final = (0x5375, 0x6E53)
SCAN_BASES: Final = (40000, 0, 50000)
END_MODEL_ID: Final = 0xFFFF
MAX_MODELS: Final = 128
_NOTHING_MAPPED: Final = frozenset({0x02, 0x03})  # illegal address (or value) where unmapped

MODEL_PREFERENCE: Final = (701, 704, 802, 103, 102, 101, 124, 1)
"""When models feed the same telemetry field, the earlier one here wins: the DER models
(7xx) and the battery model (802) over the older inverter (10x) and storage (124) ones."""

ReadHolding = Callable[[int, int], Awaitable[list[int] | list[bool]]]


class SunSpecScanError(Exception):
    """The device has no SunSpec map where we looked, or its model chain is broken."""


@dataclass(frozen=True, slots=True)
class SunSpecModel:
    """One model found on the device: its id, the address of its id register, and L."""

    model_id: int
    address: int
    length: int

    @property
    def end(self) -> int:
        return self.address + 2 + self.length


async def scan(
    read: ReadHolding, bases: Sequence[int] = SCAN_BASES
) -> tuple[int, list[SunSpecModel]]:
    """Find the SunSpec base and the models on the device.

    :param read: reads holding registers (address, count); raises :class:`ModbusFault`.
    :return: ``(base address, models in chain order)``.
    :raises SunSpecScanError: no marker at any base, or a chain that does not end.
    :raises ModbusFault: the device stopped answering (anything but an exception response).
    """
    for base in bases:
        try:
            marker = await read(base, 2)
        except ModbusFault as fault:
            if fault.code in _NOTHING_MAPPED:  # try the next base
                continue
            raise  # a device in trouble: say that, not "no SunSpec here"
        if tuple(marker) == SUNS_MARKER:
            break
    else:
        raise SunSpecScanError(
            f"no SunSpec marker 'SunS' at {', '.join(map(str, bases))}; check the unit id "
            "or give the device a profile with absolute addresses and sunspec_scan: false"
        )
    models: list[SunSpecModel] = []
    address = base + 2
    while address + 2 <= 0x10000:
        if len(models) >= MAX_MODELS:
            raise SunSpecScanError(
                f"more than {MAX_MODELS} SunSpec models from {base} without an end marker"
            )
        try:
            header = await read(address, 2)
        except ModbusFault as fault:
            if fault.code in _NOTHING_MAPPED:  # some devices end the map without a marker
                break
            raise
        model_id, length = int(header[0]), int(header[1])
        if model_id in (END_MODEL_ID, 0):
            break
        models.append(SunSpecModel(model_id, address, length))
        address += 2 + length
    return base, models


def model_bases(models: Iterable[SunSpecModel]) -> dict[int, tuple[int, int]]:
    """Model id → ``(address, length)`` of the first instance of each model."""
    bases: dict[int, tuple[int, int]] = {}
    for model in models:
        bases.setdefault(model.model_id, (model.address, model.length))
    return bases


def _preference(model_id: int) -> int:
    try:
        return MODEL_PREFERENCE.index(model_id)
    except ValueError:
        return len(MODEL_PREFERENCE)


def choose_model_profiles(
    models: Sequence[SunSpecModel], installed: Iterable[DeviceProfile]
) -> tuple[list[DeviceProfile], list[int]]:
    """The installed single-model profiles for the models found, in preference order.

    :return: ``(profiles, model ids without a profile)``. Of several versions of one
        profile the highest is used.
    :raises ProfileError: two differently named profiles describe the same model; name
        the one to use with the ``profile`` option.
    """
    by_model: dict[int, dict[str, DeviceProfile]] = {}
    for profile in installed:
        if profile.protocol.lower() != "modbus":
            continue
        ids = sunspec_models_of(profile)
        if len(ids) != 1 or any("sunspec_model" not in p.extra for p in profile.points.values()):
            continue  # not a pure single-model profile
        (model_id,) = ids
        named = by_model.setdefault(model_id, {})
        current = named.get(profile.name)
        if current is None or version_key(profile.version) > version_key(current.version):
            named[profile.name] = profile
    chosen: list[DeviceProfile] = []
    missing: list[int] = []
    seen: set[int] = set()
    ordered = sorted(models, key=lambda m: _preference(m.model_id))  # stable: chain order
    for model in ordered:
        if model.model_id in seen:
            continue
        seen.add(model.model_id)
        candidates = by_model.get(model.model_id, {})
        if not candidates:
            missing.append(model.model_id)
        elif len(candidates) > 1:
            raise ProfileError(
                f"SunSpec model {model.model_id} is described by several profiles "
                f"({', '.join(sorted(candidates))}); name one with the profile option"
            )
        else:
            chosen.extend(candidates.values())
    return chosen, missing
