"""``der export``: a time range of stored telemetry into Parquet or CSV files by day and
site, from the storage the headend uses (``DATABASE_URL``). docs/export.md."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from der_sdk.errors import DerSdkError
from der_sdk.storage.contract import DEFAULT_DATABASE_URL, EXPORT_PAGE_ROWS, open_storage

if TYPE_CHECKING:
    from der_sdk.export.range import ExportSummary
    from der_sdk.export.schema import ExportSchema
    from der_sdk.storage.contract import StorageBackend

__all__ = ["add_export_arguments", "cmd_export"]


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="TIME",
        help="first time exported, inclusive (ISO 8601; without a zone: UTC)",
    )
    p.add_argument(
        "--to", dest="end", required=True, metavar="TIME", help="end of the range, exclusive"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--site", metavar="SITE_ID", help="only this site's assets")
    which.add_argument("--asset", metavar="ASSET_ID", help="only this asset")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="an empty or new folder")
    p.add_argument(
        "--database-url",
        help=f"storage URL (env DATABASE_URL, default {DEFAULT_DATABASE_URL})",
    )
    p.add_argument(
        "--assets",
        help="inventory YAML (env ASSETS_PATH): fills the asset_type column and checks "
        "--site and --asset against it",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=EXPORT_PAGE_ROWS,
        help=f"samples read from storage at a time (default {EXPORT_PAGE_ROWS})",
    )


def cmd_export(ns: argparse.Namespace) -> int:
    from der_sdk.cli import run_async
    from der_sdk.export.range import check_range, parse_export_time
    from der_sdk.export.schema import ExportSchema
    from der_sdk.inventory import load_inventory
    from der_sdk.plugins import load_plugins
    from der_sdk.storage.sqlite import sqlite_path_from_url

    start = parse_export_time(ns.start, "--from")
    end = parse_export_time(ns.end, "--to")
    check_range(start, end)
    if ns.page_size < 1:
        raise DerSdkError(f"--page-size {ns.page_size} must be at least 1")
    plugins = load_plugins()
    url = ns.database_url or os.environ.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL
    if url.partition(":")[0].lower() == "sqlite":
        path = sqlite_path_from_url(url)
        if path != ":memory:" and not Path(path).is_file():
            raise DerSdkError(f"no SQLite database at {path} (DATABASE_URL={url})")
    assets_path = ns.assets or os.environ.get("ASSETS_PATH", "").strip() or None
    target = _Target(site_id=ns.site, asset_id=ns.asset, checked=bool(assets_path))
    if assets_path:
        inventory = load_inventory(assets_path, asset_types=plugins.asset_types.names())
        target.asset_types = {a.asset_id: a.asset_type for a in inventory.assets.values()}
        if target.site_id:
            target.site_id = inventory.site(target.site_id).site_id
        if target.asset_id:
            target.asset_id = inventory.asset(target.asset_id).asset_id
    schema = ExportSchema.for_asset_types(
        plugins.asset_types.get(name) for name in plugins.asset_types.names()
    )
    storage = open_storage(url, plugins)
    summary = run_async(_export(ns, storage, schema, target, start, end))
    print(f"exported {summary.rows} sample(s) into {len(summary.files)} file(s) under {ns.out}")
    return 0


@dataclass
class _Target:
    """What to export, as the inventory spells it when one was given (``checked``)."""

    site_id: str | None
    asset_id: str | None
    checked: bool
    asset_types: dict[str, str] = field(default_factory=dict)


async def _export(
    ns: argparse.Namespace,
    storage: StorageBackend,
    schema: ExportSchema,
    target: _Target,
    start: datetime,
    end: datetime,
) -> ExportSummary:
    from der_sdk.export.range import export_range

    await storage.open()
    try:
        if not target.checked and (target.site_id or target.asset_id):
            await _check_stored(storage, target.site_id, target.asset_id)
        return await export_range(
            storage,
            ns.out,
            start=start,
            end=end,
            fmt=ns.format,
            schema=schema,
            site_id=target.site_id,
            asset_id=target.asset_id,
            asset_types=target.asset_types,
            page_size=ns.page_size,
        )
    finally:
        await storage.close()


async def _check_stored(storage: StorageBackend, site_id: str | None, asset_id: str | None) -> None:
    """Without an inventory, an unknown id is one storage holds no telemetry of."""
    latest = await storage.latest_telemetry()
    known: tuple[str, str | None, list[str]]
    if asset_id:
        known = ("asset", asset_id, sorted(latest))
    else:
        known = ("site", site_id, sorted({sample.site_id for sample in latest.values()}))
    kind, wanted, stored = known
    if wanted not in stored:
        listed = ", ".join(stored[:20]) + (" ..." if len(stored) > 20 else "") or "none"
        raise DerSdkError(
            f"unknown {kind} {wanted!r}: storage holds no telemetry of it (stored: {listed}); "
            "check the id, or pass --assets with the inventory"
        )
