"""The console's Fleet, Agents and Audit pages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.params import FromQuery
from litestar.response import Template

from der_sdk_headend.audit import AUDIT_KIND
from der_sdk_headend.console import render
from der_sdk_headend.console.auth import page
from der_sdk_headend.rest.audit import audit_record
from der_sdk_headend.rest.params import MAX_LIMIT

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["PAGE_HANDLERS"]


@get("/", **page("viewer"))
async def fleet(request: Request[Any, Any, Any], headend: NamedDependency[Headend]) -> Template:
    """Sites and assets with their latest values."""
    return render(request, headend, "fleet.html", {"title": "Fleet"})


@get("/console/agents", **page("viewer"))
async def agents(request: Request[Any, Any, Any], headend: NamedDependency[Headend]) -> Template:
    """Agent sessions, peers, last seen and buffer figures."""
    return render(request, headend, "agents.html", {"title": "Agents"})


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
