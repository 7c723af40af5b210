"""``/assets`` and ``/sites``: the inventory, with each asset's control state now."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.params import FromPath, QueryParameter

from der_sdk.control import DEFAULT_CONTROL
from der_sdk.models import DISPATCH_HORIZON_S, Asset, utc_now
from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.errors import known_asset
from der_sdk_headend.rest.schemas import AssetRow, ControlState, SiteRow

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["AssetsController", "control_state"]

DurationQuery = Annotated[
    float | None,
    QueryParameter(
        description="Seconds a dispatch would hold: a battery's available range is what its "
        f"energy allows for that long (more than 0, at most {DISPATCH_HORIZON_S}).",
        schema_extra={
            "one_of": None,
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": DISPATCH_HORIZON_S,
        },
    ),
]


def _check_duration(duration_s: float | None) -> float | None:
    if duration_s is not None and not 0 < duration_s <= DISPATCH_HORIZON_S:
        raise ValidationException(
            f"query parameter `duration_s`: must be more than 0 and at most "
            f"{DISPATCH_HORIZON_S} seconds, got {duration_s:g}"
        )
    return duration_s


def control_state(headend: Headend, asset: Asset, duration_s: float | None = None) -> ControlState:
    """``asset``'s control kind and the range it can take now (for a dispatch of
    ``duration_s``), from the headend's latest sample: the ``control`` of ``GET /assets``,
    also shown by the console."""
    asset_type = asset.asset_type
    types = headend.plugins.asset_types
    model = types.get(asset_type).control if asset_type in types else DEFAULT_CONTROL
    ingest = headend.ingest_or_none
    latest = ingest.latest(asset.asset_id) if ingest is not None else None
    available = model.available_range(asset, latest, duration_s, now=utc_now())
    return ControlState(
        kind=model.kind,
        min_mw=available.min_mw,
        max_mw=available.max_mw,
        basis=available.basis,
        as_of=available.as_of,
    )


def _row(headend: Headend, asset: Asset, duration_s: float | None) -> AssetRow:
    return AssetRow(
        **msgspec.structs.asdict(asset), control=control_state(headend, asset, duration_s)
    )


class AssetsController(Controller):
    tags = ["inventory"]

    @get(
        "/assets",
        summary="Every asset of the inventory, in file order, with its control state now",
        **access("viewer"),
    )
    async def list_assets(
        self, headend: NamedDependency[Headend], duration_s: DurationQuery = None
    ) -> list[AssetRow]:
        duration_s = _check_duration(duration_s)
        return [_row(headend, a, duration_s) for a in headend.inventory.assets.values()]

    @get(
        "/assets/{asset_id:str}", summary="One asset with its control state now", **access("viewer")
    )
    async def get_asset(
        self,
        headend: NamedDependency[Headend],
        asset_id: FromPath[str],
        duration_s: DurationQuery = None,
    ) -> AssetRow:
        duration_s = _check_duration(duration_s)
        return _row(headend, known_asset(headend.inventory, asset_id), duration_s)

    @get("/sites", summary="Every site with the ids of its assets", **access("viewer"))
    async def list_sites(self, headend: NamedDependency[Headend]) -> list[SiteRow]:
        inventory = headend.inventory
        return [
            SiteRow(
                site_id=site.site_id,
                name=site.name,
                location=site.location,
                latitude=site.latitude,
                longitude=site.longitude,
                split_policy=site.split_policy,
                asset_ids=[a.asset_id for a in inventory.assets_for_site(site.site_id)],
            )
            for site in inventory.sites.values()
        ]
