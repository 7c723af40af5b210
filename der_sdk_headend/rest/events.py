"""``/events``: the operator-visible record, newest first: device conditions raised and
cleared, agents' events, refused registrations, telemetry gaps. Audit records are not
here: they are an admin's, at ``/audit``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.params import FromQuery

from der_sdk.models import Event
from der_sdk.storage.contract import filtered_events
from der_sdk_headend.audit import AUDIT_KIND
from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.params import (
    MAX_LIMIT,
    LimitQuery,
    TimeQuery,
    check_limit,
    filter_ids,
    parse_time,
)

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["EventsController"]


class EventsController(Controller):
    tags = ["events"]

    @get(
        "/events",
        summary="Events, newest first: device conditions, agent events, refusals, gaps",
        description="Each event has `ts`, `kind`, `message`, `asset_id`, `site_id` and "
        "`data`. Device conditions are `condition_raised` and `condition_cleared` events, "
        "with `data.code` and `data.severity`. Filters: `asset_id`, `site_id`, `kind`, "
        "`since` (inclusive) and `until` (exclusive), ISO 8601 (a naive time is UTC); "
        f"`limit` 1..{MAX_LIMIT}, default 100; for the next page, pass the oldest `ts` "
        "of a full page as `until`. Audit records are not listed: see `GET /audit` "
        "(admin).",
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def events(
        self,
        headend: NamedDependency[Headend],
        asset_id: FromQuery[str | None] = None,
        site_id: FromQuery[str | None] = None,
        kind: FromQuery[str | None] = None,
        since: TimeQuery = None,
        until: TimeQuery = None,
        limit: LimitQuery = 100,
    ) -> list[Event]:
        limit = check_limit(limit)
        start, end = parse_time(since, "since"), parse_time(until, "until")
        if start is not None and end is not None and start >= end:
            raise ValidationException(
                f"query parameters `since` and `until`: `since` ({start.isoformat()}) must "
                f"be before `until` ({end.isoformat()})"
            )
        if kind == AUDIT_KIND:
            raise ValidationException(
                f"query parameter `kind`: {AUDIT_KIND!r} records are listed by GET /audit "
                "(admin role), not here"
            )
        asset_id, site_id = filter_ids(headend.inventory, asset_id, site_id)
        return await filtered_events(
            headend.storage,
            asset_id=asset_id,
            site_id=site_id,
            kind=kind or None,
            exclude_kinds=(AUDIT_KIND,),
            start=start,
            end=end,
            limit=limit,
        )
