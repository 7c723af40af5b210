"""The bus docs say what the code does: every URL parameter of the NATS plugin and every
bus option is documented, with its default."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from der_sdk_nats import PARAMETERS, NatsSettings

from der_sdk.bus import BusOptions

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "bus.md"
README = ROOT / "plugins" / "der-sdk-nats" / "README.md"


def _row(text: str, name: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
    assert rows, f"no table row for `{name}`"
    return rows[0]


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else f"{value:,}"


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_every_url_parameter_is_documented_with_its_default(name: str) -> None:
    default = NatsSettings.__dataclass_fields__[name].default
    shown = f"`{default}`" if isinstance(default, str) else _number(default)
    for text in (DOC.read_text(), README.read_text()):
        assert f"| {shown} |" in _row(text, name), f"{name}: default {shown}"


@pytest.mark.parametrize("field", msgspec.structs.fields(BusOptions), ids=lambda f: f.name)
def test_every_bus_option_is_documented_with_its_default(field: msgspec.structs.FieldInfo) -> None:
    row = _row(DOC.read_text(), field.name)
    default = field.default
    if field.name == "telemetry_max_bytes":
        assert default == 1024**3 and "| 1 GiB |" in row
    elif isinstance(default, str):
        assert f"| `{default}` |" in row
    else:
        assert f"| {_number(default)} |" in row
