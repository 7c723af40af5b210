"""The console's Asset page (``/console/assets/{asset_id}``) and its trend data
(``/console/assets/{asset_id}/trend``, JSON, downsampled on the server: :mod:`.trend`)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Router, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import FromPath, FromQuery
from litestar.response import Template
from litestar_htmx import HTMXRequest

from der_sdk.errors import UnknownNameError
from der_sdk.models import utc_now
from der_sdk_headend.console import EXCEPTION_HANDLERS, render
from der_sdk_headend.console.auth import page
from der_sdk_headend.console.pages import control_view, key_figures
from der_sdk_headend.console.trend import (
    DEFAULT_POINTS,
    RANGES,
    Trend,
    numeric_detail_fields,
    parse_range,
    parse_time,
    read_trend,
)

if TYPE_CHECKING:
    from litestar.types import ControllerRouterHandler

    from der_sdk.models import Asset
    from der_sdk_headend.service import Headend

__all__ = [
    "AgentView",
    "agent_of",
    "asset_page",
    "asset_trend",
    "detail_series",
    "live_handlers",
]


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
    **page("viewer"),
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


RECENT_SESSIONS = 10
LATEST_CARDS = 4
"""Detail cards in the Asset page's latest figures: the type's key figures, then its
other numeric details."""
RECENT_DISPATCHES = 20


class AgentView(msgspec.Struct, kw_only=True):
    """Who serves the asset now (in a cluster: on whichever replica)."""

    connected: bool
    agent_id: str | None = None
    peer: str | None = None
    headend_id: str | None = None
    last_seen: datetime | None = None


def agent_of(headend: Headend, asset_id: str) -> AgentView:
    """The agent serving ``asset_id`` now, as ``GET /agents`` tells it."""
    presence = headend.presence
    cluster = headend.cluster_presence
    if cluster is not None:
        entry = cluster.holder_of_asset(asset_id)
        if entry is not None:
            return AgentView(
                connected=True,
                agent_id=entry.agent_id,
                peer=entry.peer,
                headend_id=entry.headend_id,
                last_seen=presence.last_seen(asset_id),
            )
    elif (stream := presence.stream_for(asset_id)) is not None:
        return AgentView(
            connected=True,
            agent_id=stream.agent_id,
            peer=stream.peer,
            headend_id=headend.config.headend_id,
            last_seen=presence.last_seen(asset_id),
        )
    return AgentView(connected=False, last_seen=presence.last_seen(asset_id))


@get("/console/assets/{asset_id:str}", **page("viewer"))
async def asset_page(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    asset_id: FromPath[str],
    range: FromQuery[str | None] = None,
) -> Template:
    """An asset: live figures (its type's key figures first), its control kind and the
    range it can take now, trends over a chosen range, its agent and sessions, its recent
    dispatches."""
    asset = _asset(headend, asset_id)
    chosen = range if range in RANGES else "1h"
    sessions, dispatches = await asyncio.gather(
        headend.storage.recent_sessions(asset_id, RECENT_SESSIONS),
        headend.storage.dispatch_history(asset_id=asset_id, limit=RECENT_DISPATCHES),
    )
    details = detail_series(headend, asset)
    site = headend.inventory.sites.get(asset.site_id)
    latest = headend.ingest.latest(asset_id)
    figures = key_figures(asset.asset_type, latest)
    shown = {f.figure.field for f in figures}
    others = [name for name in details if name not in shown]
    return render(
        request,
        headend,
        "asset.html",
        {
            "title": asset.name,
            "asset": asset,
            "site": site,
            "latest": latest,
            "figures": figures,
            "other_details": others[: max(0, LATEST_CARDS - len(figures))],
            "control": control_view(headend, asset),
            "agent": agent_of(headend, asset_id),
            "sessions": sessions,
            "dispatches": dispatches,
            "details": details,
            "ranges": list(RANGES),
            "range": chosen,
        },
    )


def live_handlers() -> list[ControllerRouterHandler]:
    """The console-live part's routes: the Asset page (in a router that sends a visitor
    who is not signed in to the sign-in page, as the other pages), its trend data and the
    live stream (whose refusals stay plain 401/403: they are fetched by scripts)."""
    from der_sdk_headend.console.events import console_events

    pages = Router(
        "/",
        route_handlers=[asset_page],
        request_class=HTMXRequest,
        exception_handlers=EXCEPTION_HANDLERS,
        include_in_schema=False,
    )
    return [pages, asset_trend, console_events]
