"""``/assets`` and ``/sites``: the inventory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from der_sdk.models import Asset
from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.errors import known_asset
from der_sdk_headend.rest.schemas import SiteRow

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["AssetsController"]


class AssetsController(Controller):
    tags = ["inventory"]

    @get("/assets", summary="Every asset of the inventory, in file order", **access("viewer"))
    async def list_assets(self, headend: NamedDependency[Headend]) -> list[Asset]:
        return list(headend.inventory.assets.values())

    @get("/assets/{asset_id:str}", summary="One asset", **access("viewer"))
    async def get_asset(self, headend: NamedDependency[Headend], asset_id: FromPath[str]) -> Asset:
        return known_asset(headend.inventory, asset_id)

    @get("/sites", summary="Every site with the ids of its assets", **access("viewer"))
    async def list_sites(self, headend: NamedDependency[Headend]) -> list[SiteRow]:
        inventory = headend.inventory
        return [
            SiteRow(
                site_id=site.site_id,
                name=site.name,
                location=site.location,
                asset_ids=[a.asset_id for a in inventory.assets_for_site(site.site_id)],
            )
            for site in inventory.sites.values()
        ]
