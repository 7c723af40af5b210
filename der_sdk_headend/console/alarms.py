"""The console's alarms (docs/alarms.md): the header's badge on every page, the Alarms page
and an asset's alarms on its page, with acknowledge for operators.

- ``GET /console/alarms/badge``: the header badge's counts of active, unacknowledged alarms
  by severity (``partials/alarm_badge_counts.html``). ``base.html`` includes
  ``partials/alarm_badge.html``, which reads it when the page loads, every 10 seconds,
  after a ``resync`` of the live stream and at once after an
  acknowledgement (the ``der:alarms`` event). Alarms are polled rather than streamed: they
  change seldom and live in storage, so every replica of a cluster shows the same counts.
- ``GET /console/alarms``: the Alarms page, filtered by ``state``, ``severity``, ``site``
  (and ``asset``), newest raised first; an htmx request of it answers with the table alone.
- ``GET /console/assets/{asset_id}/alarms``: the asset's alarms (the Asset page's section).
- ``POST /console/alarms/{alarm_id}/ack`` (operator, CSRF): acknowledges through
  :func:`~der_sdk_headend.rest.alarms.acknowledge_audited`, the code of
  ``POST /alarms/{id}/ack``, so it is audited as ``alarm.ack`` alike.

Element ids are stable: the browser tests (tests/console) use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, get_args

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Redirect, Template

from der_sdk.models import ALARM_SEVERITIES, Alarm, AlarmState
from der_sdk_headend.console import render
from der_sdk_headend.console.auth import page
from der_sdk_headend.console.schedules import names_of
from der_sdk_headend.rest.alarms import acknowledge_audited

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = [
    "ALARM_HANDLERS",
    "AlarmCounts",
    "unacknowledged_counts",
]

BADGE_READ_LIMIT = 1000
"""At most this many active, unacknowledged alarms are counted for the badge; beyond, it
says "1000+"."""
PAGE_LIMIT = 200
"""Alarms on the Alarms page (newest raised first)."""
ASSET_LIMIT = 20
"""Alarms in an asset's section (newest raised first)."""
STATES: tuple[str, ...] = get_args(AlarmState)
SEVERITIES_DOWN: tuple[str, ...] = tuple(reversed(ALARM_SEVERITIES))
"""Severities, most severe first (as the badge and filters show them)."""


@dataclass(frozen=True)
class AlarmCounts:
    """Active, unacknowledged alarms by severity (most severe first)."""

    by_severity: dict[str, int]
    more: bool
    """More than :data:`BADGE_READ_LIMIT`: the counts are of the newest ones."""

    @property
    def total(self) -> int:
        return sum(self.by_severity.values())

    @property
    def worst(self) -> str | None:
        """The most severe severity with an alarm, ``None`` without any."""
        return next((s for s in SEVERITIES_DOWN if self.by_severity.get(s)), None)


async def unacknowledged_counts(headend: Headend) -> AlarmCounts:
    """The header badge's figures: active alarms nobody acknowledged, by severity."""
    alarms = await headend.storage.alarms(
        state="active", acknowledged=False, limit=BADGE_READ_LIMIT
    )
    counts = dict.fromkeys(SEVERITIES_DOWN, 0)
    for alarm in alarms:
        counts[alarm.severity] = counts.get(alarm.severity, 0) + 1
    return AlarmCounts(by_severity=counts, more=len(alarms) >= BADGE_READ_LIMIT)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str | None:
    if not value or value == "all":
        return None
    if value not in allowed:
        raise ValidationException(
            f"query parameter `{name}`: unknown {name} {value!r}; one of {', '.join(allowed)}"
        )
    return value


def _is_partial(request: Request[Any, Any, Any]) -> bool:
    headers = request.headers
    return bool(headers.get("hx-request")) and not headers.get("hx-history-restore-request")


@get("/console/alarms/badge", **page("viewer"))
async def alarm_badge(
    request: Request[Any, Any, Any], headend: NamedDependency[Headend]
) -> Template:
    """The header badge's counts of active, unacknowledged alarms by severity."""
    counts = await unacknowledged_counts(headend)
    return render(request, headend, "partials/alarm_badge_counts.html", {"counts": counts})


@get("/console/alarms", **page("viewer"))
async def alarms_page(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    state_filter: Annotated[str, QueryParameter(name="state")] = "active",
    severity: FromQuery[str] = "",
    site: FromQuery[str] = "",
    asset: FromQuery[str] = "",
) -> Template:
    """Alarms newest raised first, filtered by ``state`` (active, cleared, all),
    ``severity``, ``site`` and ``asset``; operators acknowledge them here."""
    chosen_state = _choice("state", state_filter, STATES)
    chosen_severity = _choice("severity", severity, ALARM_SEVERITIES)
    inventory = headend.inventory
    # ids as given (the page's choices): alarms outlive inventory changes
    site_id, asset_id = site.strip(), asset.strip()
    alarms = await headend.storage.alarms(
        state=chosen_state,  # type: ignore[arg-type]
        severity=chosen_severity,  # type: ignore[arg-type]
        site_id=site_id or None,
        asset_id=asset_id or None,
        limit=PAGE_LIMIT,
    )
    context = {
        "title": "Alarms",
        "alarms": alarms,
        "names": names_of(inventory),
        "limit": PAGE_LIMIT,
        "states": STATES,
        "severities": SEVERITIES_DOWN,
        "all_sites": sorted(inventory.sites.values(), key=lambda s: s.name.lower()),
        "query": {
            "state": chosen_state or "all",
            "severity": chosen_severity or "",
            "site": site_id,
            "asset": asset_id,
        },
        "table_id": "alarms-table",
    }
    template = "partials/alarm_table.html" if _is_partial(request) else "alarms.html"
    return render(request, headend, template, context)


@get("/console/assets/{asset_id:str}/alarms", **page("viewer"))
async def asset_alarms(
    request: Request[Any, Any, Any], headend: NamedDependency[Headend], asset_id: FromPath[str]
) -> Template:
    """An asset's alarms, active and cleared, newest raised first (its page's section)."""
    if asset_id not in headend.inventory.assets:
        raise NotFoundException(f"unknown asset {asset_id}")
    alarms = await headend.storage.alarms(asset_id=asset_id, limit=ASSET_LIMIT)
    return render(
        request,
        headend,
        "partials/alarm_table.html",
        {
            "alarms": alarms,
            "names": names_of(headend.inventory),
            "limit": ASSET_LIMIT,
            "table_id": "asset-alarms-table",
        },
    )


@post("/console/alarms/{alarm_id:str}/ack", **page("operator"), status_code=200)
async def acknowledge_alarm(
    request: Request[Any, Any, Any], headend: NamedDependency[Headend], alarm_id: FromPath[str]
) -> Template | Redirect:
    """Acknowledge an alarm (operator), audited as ``alarm.ack`` as over REST; answers
    with its row (htmx) and tells the page's badge to re-read (``der:alarms``), or
    goes back to the Alarms page (a plain form post)."""
    result = await acknowledge_audited(headend, request, alarm_id)
    if result is None:
        raise NotFoundException(f"unknown alarm {alarm_id}")
    alarm: Alarm = result[0]
    if not request.headers.get("hx-request"):
        return Redirect("/console/alarms", status_code=303)
    response = render(
        request,
        headend,
        "partials/alarm_row.html",
        {"alarm": alarm, "names": names_of(headend.inventory)},
    )
    response.headers["HX-Trigger"] = "der:alarms"
    return response


ALARM_HANDLERS = [alarm_badge, alarms_page, asset_alarms, acknowledge_alarm]
