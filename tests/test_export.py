"""Telemetry export (docs/export.md): ``der export`` writes a range of stored telemetry into
Parquet or CSV files by day and site that read back as exactly the stored samples, in
bounded memory; bad ranges, ids and folders are refused with a message, never a
traceback. The continuous exporters' runner is tested in tests/headend/test_exporters.py."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pytest

from der_sdk.cli import main
from der_sdk.export.files import PartitionedFiles
from der_sdk.export.range import export_range
from der_sdk.export.schema import ExportSchema, samples_from_table
from der_sdk.extensions import AssetType
from der_sdk.models import TelemetrySample
from der_sdk.plugins import load_plugins
from der_sdk.storage.contract import StorageBackend
from der_sdk.storage.memory import MemoryStorage
from der_sdk.storage.sqlite import SQLiteStorage

T0 = datetime(2024, 6, 1, 22, 0, tzinfo=UTC)
SITES = ("site-north", "site/south")  # a slash: the partition name must encode it
ASSETS = {"bess-1": SITES[0], "pv-1": SITES[0], "wind-1": SITES[1]}


def stored_samples() -> list[TelemetrySample]:
    """Four hours across midnight: two days, two sites, three asset types' details."""
    details: dict[str, dict[str, Any]] = {
        "bess-1": {"soc_pct": 55.5, "energy_mwh": 2.0},
        "pv-1": {"irradiance_wm2": 640.0, "curtailment_reason": "none", "vendor_code": 7},
        "wind-1": {"wind_speed_ms": 8.5, "turbine_state": "run", "pitch_deg": 2},
    }
    return [
        TelemetrySample(
            asset_id=asset,
            site_id=site,
            ts=T0 + timedelta(minutes=10 * step),
            mw=step / 10,
            mw_setpoint=None if step % 2 else 1.0,
            online=step % 5 != 0,
            status="running",
            fault_code=None if step % 3 else "F1",
            seq=step,
            quality="good" if step % 4 else "suspect",
            quality_reason=None if step % 4 else "stale",
            details=details[asset],
        )
        for step in range(24)
        for asset, site in ASSETS.items()
    ]


def schema() -> ExportSchema:
    plugins = load_plugins(entry_points=False, env={})
    return ExportSchema.for_asset_types(
        plugins.asset_types.get(n) for n in plugins.asset_types.names()
    )


def read_back(out: Path, fmt: str) -> list[TelemetrySample]:
    """Every file under ``out`` read as one dataset (Hive partitions), as samples."""
    arrow = schema().arrow
    if fmt == "csv":
        options = pa_csv.ConvertOptions(
            column_types={f.name: f.type for f in arrow}, strings_can_be_null=True
        )
        file_format: ds.FileFormat = ds.CsvFileFormat(convert_options=options)
    else:
        file_format = ds.ParquetFileFormat()
    dataset = ds.dataset(out, format=file_format, partitioning="hive", schema=arrow)
    table = dataset.to_table().sort_by([("ts", "ascending"), ("asset_id", "ascending")])
    return samples_from_table(table)


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/der.db"
    storage = SQLiteStorage(tmp_path / "der.db")
    await storage.open()
    await storage.append_telemetry(stored_samples())
    await storage.close()
    return url


def export(*args: str) -> int:
    return main(["export", *args])


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_der_export_writes_the_range_row_for_row_by_day_and_site(
    sqlite_url: str, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    start, end = T0 + timedelta(minutes=30), T0 + timedelta(hours=3)

    code = export(
        "--from", start.isoformat(), "--to", end.isoformat(), "--format", fmt,
        "--out", str(out), "--database-url", sqlite_url, "--page-size", "7",
    )  # fmt: skip

    assert code == 0, capsys.readouterr().err
    wanted = sorted(
        (s for s in stored_samples() if start <= s.ts < end), key=lambda s: (s.ts, s.asset_id)
    )
    assert read_back(out, fmt) == wanted
    partitions = sorted(str(p.parent.relative_to(out)) for p in out.rglob(f"*.{fmt}"))
    assert sorted(set(partitions)) == [
        "date=2024-06-01/site=site%2Fsouth",
        "date=2024-06-01/site=site-north",
        "date=2024-06-02/site=site%2Fsouth",
        "date=2024-06-02/site=site-north",
    ]
    assert f"exported {len(wanted)} sample(s)" in capsys.readouterr().out


def test_der_export_of_one_site_or_one_asset(sqlite_url: str, tmp_path: Path) -> None:
    whole = ("--from", T0.isoformat(), "--to", (T0 + timedelta(days=1)).isoformat())
    assert export(*whole, "--site", SITES[1], "--out", str(tmp_path / "site"),
                  "--database-url", sqlite_url) == 0  # fmt: skip
    assert read_back(tmp_path / "site", "parquet") == [
        s for s in stored_samples() if s.site_id == SITES[1]
    ]
    assert export(*whole, "--asset", "pv-1", "--out", str(tmp_path / "asset"),
                  "--database-url", sqlite_url) == 0  # fmt: skip
    back = read_back(tmp_path / "asset", "parquet")
    assert back == [s for s in stored_samples() if s.asset_id == "pv-1"]
    assert back[0].details == {"irradiance_wm2": 640.0, "curtailment_reason": "none",
                               "vendor_code": 7}  # fmt: skip


def test_details_become_typed_columns_with_the_rest_kept_as_json(
    sqlite_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    whole = ("--from", T0.isoformat(), "--to", (T0 + timedelta(days=1)).isoformat())
    assert export(*whole, "--asset", "pv-1", "--out", str(out), "--database-url", sqlite_url) == 0
    table = ds.dataset(out, format="parquet").to_table()
    assert table.schema.field("details_irradiance_wm2").type == pa.float64()
    assert table.schema.field("details_active_sessions").type == pa.int64()
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert set(table.column("details_extra").to_pylist()) == {'{"vendor_code":7}'}


class _PageSpy(MemoryStorage):
    """Memory storage that records the size of every page it hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: list[int] = []

    async def telemetry_pages(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> AsyncIterator[list[TelemetrySample]]:
        async for page in super().telemetry_pages(*args, **kwargs):
            self.pages.append(len(page))
            yield page


async def test_a_range_export_holds_one_page_from_storage_and_a_bounded_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage: StorageBackend = _PageSpy()
    await storage.append_telemetry(stored_samples())
    held: list[int] = []
    add = PartitionedFiles.add

    def spying_add(self: PartitionedFiles, samples: Any) -> None:
        add(self, samples)
        held.append(self._buffered)

    monkeypatch.setattr(PartitionedFiles, "add", spying_add)

    summary = await export_range(
        storage, tmp_path / "out", start=T0, end=T0 + timedelta(days=1), fmt="parquet",
        schema=schema(), page_size=5, max_buffered_rows=12,
    )  # fmt: skip

    assert isinstance(storage, _PageSpy)
    assert max(storage.pages) == 5 and sum(storage.pages) == len(stored_samples())
    assert max(held) <= 12, held
    assert summary.rows == len(stored_samples())
    assert len(summary.files) > 4, "the buffer bound did not split any partition"
    assert sorted(read_back(tmp_path / "out", "parquet"), key=lambda s: (s.ts, s.asset_id)) == (
        sorted(stored_samples(), key=lambda s: (s.ts, s.asset_id))
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from", "2024-06-02", "--to", "2024-06-01"), "--to 2024-06-01T00:00:00+00:00 must"),
        (("--from", "last tuesday", "--to", "2024-06-01"), "--from 'last tuesday' is not"),
        (("--from", "2024-06-01", "--to", "2024-06-02", "--asset", "nope"),
         "unknown asset 'nope': storage holds no telemetry of it (stored: bess-1, pv-1, wind-1)"),
        (("--from", "2024-06-01", "--to", "2024-06-02", "--site", "nope"),
         "unknown site 'nope'"),
        (("--from", "2024-06-01", "--to", "2024-06-02", "--page-size", "0"), "--page-size 0"),
    ],
)  # fmt: skip
def test_bad_export_arguments_are_refused_naming_them(
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    code = export(*args, "--out", str(tmp_path / "out"), "--database-url", sqlite_url)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_unknown_site_is_named_from_the_inventory_when_given(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = Path(__file__).parent.parent / "examples" / "assets.yaml"
    code = export(
        "--from", "2024-06-01", "--to", "2024-06-02", "--site", "no-such-site",
        "--assets", str(inventory), "--out", str(tmp_path / "out"), "--database-url", sqlite_url,
    )  # fmt: skip
    assert code == 2
    assert "unknown site 'no-such-site'" in capsys.readouterr().err


def test_output_folders_that_cannot_take_an_export_are_refused(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--from", "2024-06-01", "--to", "2024-06-03", "--database-url", sqlite_url)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert export(*args, "--out", str(a_file)) == 2
    assert f"output {a_file} is a file" in capsys.readouterr().err

    used = tmp_path / "used"
    used.mkdir()
    (used / "old.parquet").write_text("x")
    assert export(*args, "--out", str(used)) == 2
    assert f"output folder {used} is not empty" in capsys.readouterr().err

    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert export(*args, "--out", str(locked / "out")) == 2
        assert "cannot create output folder" in capsys.readouterr().err


def test_a_missing_sqlite_database_is_refused_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/nothing-here.db"
    code = export("--from", "2024-06-01", "--to", "2024-06-02", "--out", str(tmp_path / "o"),
                  "--database-url", url)  # fmt: skip
    assert code == 2
    assert f"no SQLite database at {tmp_path}/nothing-here.db" in capsys.readouterr().err
    assert not (tmp_path / "nothing-here.db").exists()


class _ModeText(msgspec.Struct, kw_only=True):
    mode: str | None = None
    level: float | None = None


class _ModeNumber(msgspec.Struct, kw_only=True):
    mode: int | None = None


def test_a_field_two_types_declare_differently_has_no_column_and_loses_nothing() -> None:
    types = [
        AssetType(name="a", details=_ModeText, description=""),
        AssetType(name="b", details=_ModeNumber, description=""),
    ]
    shared = ExportSchema.for_asset_types(types)
    assert [f.name for f in shared.arrow][-2:] == ["details_level", "details_extra"]
    samples = [
        TelemetrySample(asset_id="x", site_id="s", ts=T0, mw=1, details={"mode": "eco"}),
        TelemetrySample(asset_id="y", site_id="s", ts=T0, mw=1, details={"mode": 3, "level": 2}),
    ]
    table = shared.table(samples, {"x": "a", "y": "b"})
    assert table.column("details_extra").to_pylist() == ['{"mode":"eco"}', '{"mode":3}']
    assert samples_from_table(table) == samples


def test_the_export_guide_names_only_real_options_and_variables() -> None:
    """docs/export.md: every ``der export`` option and ``HEADEND_EXPORT*`` variable it
    names exists, and every option of ``der export`` is named there."""
    import argparse
    import re

    from der_sdk.export.command import add_export_arguments
    from der_sdk_headend import config

    guide = (Path(__file__).parent.parent / "docs" / "export.md").read_text()
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    options.discard("--help")
    usage = guide[guide.index("## `der export`") : guide.index("## `GET /telemetry/export`")]
    assert set(re.findall(r"(--[a-z-]+)", usage)) == options
    variables = set(re.findall(r"HEADEND_EXPORT[A-Z_]*", guide)) - {"HEADEND_EXPORTER_"}
    documented = set(re.findall(r"HEADEND_EXPORT[A-Z_]*", config.__doc__ or ""))
    assert variables <= documented | {"HEADEND_EXPORTER_LAKE_DIR", "HEADEND_EXPORTER_"}
