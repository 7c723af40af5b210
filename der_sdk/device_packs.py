"""Device packs: device profiles (register or node maps) shipped as YAML inside a package.

A device pack is a plugin distribution whose package holds one YAML file per profile in a
folder (``profiles/`` by default) and implements one hook in two lines::

    from der_sdk import hookimpl
    from der_sdk.device_packs import load_profiles

    @hookimpl
    def der_device_profiles():
        return load_profiles(__name__)

:func:`load_profiles` reads the files through :mod:`importlib.resources` (so it works from
a source checkout, an editable install and a wheel alike) and validates each one; a bad
file is a :class:`~der_sdk.errors.ConfigError` naming the package, the file, the line and
the field. The file format is documented in ``docs/device_packs.md``.

Profiles are versioned: the registry keys them by ``name@version``, so several versions of
one profile coexist, and two packs offering the same name *and* version is an error naming
both. :func:`version_key` orders versions the way PEP 440 does (``1.0.dev1 < 1.0a1 <
1.0rc1 < 1.0 == 1.0.0 < 1.0.post1 < 1.1``), through ``packaging``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import os
import re
from collections.abc import Iterable
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any, Final

from packaging.version import InvalidVersion, Version

from der_sdk.errors import ConfigError, ConfigIssue
from der_sdk.extensions import DevicePoint, DeviceProfile
from der_sdk.yamlconf import (
    Issues,
    LineDict,
    Section,
    parse_yaml,
    top_level_mapping,
    type_name,
)

if TYPE_CHECKING:
    from der_sdk.plugins import Plugins

__all__ = [
    "POINT_KEYS",
    "PROFILE_KEYS",
    "VersionKey",
    "format_profile_table",
    "load_profiles",
    "parse_profile",
    "profile_rows",
    "version_key",
]

PROFILE_KEYS: Final = ("name", "vendor", "model", "version", "protocol", "points")
"""The keys of a profile file, all required."""

POINT_KEYS: Final = ("address", "unit", "scale", "access", "field", "extra")
"""The keys of one point; any other key of a point is a protocol setting kept in ``extra``."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FIELD = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?")
_POINT_FIELDS: Final = ("mw", "mw_setpoint", "online", "status", "fault_code")
"""The core telemetry fields a point may feed; anything else goes to ``details.NAME``."""
_SUFFIXES: Final = (".yaml", ".yml")

# --------------------------------------------------------------------------- versions

VersionKey = Version
"""What :func:`version_key` returns: a :class:`packaging.version.Version`."""


def version_key(version: str) -> Version:
    """``version`` as PEP 440 orders it (through ``packaging``); equal keys are equal
    versions (``1.0 == 1.0.0``).

    :raises ValueError: ``version`` is not such a version (``"latest"``, ``"1.x"``).
    """
    try:
        return Version(version)
    except InvalidVersion:
        raise ValueError(f"{version!r} is not a version like 1.2.0 (PEP 440)") from None


# --------------------------------------------------------------------------- one profile


def parse_profile(data: Any, issues: Issues) -> DeviceProfile | None:
    """Validate one parsed profile document; record every problem in ``issues``.

    :return: the profile, or ``None`` when ``issues`` gained a problem.
    """
    before = len(issues.items)
    mapping = top_level_mapping(data, issues, "the keys " + ", ".join(PROFILE_KEYS))
    if mapping is None:
        return None
    top = Section(issues, mapping)
    top.check_keys(PROFILE_KEYS)
    name = top.string("name", required=True)
    if isinstance(name, str) and not _NAME.fullmatch(name):
        top.error(
            "name",
            f"{name!r} is not a profile name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit",
        )
    vendor = top.string("vendor", required=True)
    model = top.string("model", required=True)
    protocol = top.string("protocol", required=True)
    version = top.string("version", required=True)
    if isinstance(version, str):
        try:
            version_key(version)
        except ValueError as exc:
            top.error("version", str(exc))
    points = _parse_points(top, issues)
    if len(issues.items) > before:
        return None
    return DeviceProfile(
        name=name, vendor=vendor, model=model, version=version, protocol=protocol, points=points
    )


def _parse_points(top: Section, issues: Issues) -> dict[str, DevicePoint]:
    raw = top.mapping_at("points", required=True)
    if raw is None and "points" in top.mapping:
        top.error("points", "must map point names to points; found nothing")
    if not isinstance(raw, LineDict):
        return {}
    if not raw:
        top.error("points", "a profile needs at least one point")
    points: dict[str, DevicePoint] = {}
    for point_name, body in raw.items():
        field = f"points.{point_name}"
        if not isinstance(point_name, str):
            issues.add(raw.line_of(point_name), field, "point names must be text")
            continue
        if not isinstance(body, LineDict):
            issues.add(
                raw.line_of(point_name),
                field,
                f"expected a mapping with address, unit, scale, access, field; "
                f"got {type_name(body)}",
            )
            continue
        point = _parse_point(Section(issues, body, field))
        if point is not None:
            points[point_name] = point
    return points


def _parse_point(section: Section) -> DevicePoint | None:
    before = len(section.issues.items)
    address = section.get("address", int | str, required=True)
    if isinstance(address, int) and address < 0:
        section.error("address", f"must be 0 or more, got {address}")
    elif isinstance(address, str) and not address.strip():
        section.error("address", "must not be empty")
    unit = section.get("unit", str | None, default=None)
    scale = section.number("scale", default=1.0)
    if scale == 0:
        section.error("scale", "must not be 0 (the value is raw * scale)")
    access = section.get("access", str, default="r")
    if isinstance(access, str) and access not in ("r", "w", "rw"):
        section.error("access", f"must be r, w or rw, got {access!r}")
    field = section.get("field", str | None, default=None)
    if isinstance(field, str):
        _check_field(section, field)
    extra: dict[str, Any] = {}
    explicit = section.mapping_at("extra")
    if isinstance(explicit, LineDict):
        extra.update(_plain(explicit))
    for key, value in section.mapping.items():
        if key in POINT_KEYS:
            continue
        if not isinstance(key, str):
            section.error(str(key), "protocol setting names must be text")
            continue
        typo = _looks_like_typo(key)
        if typo:
            section.error(
                key,
                f"unknown key {key!r} (did you mean {typo!r}?); other keys are kept as "
                "protocol settings in extra, but this one looks misspelled",
            )
            continue
        extra[key] = _plain(value)
    if len(section.issues.items) > before:
        return None
    return DevicePoint(
        address=address, unit=unit, scale=scale, access=access, field=field, extra=extra
    )


def _plain(value: Any) -> Any:
    """``value`` without the line bookkeeping of the YAML loader (plain dicts and lists)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _check_field(section: Section, field: str) -> None:
    if not _FIELD.fullmatch(field):
        section.error(
            "field", f"{field!r} is not a telemetry field; use a core field or details.NAME"
        )
        return
    head, _, tail = field.partition(".")
    if tail and head != "details":
        section.error("field", f"{field!r}: only details.NAME may have a dot")
    elif not tail and field not in _POINT_FIELDS:
        section.error(
            "field",
            f"{field!r} is not a telemetry field a point can feed "
            f"({', '.join(_POINT_FIELDS)}); asset-type fields are written details.NAME",
        )


def _looks_like_typo(key: str) -> str | None:
    close = difflib.get_close_matches(key, POINT_KEYS, n=1, cutoff=0.75)
    return close[0] if close else None


# --------------------------------------------------------------------------- packs


def _profile_folder(package: str, folder: str) -> Traversable:
    module = importlib.import_module(package)
    if not hasattr(module, "__path__"):  # called with a module's __name__: use its package
        package = module.__package__ or package
    return importlib.resources.files(package).joinpath(folder)


def _label(entry: Traversable, package: str, folder: str) -> str:
    """A path the user can open when the file is on disk, else ``package/folder/file``."""
    if isinstance(entry, os.PathLike):
        return str(os.fspath(entry))
    return f"{package.replace('.', '/')}/{folder}/{entry.name}"


def load_profiles(package: str, folder: str = "profiles") -> list[DeviceProfile]:
    """Every profile in the YAML files (``*.yaml``, ``*.yml``) of ``folder`` in ``package``.

    One profile per file; files are read in name order. Meant for a device pack's hook
    (``return load_profiles(__name__)``); it runs when the registry is first used.

    :param package: the importable package holding the folder (a module name works too:
        its package is used).
    :param folder: the folder inside the package, ``/`` separated.
    :raises ConfigError: a file is not valid YAML or not a valid profile, or two files hold
        the same name and version; every issue names the file, line and field, and says
        which package it is in.
    """
    root = _profile_folder(package, folder)
    if not root.is_dir():
        raise _missing_folder(package, folder)
    entries = sorted(
        (e for e in root.iterdir() if e.is_file() and e.name.endswith(_SUFFIXES)),
        key=lambda e: e.name,
    )
    where = f"device pack {package}"
    profiles: list[DeviceProfile] = []
    seen: dict[tuple[str, VersionKey], str] = {}
    problems: list[Issues] = []
    for entry in entries:
        label = _label(entry, package, folder)
        issues = Issues(label)
        try:
            data = parse_yaml(entry.read_text(encoding="utf-8"), label)
        except ConfigError as exc:
            issues.items.extend(exc.issues)
            problems.append(issues)
            continue
        except (OSError, UnicodeDecodeError) as exc:
            issues.add(None, None, f"cannot be read: {exc}")
            problems.append(issues)
            continue
        profile = parse_profile(data, issues)
        if profile is not None:
            ident = (profile.name, version_key(profile.version))
            if ident in seen:
                issues.add(
                    data.line_of("name") if isinstance(data, LineDict) else None,
                    "name",
                    f"profile {profile.name!r} version {profile.version} is also defined in "
                    f"{seen[ident]}; give one of them another version",
                )
            else:
                seen[ident] = label
                profiles.append(profile)
        if issues:
            problems.append(issues)
    if problems:
        raise ConfigError(
            [
                ConfigIssue(issue.path, issue.line, issue.field, f"{issue.message} [{where}]")
                for issues in problems
                for issue in sorted(issues.items, key=lambda i: i.line or 0)
            ]
        )
    return profiles


def _missing_folder(package: str, folder: str) -> ConfigError:
    issues = Issues(f"{package.replace('.', '/')}/{folder}")
    issues.add(
        None,
        None,
        f"device pack {package} has no folder {folder!r}; put the profile YAML files there "
        "and list them as package data so wheels include them",
    )
    return ConfigError(issues.items)


# --------------------------------------------------------------------------- listing


def profile_rows(plugins: Plugins) -> list[dict[str, Any]]:
    """One row per installed profile version, as ``der profiles --json`` prints them."""
    rows: list[dict[str, Any]] = []
    registry = plugins.device_profiles
    for key in registry.names():
        profile = registry.get(key)
        rows.append(
            {
                "name": profile.name,
                "version": profile.version,
                "vendor": profile.vendor,
                "model": profile.model,
                "protocol": profile.protocol,
                "points": len(profile.points),
                "package": registry.provider(key),
            }
        )
    return rows


def format_profile_table(rows: Iterable[dict[str, Any]]) -> str:
    """``der profiles`` as an aligned text table."""
    columns = ("name", "version", "vendor", "model", "protocol", "points", "package")
    table = [[c.upper() for c in columns]] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )
