"""``/heartbeat``: the latest heartbeat of an asset, and its stored history."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

from der_sdk.models import Heartbeat
from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.errors import known_asset
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.params import LimitQuery, TimeQuery, check_limit, parse_time

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["HeartbeatController"]


class HeartbeatController(Controller):
    path = "/heartbeat"
    tags = ["presence"]

    @get(
        "/{asset_id:str}",
        summary="The latest heartbeat recorded for an asset",
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def latest(self, headend: NamedDependency[Headend], asset_id: FromPath[str]) -> Heartbeat:
        asset = known_asset(headend.inventory, asset_id)
        beat = await headend.storage.latest_heartbeat(asset.asset_id)
        if beat is None:
            raise NotFoundException(f"no heartbeat received yet for asset {asset.asset_id}")
        return beat

    @get(
        "/{asset_id:str}/history",
        summary="Stored heartbeats, newest first",
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def history(
        self,
        headend: NamedDependency[Headend],
        asset_id: FromPath[str],
        start: TimeQuery = None,
        end: TimeQuery = None,
        limit: LimitQuery = 100,
    ) -> list[Heartbeat]:
        asset = known_asset(headend.inventory, asset_id)
        return await headend.storage.heartbeat_history(
            asset.asset_id,
            start=parse_time(start, "start"),
            end=parse_time(end, "end"),
            limit=check_limit(limit),
        )
