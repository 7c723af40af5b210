"""Query parameters shared by the history endpoints, checked with errors that name them."""

from __future__ import annotations

from datetime import UTC, datetime

from litestar.exceptions import ValidationException

__all__ = ["MAX_LIMIT", "check_limit", "parse_time"]

MAX_LIMIT = 10_000


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
        return parsed.astimezone(UTC)
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
