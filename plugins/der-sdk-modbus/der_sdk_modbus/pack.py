"""Finding device profiles: the built-in SunSpec pack and lookups by name and version."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import yaml
from packaging.version import InvalidVersion, Version

from der_sdk.extensions import DeviceProfile
from der_sdk_modbus.points import ProfileError

__all__ = ["builtin_profiles", "find_profile", "modbus_profiles", "version_key"]

_POINT_KEYS = ("address", "unit", "scale", "access", "field", "extra")


def builtin_profiles() -> list[DeviceProfile]:
    """The profiles of the device pack inside this distribution (``profiles/*.yaml``)."""
    try:
        from der_sdk.device_packs import load_profiles
    except ImportError:  # an older der-sdk without device packs
        return _load_profiles_without_device_packs("der_sdk_modbus", "profiles")
    return load_profiles("der_sdk_modbus", "profiles")


def _load_profiles_without_device_packs(package: str, folder: str) -> list[DeviceProfile]:
    """The same file format as ``der_sdk.device_packs``, without its line-numbered errors."""
    root = importlib.resources.files(package).joinpath(folder)
    profiles: list[DeviceProfile] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith((".yaml", ".yml")):
            continue
        data: dict[str, Any] = yaml.safe_load(entry.read_text(encoding="utf-8"))
        points: dict[str, Any] = {}
        for name, body in (data.get("points") or {}).items():
            point = {k: v for k, v in body.items() if k in _POINT_KEYS}
            point["extra"] = {
                **(body.get("extra") or {}),
                **{k: v for k, v in body.items() if k not in _POINT_KEYS},
            }
            points[str(name)] = point
        profiles.append(msgspec.convert({**data, "points": points}, DeviceProfile))
    return profiles


def version_key(version: str) -> tuple[int, Version]:
    """A sort key for profile versions in PEP 440 order (through ``packaging``); one that
    is not a PEP 440 version sorts below every one that is."""
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, Version("0"))


def modbus_profiles(profiles: Mapping[str, DeviceProfile]) -> list[DeviceProfile]:
    """The distinct Modbus profiles of an adapter context's profile mapping."""
    unique: dict[tuple[str, str], DeviceProfile] = {}
    for profile in profiles.values():
        if profile.protocol.lower() == "modbus":
            unique.setdefault((profile.name, profile.version), profile)
    return list(unique.values())


def find_profile(
    profiles: Mapping[str, DeviceProfile], name: str, version: str | None = None
) -> DeviceProfile:
    """Profile ``name`` (or ``name@version``) from ``profiles`` (keyed by name or
    ``name@version``): the exact ``version`` when given, else the highest.

    :raises ProfileError: no such profile (or version); the message lists what is installed.
    """
    if version is None and "@" in name:
        name, version = name.split("@", 1)
    candidates = [p for p in _distinct(profiles.values()) if p.name == name]
    if version is not None:
        wanted = version_key(version)
        candidates = [p for p in candidates if version_key(p.version) == wanted]
    if not candidates and version is not None:
        offered = sorted({p.version for p in _distinct(profiles.values()) if p.name == name})
        if offered:
            raise ProfileError(
                f"Modbus device profile {name!r} version {version} is not available (this "
                f"adapter was given version(s) {', '.join(offered)}); install the pack that "
                "provides that version, or drop profile_version to use the highest"
            )
    if not candidates:
        installed = sorted({f"{p.name} {p.version}" for p in modbus_profiles(profiles)})
        what = f"{name!r} version {version}" if version is not None else repr(name)
        raise ProfileError(
            f"no Modbus device profile {what} is installed (installed: "
            f"{', '.join(installed) or 'none'}); install the device pack that provides it "
            "or fix the profile option"
        )
    return max(candidates, key=lambda p: version_key(p.version))


def _distinct(profiles: Iterable[DeviceProfile]) -> list[DeviceProfile]:
    seen: dict[tuple[str, str], DeviceProfile] = {}
    for profile in profiles:
        seen.setdefault((profile.name, profile.version), profile)
    return list(seen.values())
