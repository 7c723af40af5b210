"""The console's Fleet, Agents and Audit pages.

Every page filters and pages on the server, so it stays quick with thousands of assets: a
search or filter change is an htmx ``GET`` of the same URL that answers with the table
alone (``partials/*.html``), and the URL keeps the filter (``hx-push-url``).

Live values (the page is right without them: the server renders the values of the
moment): each asset row is ``tr[data-asset-id][data-site-id]``; its live cells carry
``data-asset-id`` and ``data-field`` (``mw``, ``mw_setpoint``, ``quality``,
``details.<key figure>``, one per figure of :data:`KEY_FIGURES`), which live.js updates
from the one SSE stream; console.js
(``derConsole.fleet``) keeps each site row's aggregate (``td[data-field="site_mw"]``, from
the rows and the site row's ``data-others``), the status badge and last seen in step. The
table is re-read (one htmx request, not one per asset) after a ``resync`` and every 30 s
while the keyboard focus is not in it, for connects and disconnects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.params import FromQuery
from litestar.response import Template

from der_sdk.models import Asset, BufferStats, TelemetrySample
from der_sdk_headend.audit import AUDIT_KIND
from der_sdk_headend.console import render
from der_sdk_headend.console.auth import page
from der_sdk_headend.rest.assets import control_state
from der_sdk_headend.rest.audit import audit_record
from der_sdk_headend.rest.params import MAX_LIMIT

if TYPE_CHECKING:
    from der_sdk_headend.rest.schemas import ControlState
    from der_sdk_headend.service import Headend

__all__ = [
    "KEY_FIGURES",
    "NO_VALUE",
    "PAGE_HANDLERS",
    "PAGE_SIZE",
    "AssetView",
    "ControlView",
    "FigureValue",
    "KeyFigure",
    "SiteView",
    "control_view",
    "fleet_view",
    "key_figures",
]

PAGE_SIZE = 200
"""Asset rows per page on the Fleet and Agents pages."""
STATUSES = ("all", "online", "offline")


@dataclass(frozen=True)
class KeyFigure:
    """A ``details`` field the console shows for an asset type, and how."""

    field: str
    label: str
    unit: str
    digits: int = 1


KEY_FIGURES: dict[str, tuple[KeyFigure, ...]] = {
    "bess": (KeyFigure("soc_pct", "State of charge", "%"),),
    "pv": (
        KeyFigure("irradiance_wm2", "Irradiance", "W/m²", 0),
        KeyFigure("curtailed_mw", "Curtailed", "MW curtailed", 2),
    ),
    "wind": (KeyFigure("wind_speed_ms", "Wind speed", "m/s"),),
    "ev_charger": (KeyFigure("active_sessions", "Sessions", "sessions", 0),),
}
"""The key figures per asset type, shown on the Fleet, Site and Asset pages; a type not
listed shows its first numeric detail."""


NO_VALUE = "\u2013"
"""What a figure without a value shows (an en dash, as live.js and the templates)."""


@dataclass(frozen=True)
class FigureValue:
    """One key figure of one sample (``value`` ``None``: the sample does not carry it)."""

    figure: KeyFigure
    value: float | None

    @property
    def text(self) -> str:
        """``"55.0 %"``, ``"0.40 MW curtailed"``; :data:`NO_VALUE` without a value (as
        live.js formats them)."""
        if self.value is None:
            return NO_VALUE
        number = f"{self.value:.{self.figure.digits}f}"
        return f"{number} {self.figure.unit}" if self.figure.unit else number


def key_figures(asset_type: str, sample: TelemetrySample | None) -> list[FigureValue]:
    """The key figures of ``asset_type`` with their values in ``sample``. A type without
    known figures gets its first numeric detail, none when the sample has none."""
    details = sample.details if sample is not None else {}
    known = KEY_FIGURES.get(asset_type)
    if known is not None:
        return [FigureValue(f, _number(details.get(f.field))) for f in known]
    for name, value in details.items():
        number = _number(value)
        if number is not None:
            return [FigureValue(KeyFigure(name, name, ""), number)]
    return []


CONTROL_MEANING: dict[str, tuple[str, str]] = {
    "setpoint": ("setpoint", "a dispatch sets the MW it runs at"),
    "export_limit": ("export limit", "a dispatch caps its export; it makes what it can below"),
    "import_limit": ("import limit", "a dispatch caps its draw; it draws what it needs below"),
}
"""Each control kind's name in words and what a dispatch's MW means for it."""


@dataclass(frozen=True)
class ControlView:
    """An asset's control kind and the range it can take now (``GET /assets``'s
    ``control``), with words for the page."""

    state: ControlState

    @property
    def kind(self) -> str:
        return self.state.kind

    @property
    def label(self) -> str:
        return CONTROL_MEANING.get(self.state.kind, (self.state.kind, ""))[0]

    @property
    def meaning(self) -> str:
        return CONTROL_MEANING.get(self.state.kind, ("", ""))[1]

    @property
    def range_text(self) -> str:
        return f"{self.state.min_mw:.2f} to {self.state.max_mw:.2f} MW"


def control_view(headend: Headend, asset: Asset) -> ControlView:
    """``asset``'s control now, as ``GET /assets/{asset_id}`` shows it."""
    return ControlView(control_state(headend, asset))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class AssetView:
    """One asset row: inventory, presence and the latest sample."""

    asset: Asset
    site_name: str
    connected: bool
    last_seen: datetime | None
    sample: TelemetrySample | None
    figures: list[FigureValue]
    peer: str | None = None
    agent_id: str | None = None
    buffer: BufferStats | None = None

    @property
    def offline(self) -> bool:
        """Not connected, or connected and reporting itself offline."""
        return not self.connected or (self.sample is not None and not self.sample.online)


@dataclass
class SiteView:
    """A site and its assets on this page; the aggregates cover all its assets."""

    site_id: str
    name: str
    mw: float
    assets_total: int
    connected: int
    rows: list[AssetView] = field(default_factory=list)
    others: dict[str, float] = field(default_factory=dict)
    """The latest MW of the site's assets not on this page, so the page can keep the site's
    aggregate live (``data-others`` on the site row)."""

    @property
    def others_json(self) -> str:
        return json.dumps(self.others, separators=(",", ":"))


@dataclass
class FleetView:
    """What the Fleet and Agents tables show: one page of matching assets by site."""

    sites: list[SiteView]
    total_assets: int
    matching: int
    offline: int
    page: int
    pages: int
    fleet_mw: float
    query: dict[str, str]

    def page_query(self, number: int) -> str:
        """The query string of page ``number`` with the same filters."""
        from urllib.parse import urlencode

        return urlencode({**{k: v for k, v in self.query.items() if v}, "page": number})


def _asset_views(headend: Headend) -> list[AssetView]:
    inventory = headend.inventory
    presence = headend.presence_or_none
    ingest = headend.ingest_or_none
    cluster = headend.cluster_presence
    views: list[AssetView] = []
    for asset in inventory.assets.values():
        site = inventory.sites.get(asset.site_id)
        peer = agent_id = None
        buffer = None
        if cluster is not None:
            entry = cluster.holder_of_asset(asset.asset_id)
            if entry is not None:
                peer, agent_id = entry.peer, entry.agent_id
        stream = presence.stream_for(asset.asset_id) if presence is not None else None
        if stream is not None:
            peer, agent_id, buffer = stream.peer, stream.agent_id, stream.buffer
        sample = ingest.latest(asset.asset_id) if ingest is not None else None
        views.append(
            AssetView(
                asset=asset,
                site_name=site.name if site else asset.site_id,
                connected=agent_id is not None,
                last_seen=presence.last_seen(asset.asset_id) if presence is not None else None,
                sample=sample,
                figures=key_figures(asset.asset_type, sample),
                peer=peer,
                agent_id=agent_id,
                buffer=buffer,
            )
        )
    return views


def _matches(view: AssetView, words: list[str], site: str, status: str, kind: str) -> bool:
    if site and view.asset.site_id != site:
        return False
    if kind and view.asset.asset_type != kind:
        return False
    if (status == "online" and view.offline) or (status == "offline" and not view.offline):
        return False
    if words:
        text = " ".join(
            (
                view.asset.name,
                view.asset.asset_id,
                view.site_name,
                view.asset.asset_type,
                view.agent_id or "",
                view.peer or "",
            )
        ).lower()
        return all(word in text for word in words)
    return True


def fleet_view(
    headend: Headend,
    *,
    q: str = "",
    site: str = "",
    status: str = "all",
    kind: str = "",
    page_number: int = 1,
    page_size: int = PAGE_SIZE,
) -> FleetView:
    """One page of the assets matching the filters, grouped by site (sites in inventory
    order, assets by name), with each site's aggregate MW and connected count over all
    its assets."""
    views = _asset_views(headend)
    by_site: dict[str, list[AssetView]] = {}
    for view in views:
        by_site.setdefault(view.asset.site_id, []).append(view)
    words = q.lower().split()
    status = status if status in STATUSES else "all"
    matching = sorted(
        (v for v in views if _matches(v, words, site, status, kind)),
        key=lambda v: (v.site_name.lower(), v.asset.site_id, v.asset.name.lower()),
    )
    pages = max(1, math.ceil(len(matching) / page_size))
    page_number = min(max(1, page_number), pages)
    shown = matching[(page_number - 1) * page_size : page_number * page_size]
    sites: dict[str, SiteView] = {}
    for view in shown:
        site_view = sites.get(view.asset.site_id)
        if site_view is None:
            members = by_site[view.asset.site_id]
            site_view = sites[view.asset.site_id] = SiteView(
                site_id=view.asset.site_id,
                name=view.site_name,
                mw=sum(m.sample.mw for m in members if m.sample is not None),
                assets_total=len(members),
                connected=sum(1 for m in members if m.connected),
            )
        site_view.rows.append(view)
    for site_view in sites.values():
        shown_ids = {row.asset.asset_id for row in site_view.rows}
        site_view.others = {
            m.asset.asset_id: m.sample.mw
            for m in by_site[site_view.site_id]
            if m.asset.asset_id not in shown_ids and m.sample is not None
        }
    return FleetView(
        sites=list(sites.values()),
        total_assets=len(views),
        matching=len(matching),
        offline=sum(1 for v in views if v.offline),
        page=page_number,
        pages=pages,
        fleet_mw=sum(v.sample.mw for v in views if v.sample is not None),
        query={"q": q, "site": site, "status": status if status != "all" else "", "type": kind},
    )


def _filters(headend: Headend) -> dict[str, Any]:
    inventory = headend.inventory
    return {
        "all_sites": sorted(inventory.sites.values(), key=lambda s: s.name.lower()),
        "all_types": sorted({a.asset_type for a in inventory.assets.values()}),
        "statuses": STATUSES,
    }


def _is_partial(request: Request[Any, Any, Any]) -> bool:
    """An htmx request for the table alone (not a boosted page load, not history)."""
    headers = request.headers
    return bool(headers.get("hx-request")) and not headers.get("hx-history-restore-request")


@get("/", **page("viewer"))
async def fleet(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    q: FromQuery[str] = "",
    site: FromQuery[str] = "",
    status: FromQuery[str] = "all",
    type: FromQuery[str] = "",
    page: FromQuery[int] = 1,
) -> Template:
    """Sites and assets with their latest values; ``q`` searches name, id, site, type,
    agent and peer; ``site``, ``status`` (all, online, offline) and ``type`` filter."""
    view = fleet_view(headend, q=q.strip(), site=site, status=status, kind=type, page_number=page)
    context = {"title": "Fleet", "fleet": view, **_filters(headend)}
    template = "partials/fleet_table.html" if _is_partial(request) else "fleet.html"
    return render(request, headend, template, context)


@get("/console/agents", **page("viewer"))
async def agents(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    q: FromQuery[str] = "",
    status: FromQuery[str] = "all",
    page: FromQuery[int] = 1,
) -> Template:
    """Live agent sessions (peer, connected since, last seen, buffer figures from their
    heartbeats) and every asset's agent, searchable and paged."""
    presence = headend.presence_or_none
    streams = sorted(presence.streams() if presence is not None else [], key=lambda s: s.agent_id)
    view = fleet_view(headend, q=q.strip(), status=status, page_number=page)
    context = {
        "title": "Agents",
        "streams": streams,
        "fleet": view,
        "statuses": STATUSES,
        "cluster": headend.cluster_presence is not None,
    }
    template = "partials/agents_table.html" if _is_partial(request) else "agents.html"
    return render(request, headend, template, context)


@get("/console/audit", **page("admin"))
async def audit(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    action: FromQuery[str | None] = None,
) -> Template:
    """The audit trail, newest first (admins only), optionally one action."""
    limit = 200
    window = MAX_LIMIT if action else limit
    events = await headend.storage.events(kind=AUDIT_KIND, limit=window)
    records = [audit_record(e) for e in events]
    if action:
        records = [r for r in records if r.action == action]
    context = {"title": "Audit", "records": records[:limit], "action": action or ""}
    return render(request, headend, "audit.html", context)


PAGE_HANDLERS = [fleet, agents, audit]
