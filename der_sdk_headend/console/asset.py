"""The console's Asset page (``/console/assets/{asset_id}``) and its trend data
(``/console/assets/{asset_id}/trend``, JSON, downsampled on the server: :mod:`.trend`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import FromPath, FromQuery

from der_sdk.errors import UnknownNameError
from der_sdk.models import utc_now
from der_sdk_headend.console.trend import (
    DEFAULT_POINTS,
    Trend,
    numeric_detail_fields,
    parse_range,
    parse_time,
    read_trend,
)
from der_sdk_headend.rest.auth import access

if TYPE_CHECKING:
    from der_sdk.models import Asset
    from der_sdk_headend.service import Headend

__all__ = ["ASSET_HANDLERS", "asset_trend", "detail_series"]


def _asset(headend: Headend, asset_id: str) -> Asset:
    asset = headend.inventory.assets.get(asset_id)
    if asset is None:
        raise NotFoundException(f"unknown asset {asset_id}")
    return asset


def detail_series(headend: Headend, asset: Asset) -> list[str]:
    """The numeric ``details`` fields of the asset's type (``soc_pct`` for a battery...)."""
    try:
        asset_type = headend.plugins.asset_types.get(asset.asset_type)
    except UnknownNameError:  # a type no plugin provides any more: details unknown
        return []
    return numeric_detail_fields(asset_type.details)


@get(
    "/console/assets/{asset_id:str}/trend",
    **access("viewer"),
    include_in_schema=False,
)
async def asset_trend(
    headend: NamedDependency[Headend],
    asset_id: FromPath[str],
    range: FromQuery[str | None] = None,
    start: FromQuery[str | None] = None,
    end: FromQuery[str | None] = None,
    points: FromQuery[int] = DEFAULT_POINTS,
) -> Trend:
    """An asset's mw, mw_setpoint and numeric details over ``range`` (15m, 1h, 24h, 7d)
    or ``start``/``end`` (ISO 8601), in at most ``points`` (10..1000) buckets of min, max
    and average."""
    asset = _asset(headend, asset_id)
    try:
        window = parse_range(
            range,
            parse_time(start, "start") if start else None,
            parse_time(end, "end") if end else None,
            utc_now(),
        )
        if not 10 <= points <= 1000:
            raise ValueError(f"points: {points} is not between 10 and 1000")
    except ValueError as exc:
        raise ValidationException(str(exc)) from None
    return await read_trend(
        headend.storage,
        asset.asset_id,
        *window,
        max_points=points,
        details=detail_series(headend, asset),
    )


ASSET_HANDLERS: tuple[Any, ...] = (asset_trend,)
"""The route handlers of this module, for the console's router."""
