"""The console's Site and Dispatch pages: a site's assets and aggregate MW, the dispatch
form with its guardrails and split preview, and the history of dispatches.

Guardrails, enforced here on the server whatever the page did:

- the form is planned by the dispatcher's own planning (:meth:`Dispatcher.preview`, the
  same as ``POST /dispatch/preview``), so the preview shows exactly the targets a
  confirmed dispatch gets;
- a value outside the target's limits (an asset's ``[min_mw, max_mw]``, a site's sum of
  them) is refused (400), where REST would clamp it: in the console it is a typing
  mistake more often than an intent;
- a site dispatch, or a change of an asset's setpoint larger than ``CONSOLE_CONFIRM_SHARE``
  of its capacity (the larger absolute value of ``min_mw`` and ``max_mw``), is sent only with
  ``confirm=yes``; without it the answer is the preview asking for confirmation;
- the operator role (``page("operator")``) and the CSRF token are checked by the access
  middleware, so a viewer's forged post is refused with 403;
- a sent dispatch is audited as ``dispatch.create`` with ``via=console``, through the same
  code as ``POST /dispatch`` (:func:`~der_sdk_headend.rest.dispatch.submit_audited`).

Element ids and form field names are stable: the browser tests (tests/console) use them.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Redirect, Template

from der_sdk.errors import UnknownNameError
from der_sdk.models import Asset, Dispatch, DispatchRequest, TelemetrySample, utc_now
from der_sdk_headend.console import render
from der_sdk_headend.console.auth import page
from der_sdk_headend.console.pages import ControlView, FigureValue, control_view, key_figures
from der_sdk_headend.console.schedules import (
    SCHEDULE_FIELDS,
    ScheduleFormError,
    schedule_confirmation,
    schedule_fields,
    with_line,
)
from der_sdk_headend.console.schedules import (
    names_of as _names,
)
from der_sdk_headend.console.trend import READ_CONCURRENCY
from der_sdk_headend.dispatch import InvalidDispatchError, UnknownTargetError
from der_sdk_headend.dispatch.lifecycle import is_open
from der_sdk_headend.dispatch.planning import DispatchPreview
from der_sdk_headend.rest.dispatch import submit_audited

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = [
    "DISPATCH_HANDLERS",
    "Guard",
    "needs_confirmation",
    "out_of_range",
]

SITE_PAGE_SIZE = 100
"""Assets per page of the Site page's table."""
HISTORY_LIMIT = 50
"""Dispatches in the history on the Dispatch page (newest first)."""
TREND_MINUTES = 15
"""How far back the Site page's aggregate MW trend starts (server values)."""
TREND_BUCKET_S = 10
TREND_ASSETS = 100
"""At most this many assets (by name) feed a site's server-side trend: a 1,000-asset site
would otherwise cost 1,000 history reads per page view. The page says so when it leaves
some out; the live tail sums them all."""
TREND_SAMPLES = 600
"""Newest samples read per asset for the trend (15 minutes at one sample every 1.5 s)."""
_FIELDS = ("mw", "duration_s", "ttl_s", "expires_at", "policy", *SCHEDULE_FIELDS)


class _Refused(HTTPException):
    """A console form refused (400): rendered as the form's error message."""

    status_code = 400


@dataclass(frozen=True, kw_only=True)
class Guard:
    """The limits of a dispatch target and what the console asks before sending to it."""

    kind: str
    """``asset`` or ``site``."""
    target_id: str
    name: str
    min_mw: float
    max_mw: float
    current_mw: float | None
    """The asset's setpoint now (its latest sample); ``None`` for a site or no sample."""
    capacity_mw: float


def guard_of(headend: Headend, asset_id: str | None, site_id: str | None) -> Guard:
    """The limits of the target named by the form (``asset_id`` wins, as in REST).

    :raises UnknownTargetError: not in the inventory.
    """
    inventory = headend.inventory
    if asset_id:
        try:
            asset = inventory.asset(asset_id)
        except UnknownNameError:
            raise UnknownTargetError(f"unknown asset {asset_id}") from None
        sample = headend.ingest.latest(asset.asset_id)
        current = None
        if sample is not None:
            current = sample.mw_setpoint if sample.mw_setpoint is not None else sample.mw
        return Guard(
            kind="asset",
            target_id=asset.asset_id,
            name=asset.name,
            min_mw=asset.min_mw,
            max_mw=asset.max_mw,
            current_mw=current,
            capacity_mw=max(abs(asset.min_mw), abs(asset.max_mw)),
        )
    if site_id:
        try:
            site = inventory.site(site_id)
        except UnknownNameError:
            raise UnknownTargetError(f"unknown site {site_id}") from None
        assets = inventory.assets_for_site(site.site_id)
        low = math.fsum(a.min_mw for a in assets)
        high = math.fsum(a.max_mw for a in assets)
        return Guard(
            kind="site",
            target_id=site.site_id,
            name=site.name,
            min_mw=low,
            max_mw=high,
            current_mw=None,
            capacity_mw=max(abs(low), abs(high)),
        )
    raise InvalidDispatchError("give asset_id or site_id: the dispatch has no target")


def out_of_range(guard: Guard, mw: float) -> str | None:
    """Why the console refuses ``mw`` for ``guard``'s target, or ``None``."""
    if guard.min_mw <= mw <= guard.max_mw:
        return None
    return (
        f"mw {mw:g} is outside the limits of {guard.kind} {guard.name} "
        f"[{guard.min_mw:g}, {guard.max_mw:g}] MW; the console sends only values within "
        "them (POST /dispatch would clamp it)"
    )


def needs_confirmation(guard: Guard, mw: float, share: float) -> str | None:
    """Why a dispatch of ``mw`` to ``guard``'s target needs a confirmation, or ``None``.

    Every site dispatch does; an asset dispatch does when it changes the setpoint (0 when
    nothing is known) by more than ``share`` of the asset's capacity.
    """
    if guard.kind == "site":
        return f"a site dispatch sets every asset of {guard.name}"
    change = abs(mw - (guard.current_mw or 0.0))
    if change > share * guard.capacity_mw:
        return (
            f"a change of {change:g} MW is more than {share:.0%} of {guard.name}'s "
            f"{guard.capacity_mw:g} MW"
        )
    return None


# ----------------------------------------------------------------------------- form


def _field(form: Any, name: str) -> str:
    value = form.get(name, "")
    return str(value).strip() if value is not None else ""


def _number(form: Any, name: str, *, required: bool = False) -> float | None:
    raw = _field(form, name)
    if not raw:
        if required:
            raise _Refused(f"form field `{name}`: give a number of {_UNITS[name]}")
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _Refused(f"form field `{name}`: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise _Refused(f"form field `{name}`: {raw!r} is not a finite number")
    return value


_UNITS = {"mw": "MW", "duration_s": "seconds", "ttl_s": "seconds"}


def _expiry(form: Any) -> datetime | None:
    """``expires_at`` from the form: ISO 8601; without a time zone it is UTC (the page's
    datetime-local field sends none, and says UTC)."""
    raw = _field(form, "expires_at")
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise _Refused(
            f"form field `expires_at`: {raw!r} is not a date and time (2026-01-01T12:00, UTC)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _target(form: Any) -> tuple[str | None, str | None]:
    """``(asset_id, site_id)`` from the form: ``target`` (``asset:<id>``/``site:<id>``,
    the Dispatch page's choice) or the fields ``asset_id``/``site_id``."""
    target = _field(form, "target")
    if target:
        kind, _, ident = target.partition(":")
        if kind not in ("asset", "site") or not ident:
            raise _Refused(f"form field `target`: {target!r} is not asset:<id> or site:<id>")
        return (ident, None) if kind == "asset" else (None, ident)
    asset_id, site_id = _field(form, "asset_id") or None, _field(form, "site_id") or None
    if not asset_id and not site_id:
        raise _Refused("form field `target`: choose an asset or a site")
    return asset_id, site_id


def _request_of(form: Any) -> DispatchRequest:
    asset_id, site_id = _target(form)
    try:  # the Dispatch page's optional schedule (start_at, steps): console/schedules.py
        schedule = schedule_fields(form)
    except ScheduleFormError as exc:
        raise _Refused(str(exc)) from None
    mw = _number(form, "mw", required="steps" not in schedule)
    body = {
        "asset_id": asset_id,
        "site_id": site_id,
        "mw": mw,
        "duration_s": _number(form, "duration_s"),
        "ttl_s": _number(form, "ttl_s"),
        "expires_at": _expiry(form),
        # a site's split policy: the Site page's selector (default: the site's
        # split_policy, else the headend's); none posted leaves that default
        "policy": _field(form, "policy") or None,
        **schedule,
    }
    try:
        return msgspec.convert(body, DispatchRequest)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = text.rpartition("at `$.")[2].rstrip("`") if "at `$." in text else ""
        message = text.partition(" - at `")[0]
        raise _Refused(f"form field `{where or 'form'}`: {message}") from None


@dataclass(frozen=True, kw_only=True)
class _Checked:
    request: DispatchRequest
    guard: Guard
    preview: DispatchPreview
    confirm_because: str | None


def _check(headend: Headend, form: Any) -> _Checked:
    """The form planned and guarded. :raises _Refused, UnknownTargetError, ...: refused."""
    request = _request_of(form)
    try:
        guard = guard_of(headend, request.asset_id, request.site_id)
        preview = headend.dispatcher.preview(request)
    except InvalidDispatchError as exc:
        raise _Refused(with_line(str(exc))) from None
    except UnknownTargetError as exc:
        raise NotFoundException(str(exc)) from None
    problem = out_of_range(guard, request.mw or 0.0)
    if problem is not None:
        raise _Refused(problem)
    share = headend.config.console_confirm_share
    return _Checked(
        request=request,
        guard=guard,
        preview=preview,
        confirm_because=schedule_confirmation(request)
        or needs_confirmation(guard, request.mw or 0.0, share),
    )


def _form_values(form: Any) -> dict[str, str]:
    values = {name: _field(form, name) for name in (*_FIELDS, "target", "asset_id", "site_id")}
    return {name: value for name, value in values.items() if value}


def _error(
    request: Request[Any, Any, Any], headend: Headend, exc: HTTPException, form: Any
) -> Template:
    return render(
        request,
        headend,
        "partials/dispatch_preview.html",
        {"error": exc.detail, "preview": None, "values": _form_values(form)},
        status_code=exc.status_code,
    )


@post("/console/dispatch/preview", **page("operator"))
async def preview_dispatch(
    request: Request[Any, Any, Any], headend: NamedDependency[Headend]
) -> Template:
    """The split preview of the form: per-asset targets after policy and clamp, the
    unallocated MW, why a confirmation is needed, and the confirm button."""
    form = await request.form()
    try:
        checked = _check(headend, form)
    except HTTPException as exc:
        return _error(request, headend, exc, form)
    return _preview_page(request, headend, checked, form)


def _preview_page(
    request: Request[Any, Any, Any],
    headend: Headend,
    checked: _Checked,
    form: Any,
    *,
    asked: bool = False,
) -> Template:
    """The preview partial of a checked form; ``asked``: it stands for a send that needs
    the operator's confirmation first."""
    context: dict[str, object] = {
        "error": None,
        "preview": checked.preview,
        "guard": checked.guard,
        "confirm_because": checked.confirm_because,
        "values": _form_values(form),
    }
    if asked:
        context["asked"] = True
    return render(request, headend, "partials/dispatch_preview.html", context)


@post("/console/dispatch", **page("operator"), status_code=200)
async def send_dispatch(
    request: Request[Any, Any, Any], headend: NamedDependency[Headend]
) -> Template | Redirect:
    """Send the form's dispatch (operator); without ``confirm=yes`` where one is needed,
    the preview asking for it instead (nothing sent)."""
    form = await request.form()
    try:
        checked = _check(headend, form)
    except HTTPException as exc:
        return _error(request, headend, exc, form)
    confirmed = _field(form, "confirm") == "yes"
    if checked.confirm_because is not None and not confirmed:
        return _preview_page(request, headend, checked, form, asked=True)
    try:
        dispatch, _ = await submit_audited(headend, request, checked.request, via="console")
    except InvalidDispatchError as exc:
        return _error(request, headend, _Refused(with_line(str(exc))), form)
    except UnknownTargetError as exc:
        return _error(request, headend, NotFoundException(str(exc)), form)
    if not request.headers.get("hx-request"):
        return Redirect(f"/console/dispatch?sent={dispatch.dispatch_id}", status_code=303)
    return render(
        request,
        headend,
        "partials/dispatch_sent.html",
        {"dispatch": dispatch, "names": _names(headend.inventory)},
        status_code=202,
    )


# ----------------------------------------------------------------------------- pages


def _connected(headend: Headend, asset_id: str) -> bool:
    cluster = headend.cluster_presence
    if cluster is not None:
        return cluster.holder_of_asset(asset_id) is not None
    return headend.presence.stream_for(asset_id) is not None


@dataclass(frozen=True, kw_only=True)
class _AssetRow:
    asset: Asset
    connected: bool
    last_seen: datetime | None
    sample: TelemetrySample | None
    figures: list[FigureValue]
    """The type's key figures (:data:`~der_sdk_headend.console.pages.KEY_FIGURES`)."""
    control: ControlView
    """Its control kind and the range it can take now."""


def _rows(headend: Headend, assets: list[Asset]) -> list[_AssetRow]:
    rows = []
    for asset in assets:
        sample = headend.ingest.latest(asset.asset_id)
        rows.append(
            _AssetRow(
                asset=asset,
                connected=_connected(headend, asset.asset_id),
                last_seen=headend.presence.last_seen(asset.asset_id),
                sample=sample,
                figures=key_figures(asset.asset_type, sample),
                control=control_view(headend, asset),
            )
        )
    return rows


async def _site_trend(headend: Headend, assets: list[Asset]) -> dict[str, list[float | None]]:
    """The site's aggregate MW over the last :data:`TREND_MINUTES`, per
    :data:`TREND_BUCKET_S` bucket: the sum over assets of each one's mean in the bucket
    (an asset without a sample in a bucket adds its last known value)."""
    end = utc_now()
    start = end - timedelta(minutes=TREND_MINUTES)
    chosen = assets[:TREND_ASSETS]
    # A few reads at a time, as the Asset page's trend does: a hundred at once would take
    # every pooled connection from the telemetry writers for as long as they run.
    limit = asyncio.Semaphore(READ_CONCURRENCY)

    async def history(asset: Asset) -> list[TelemetrySample]:
        async with limit:
            return await headend.storage.telemetry_history(
                asset.asset_id, start=start, end=end, limit=TREND_SAMPLES
            )

    histories = await asyncio.gather(*(history(a) for a in chosen))
    buckets = int(TREND_MINUTES * 60 / TREND_BUCKET_S)
    t0 = start.timestamp()
    totals: list[float | None] = [None] * buckets
    for samples in histories:
        sums = [0.0] * buckets
        counts = [0] * buckets
        for sample in samples:
            index = int((sample.ts.timestamp() - t0) // TREND_BUCKET_S)
            if 0 <= index < buckets:
                sums[index] += sample.mw
                counts[index] += 1
        last: float | None = None
        for index in range(buckets):
            if counts[index]:
                last = sums[index] / counts[index]
            if last is not None:
                totals[index] = (totals[index] or 0.0) + last
    times: list[float | None] = [t0 + (i + 1) * TREND_BUCKET_S for i in range(buckets)]
    return {"t": times, "mw": totals}


@get("/console/sites/{site_id:str}", **page("viewer"))
async def site_page(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    site_id: FromPath[str],
    q: FromQuery[str] = "",
    page_number: Annotated[int, QueryParameter(name="page", ge=1, le=10_000)] = 1,
) -> Template:
    """A site: its assets with live values (``q`` filters by name, type or id; pages of
    :data:`SITE_PAGE_SIZE`), aggregate MW and its trend over all of them, and (operators)
    the site dispatch form with the split preview."""
    inventory = headend.inventory
    try:
        site = inventory.site(site_id)
    except UnknownNameError:
        raise NotFoundException(f"unknown site {site_id}") from None
    assets = sorted(inventory.assets_for_site(site.site_id), key=lambda a: a.name)
    latest = {a.asset_id: headend.ingest.latest(a.asset_id) for a in assets}
    needle = q.strip().lower()
    shown = [
        a
        for a in assets
        if not needle
        or needle in a.name.lower()
        or needle in a.asset_type.lower()
        or needle in a.asset_id
    ]
    pages = max(1, math.ceil(len(shown) / SITE_PAGE_SIZE))
    page_number = min(page_number, pages)
    first = (page_number - 1) * SITE_PAGE_SIZE
    rows = _rows(headend, shown[first : first + SITE_PAGE_SIZE])
    guard = guard_of(headend, None, site.site_id)
    trend = await _site_trend(headend, assets)
    return render(
        request,
        headend,
        "site.html",
        {
            "title": f"Site {site.name}",
            "site": site,
            "rows": rows,
            "total": len(assets),
            "matching": len(shown),
            "q": q.strip(),
            "page": page_number,
            "pages": pages,
            "guard": guard,
            "latest_mw": {k: v.mw for k, v in latest.items() if v is not None},
            "aggregate_mw": math.fsum(v.mw for v in latest.values() if v is not None),
            "connected": sum(_connected(headend, a.asset_id) for a in assets),
            "trend": trend,
            "trend_assets": min(len(assets), TREND_ASSETS),
            # the policy selector: every installed policy, the site's own chosen
            "policies": headend.plugins.split_policies.names(),
            "policy": site.split_policy or headend.dispatcher.policy_name,
            "policy_source": "the site's split_policy"
            if site.split_policy
            else "the headend's SPLIT_POLICY",
            "confirm_share": headend.config.console_confirm_share,
        },
    )


@get("/console/dispatch", **page("viewer"))
async def dispatch_page(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    asset_id: FromQuery[str | None] = None,
    site_id: FromQuery[str | None] = None,
    sent: FromQuery[str | None] = None,
) -> Template:
    """The dispatch form (operators) with each target's limits, and the history."""
    inventory = headend.inventory
    sites = sorted(inventory.sites.values(), key=lambda s: s.name)
    guards = [guard_of(headend, None, s.site_id) for s in sites]
    assets = sorted(inventory.assets.values(), key=lambda a: (a.site_id, a.name))
    asset_guards = [guard_of(headend, a.asset_id, None) for a in assets]
    chosen = ""
    if asset_id and asset_id in inventory.assets:
        chosen = f"asset:{asset_id}"
    elif site_id and site_id in inventory.sites:
        chosen = f"site:{site_id}"
    return render(
        request,
        headend,
        "dispatch.html",
        {
            "title": "Dispatch",
            "site_guards": guards,
            "asset_guards": asset_guards,
            "chosen": chosen,
            "sent": sent,
            "confirm_share": headend.config.console_confirm_share,
            "policy": headend.dispatcher.policy_name,
            "policies": headend.plugins.split_policies.names(),
            "site_policies": {
                s.site_id: s.split_policy or headend.dispatcher.policy_name for s in sites
            },
        },
    )


@get("/console/dispatch/history", **page("viewer"))
async def history_partial(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    asset_id: FromQuery[str | None] = None,
    site_id: FromQuery[str | None] = None,
) -> Template:
    """The history table (newest first), each dispatch with its state, targets and their
    outcomes; refreshed by the page on live dispatch events."""
    dispatches = await headend.storage.dispatch_history(
        asset_id=asset_id or None, site_id=site_id or None, limit=HISTORY_LIMIT
    )
    return render(
        request,
        headend,
        "partials/dispatch_history.html",
        {"dispatches": dispatches, "names": _names(headend.inventory), "is_open": is_open},
    )


@get("/console/dispatch/{dispatch_id:str}/events", **page("viewer"))
async def events_partial(
    request: Request[Any, Any, Any], headend: NamedDependency[Headend], dispatch_id: FromPath[str]
) -> Template:
    """One dispatch's lifecycle: every state change with its time, oldest first."""
    dispatch: Dispatch | None = await headend.storage.get_dispatch(dispatch_id)
    if dispatch is None:
        raise NotFoundException(f"unknown dispatch {dispatch_id}")
    events = await headend.storage.dispatch_events(dispatch_id)
    return render(
        request,
        headend,
        "partials/dispatch_events.html",
        {"dispatch": dispatch, "events": events},
    )


DISPATCH_HANDLERS = [
    site_page,
    dispatch_page,
    history_partial,
    events_partial,
    preview_dispatch,
    send_dispatch,
]
