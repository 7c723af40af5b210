#!/usr/bin/env python3
"""Generate the SunSpec device pack (der_sdk_modbus/profiles/sunspec-*.yaml).

The point layouts (offsets, types, sizes, scale factors, units, access, enum and bit
labels) come from the SunSpec model definitions as pysunspec2 ships them
(``sunspec2/models/json/model_<id>.json``); which point feeds which telemetry field is
decided here, in :data:`BINDINGS`. Run it after changing BINDINGS or updating the model
definitions:

    pip download pysunspec2 --no-deps -d /tmp/pss && unzip -q /tmp/pss/*.whl -d /tmp/pss
    python scripts/generate_sunspec_profiles.py --models /tmp/pss/sunspec2/models/json

(or with pysunspec2 installed, without ``--models``). A test checks the files are current
when pysunspec2 is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "der_sdk_modbus" / "profiles"
VERSION = "1.0.0"

# model id -> (profile name, model label, {point name: {field, static, extra settings}})
BINDINGS: dict[int, tuple[str, str, dict[str, dict[str, Any]]]] = {
    1: (
        "sunspec-1",
        "SunSpec common model (1)",
        {
            "Mn": {"field": "details.manufacturer", "static": True},
            "Md": {"field": "details.device_model", "static": True},
            "Vr": {"field": "details.firmware_version", "static": True},
            "SN": {"field": "details.serial_number", "static": True},
        },
    ),
    103: (
        "sunspec-103",
        "SunSpec three-phase inverter (103)",
        {
            "W": {"field": "mw"},
            "St": {"field": "status"},
            "Evt1": {"field": "fault_code"},
            "Hz": {"field": "details.frequency_hz"},
            "DCW": {"field": "details.dc_mw"},
            "WH": {"field": "details.energy_delivered_mwh"},
            "TmpCab": {"field": "details.inverter_temp_c"},
        },
    ),
    701: (
        "sunspec-701",
        "SunSpec DER AC measurement (701)",
        {
            "W": {"field": "mw"},
            "InvSt": {"field": "status"},
            "ConnSt": {"field": "online", "true_values": [1]},
            "Alrm": {"field": "fault_code"},
            "Hz": {"field": "details.frequency_hz"},
            "LLV": {"field": "details.voltage_ll_v"},
            "TotWhInj": {"field": "details.energy_exported_mwh"},
            "TotWhAbs": {"field": "details.energy_imported_mwh"},
            "TmpAmb": {"field": "details.ambient_temp_c"},
            "TmpCab": {"field": "details.inverter_temp_c"},
        },
    ),
    704: (
        "sunspec-704",
        "SunSpec DER AC controls (704)",
        {
            # the active power setpoint: the value in watts, then "watts mode" and "enabled"
            "WSet": {"field": "mw_setpoint", "enable": {"WSetMod": 1, "WSetEna": 1}},
        },
    ),
    802: (
        "sunspec-802",
        "SunSpec battery base model (802)",
        {
            "SoC": {"field": "details.soc_pct"},
            "SoH": {"field": "details.soh_pct"},
            "WHRtg": {"field": "details.rated_energy_mwh"},
            "V": {"field": "details.dc_voltage_v"},
            "A": {"field": "details.dc_current_a"},
            "ChaSt": {"field": "details.charge_status"},
            "State": {"field": "details.battery_state"},
            "Evt1": {"field": "fault_code"},
        },
    ),
    124: (
        "sunspec-124",
        "SunSpec basic storage controls (124)",
        {
            "ChaState": {"field": "details.soc_pct"},
            "ChaSt": {"field": "details.charge_status"},
            "InBatV": {"field": "details.dc_voltage_v"},
            "WChaMax": {"field": "details.max_charge_mw"},
        },
    ),
}


def _flatten(group: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(name, point) of every point of a model, groups flattened as ``Group.Point``."""
    points = [(prefix + p["name"], p) for p in group.get("points", [])]
    for sub in group.get("groups", []):
        if sub.get("count", 1) not in (1, None):
            raise SystemExit(f"repeating group {sub['name']} is not supported by this script")
        points += _flatten(sub, prefix + sub["name"] + ".")
    return points


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)}: {_scalar(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if text and all(c.isalnum() or c in "._-%" for c in text) and text[0].isalpha():
        return text if text.lower() not in ("true", "false", "null", "yes", "no") else f"'{text}'"
    return "'" + text.replace("'", "''") + "'"


def _key(key: Any) -> str:
    return str(key) if isinstance(key, int) else _scalar(key)


def render(model_id: int, definition: dict[str, Any], source: str) -> str:
    name, label, bindings = BINDINGS[model_id]
    points = _flatten(definition["group"])
    known = {n for n, _ in points}
    unknown = sorted(set(bindings) - known)
    if unknown:
        raise SystemExit(f"model {model_id}: no points {unknown}")
    lines = [
        f"# Generated by scripts/generate_sunspec_profiles.py from {source}; do not edit.",
        f"# {label}: addresses are offsets from the model's ID register.",
        f"name: {name}",
        "vendor: SunSpec Alliance",
        f"model: {_scalar(label)}",
        f"version: {_scalar(VERSION)}",
        "protocol: modbus",
        "points:",
    ]
    offset = 0
    for point_name, point in points:
        size = int(point["size"])
        entry: dict[str, Any] = {"address": offset, "type": point["type"]}
        if point["type"] == "string":
            entry["length"] = size
        if point.get("units"):
            entry["unit"] = point["units"]
        if point.get("sf"):
            sf = point["sf"]
            entry["scale_factor"] = sf if isinstance(sf, str) else None
            if not isinstance(sf, str):  # a fixed exponent in the definition
                entry.pop("scale_factor")
                entry["scale"] = 10.0 ** int(sf)
        if str(point.get("access", "R")).upper() == "RW":
            entry["access"] = "rw"
        symbols = point.get("symbols") or []
        if symbols:
            kind = "bits" if point["type"].startswith("bitfield") else "enum"
            entry[kind] = {int(s["value"]): s["name"].lower() for s in symbols}
        binding = bindings.get(point_name, {})
        entry.update(binding)
        entry["sunspec_model"] = model_id
        lines.append(f"  {_key(point_name)}: {_scalar(entry)}")
        offset += size
    return "\n".join(lines) + "\n"


def _models_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    try:
        import sunspec2  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("pass --models DIR or install pysunspec2") from None
    return Path(sunspec2.__file__).parent / "models" / "json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="pysunspec2's models/json folder")
    parser.add_argument("--out", default=str(OUT), help="where to write the YAML files")
    parser.add_argument("--source", default="pysunspec2 models/json", help="named in headers")
    ns = parser.parse_args(argv)
    models = _models_dir(ns.models)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    for model_id, (name, _, _) in sorted(BINDINGS.items()):
        path = models / f"model_{model_id}.json"
        definition = json.loads(path.read_text())
        text = render(model_id, definition, f"{ns.source}/model_{model_id}.json")
        (out / f"{name}.yaml").write_text(text)
        print(f"wrote {out / f'{name}.yaml'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
