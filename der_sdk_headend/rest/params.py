"""Query parameters shared by the history endpoints, checked with errors that name them.

The annotations :data:`LimitQuery` and :data:`TimeQuery` declare in the OpenAPI document
what the checks here accept (bounds, ``format: date-time``); the checks, not Litestar,
refuse what is out of them, with a message that names the parameter.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Annotated

from litestar.exceptions import ValidationException
from litestar.openapi.spec import OpenAPIFormat, OpenAPIType
from litestar.params import QueryParameter

from der_sdk.errors import UnknownNameError
from der_sdk.inventory import Inventory

__all__ = [
    "MAX_LIMIT",
    "LimitQuery",
    "TimeQuery",
    "check_limit",
    "filter_ids",
    "parse_time",
]

MAX_LIMIT = 10_000

LimitQuery = Annotated[
    int,
    QueryParameter(
        description=f"How many records, 1..{MAX_LIMIT}.",
        schema_extra={"minimum": 1, "maximum": MAX_LIMIT},
    ),
]
"""A ``limit`` query parameter (check it with :func:`check_limit`)."""

TimeQuery = Annotated[
    str | None,
    QueryParameter(
        description="An ISO 8601 time; without a time zone it is UTC.",
        # A query parameter is a string or absent, never null.
        schema_extra={
            "one_of": None,
            "type": OpenAPIType.STRING,
            "format": OpenAPIFormat.DATE_TIME,
        },
    ),
]
"""A time query parameter, ``start`` or ``end`` (parse it with :func:`parse_time`)."""


def parse_time(value: str | None, name: str) -> datetime | None:
    """``value`` (ISO 8601) as an aware UTC datetime; a naive time is taken as UTC.

    :raises ValidationException: (400) naming ``name`` when ``value`` is not a time.
    """
    if value is None or value == "":
        return None
    candidates = [value]
    if " " in value:
        # An unencoded "+" in a query string arrives as a space: "...T12:00:00 00:00".
        head, _, tail = value.rpartition(" ")
        candidates.append(f"{head}+{tail}")
    for text in candidates:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            continue
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            # 9999-12-31T23:59:59-12:00 is a valid time whose UTC is past year 9999.
            raise ValidationException(
                f"query parameter `{name}`: {value!r} is out of range: in UTC it must lie "
                "within the years 1 to 9999"
            ) from None
    raise ValidationException(
        f"query parameter `{name}`: {value!r} is not an ISO 8601 time "
        "(for example 2025-01-31T12:00:00Z)"
    )


def check_limit(limit: int) -> int:
    """``limit`` if it is within 1..:data:`MAX_LIMIT`, else a 400 naming it."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationException(
            f"query parameter `limit`: must be between 1 and {MAX_LIMIT}, got {limit}"
        )
    return limit


def filter_ids(
    inventory: Inventory, asset_id: str | None, site_id: str | None
) -> tuple[str | None, str | None]:
    """The ``asset_id`` and ``site_id`` filters of a query on stored records, as stored.

    Ids in the inventory are canonicalised (any case); others are searched as given: the
    record outlives inventory changes. An empty filter is ``None``.
    """
    if asset_id:
        with contextlib.suppress(UnknownNameError):
            asset_id = inventory.asset(asset_id).asset_id
    if site_id:
        with contextlib.suppress(UnknownNameError):
            site_id = inventory.site(site_id).site_id
    return asset_id or None, site_id or None
