"""``/telemetry``: the latest sample of an asset, and its stored history."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery

from der_sdk.models import TelemetrySample
from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.errors import known_asset
from der_sdk_headend.rest.params import check_limit, parse_time

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["TelemetryController"]


class TelemetryController(Controller):
    path = "/telemetry"
    tags = ["telemetry"]

    @get(
        "/{asset_id:str}",
        summary="The latest sample: core fields plus `details`",
        **access("viewer"),
    )
    async def latest(
        self, headend: NamedDependency[Headend], asset_id: FromPath[str]
    ) -> TelemetrySample:
        asset = known_asset(headend.inventory, asset_id)
        sample = headend.ingest.latest(asset.asset_id)
        if sample is None:
            raise NotFoundException(f"no telemetry received yet for asset {asset.asset_id}")
        return sample

    @get(
        "/{asset_id:str}/history",
        summary="Stored samples, newest first",
        description="`start` inclusive, `end` exclusive, ISO 8601 (a naive time is UTC); "
        "`limit` 1..10000, default 100.",
        **access("viewer"),
    )
    async def history(
        self,
        headend: NamedDependency[Headend],
        asset_id: FromPath[str],
        start: FromQuery[str | None] = None,
        end: FromQuery[str | None] = None,
        limit: FromQuery[int] = 100,
    ) -> list[TelemetrySample]:
        asset = known_asset(headend.inventory, asset_id)
        return await headend.storage.telemetry_history(
            asset.asset_id,
            start=parse_time(start, "start"),
            end=parse_time(end, "end"),
            limit=check_limit(limit),
        )
