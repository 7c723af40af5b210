"""``/audit``: the audit trail, newest first, for admins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromQuery

from der_sdk.models import Event
from der_sdk_headend.audit import AUDIT_KIND, Actor
from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.params import MAX_LIMIT, LimitQuery, check_limit
from der_sdk_headend.rest.schemas import AuditRecord

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["AuditController", "audit_record"]

_UNKNOWN_ACTOR = Actor(kind="unknown", name="unknown")


def audit_record(event: Event) -> AuditRecord:
    """An audit event as its REST record (also shown by the console's Audit page)."""
    details: dict[str, Any] = dict(event.data)
    try:
        actor = msgspec.convert(details.pop("actor", None), Actor)
    except msgspec.ValidationError:
        actor = _UNKNOWN_ACTOR
    return AuditRecord(
        ts=event.ts,
        action=str(details.pop("action", "")),
        actor=actor,
        source=str(details.pop("source", "")),
        outcome=str(details.pop("outcome", "")),
        message=event.message,
        asset_id=event.asset_id,
        site_id=event.site_id,
        details=details,
    )


class AuditController(Controller):
    tags = ["admin"]

    @get(
        "/audit",
        summary="The audit trail, newest first",
        description="Token changes (`token.create`, `token.revoke`, also those made with "
        "`der tokens`), dispatches (`dispatch.create`), refused REST requests "
        "(`rest.denied`, at most one record per client per second) and refused agents "
        "(`agent.refused`). `action` keeps one action (searched among the newest "
        f"{MAX_LIMIT} records); `limit` 1..{MAX_LIMIT}, default 100.",
        **access("admin"),
        **NEEDS_STORAGE,
    )
    async def audit(
        self,
        headend: NamedDependency[Headend],
        action: FromQuery[str | None] = None,
        limit: LimitQuery = 100,
    ) -> list[AuditRecord]:
        limit = check_limit(limit)
        # Storage filters events by kind only; the action is a field of the record, so it
        # is matched here, among a bounded window of the newest records.
        window = MAX_LIMIT if action else limit
        events = await headend.storage.events(kind=AUDIT_KIND, limit=window)
        records = [audit_record(e) for e in events]
        if action:
            records = [r for r in records if r.action == action]
        return records[:limit]
