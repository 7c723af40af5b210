"""``GET /telemetry/export``: a time range of stored telemetry as one CSV or Parquet file,
streamed page by page (docs/export.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Schema
from litestar.params import QueryParameter
from litestar.response import Stream

from der_sdk.errors import UnknownNameError
from der_sdk.storage.contract import EXPORT_PAGE_ROWS
from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.params import parse_time
from der_sdk_headend.rest.schemas import ErrorBody

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["TelemetryExportController"]

CSV_MEDIA_TYPE = "text/csv"
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"

_TIME: dict[str, Any] = {
    "description": "An ISO 8601 time; without a time zone it is UTC.",
    "schema_extra": {"format": "date-time"},
}


@dataclass
class _ExportOperation(Operation):
    """The operation's 200 answers a CSV or a Parquet file, by ``format``: both media
    types are declared (a route declares one otherwise)."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if ok is None or isinstance(ok, dict) or not hasattr(ok, "content"):
            return
        ok.content = {
            CSV_MEDIA_TYPE: OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)),
            PARQUET_MEDIA_TYPE: OpenAPIMediaType(
                schema=Schema(type=OpenAPIType.STRING, content_media_type=PARQUET_MEDIA_TYPE)
            ),
        }


@dataclass
class _Request:
    start: datetime
    end: datetime
    site_id: str | None
    asset_id: str | None
    asset_types: dict[str, str] = field(default_factory=dict)


class TelemetryExportController(Controller):
    path = "/telemetry/export"
    tags = ["telemetry"]

    @get(
        "/",
        summary="Stored samples of a time range as one CSV or Parquet file, streamed",
        description="`from` inclusive and `to` exclusive, ISO 8601 (a naive time is UTC), "
        "at most `HEADEND_EXPORT_MAX_DAYS` apart (31 days by default; use `der export` for "
        "more); optionally one site (`site_id`) or one asset (`asset_id`); `format` `csv` "
        "(default) or `parquet`. Columns: the core sample fields, then `details_<field>` "
        "for every asset type's details and `details_extra` (docs/export.md). The file is "
        "written as storage is read, so an error after the first bytes ends it early.",
        responses={
            200: ResponseSpec(data_container=str, description="The samples, oldest first."),
            404: ResponseSpec(ErrorBody, description="No such asset or site: `detail` names it."),
        },
        operation_class=_ExportOperation,
        **access("operator"),
        **NEEDS_STORAGE,
    )
    async def export(
        self,
        headend: NamedDependency[Headend],
        start: Annotated[str, QueryParameter(name="from", **_TIME)],
        end: Annotated[str, QueryParameter(name="to", **_TIME)],
        site_id: Annotated[str | None, QueryParameter(name="site_id")] = None,
        asset_id: Annotated[str | None, QueryParameter(name="asset_id")] = None,
        export_format: Annotated[
            Literal["csv", "parquet"], QueryParameter(name="format", description="csv or parquet")
        ] = "csv",
    ) -> Stream:
        request = _checked(headend, start, end, site_id, asset_id)
        media_type = PARQUET_MEDIA_TYPE if export_format == "parquet" else CSV_MEDIA_TYPE
        name = (
            f"telemetry-{request.start:%Y%m%dT%H%M%SZ}-{request.end:%Y%m%dT%H%M%SZ}.{export_format}"
        )
        return Stream(
            _stream(headend, request, export_format),
            media_type=media_type if export_format == "parquet" else f"{media_type}; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )


def _checked(
    headend: Headend, start: str, end: str, site_id: str | None, asset_id: str | None
) -> _Request:
    """The request's range and target, or a 400 or 404 naming the parameter."""
    begin, finish = parse_time(start, "from"), parse_time(end, "to")
    if begin is None or finish is None:
        missing = "from" if begin is None else "to"
        raise ValidationException(f"query parameter `{missing}`: give a time")
    if finish <= begin:
        raise ValidationException(
            f"query parameters `from` and `to`: `to` ({finish.isoformat()}) must be after "
            f"`from` ({begin.isoformat()})"
        )
    max_days = headend.config.export_max_days
    if (finish - begin).total_seconds() > max_days * 86_400:
        raise ValidationException(
            f"query parameters `from` and `to`: the range is {(finish - begin).days} days; "
            f"at most {max_days:g} days per request (HEADEND_EXPORT_MAX_DAYS): split it, or "
            "use `der export` for longer ranges"
        )
    inventory = headend.inventory
    try:
        site = inventory.site(site_id).site_id if site_id else None
        asset = inventory.asset(asset_id).asset_id if asset_id else None
    except UnknownNameError as exc:
        raise NotFoundException(f"unknown {exc.kind} {exc.name}") from None
    types = {a.asset_id: a.asset_type for a in inventory.assets.values()}
    return _Request(begin, finish, site, asset, types)


async def _stream(
    headend: Headend, request: _Request, export_format: Literal["csv", "parquet"]
) -> AsyncIterator[bytes]:
    from der_sdk.export.files import ExportStream
    from der_sdk.export.schema import ExportSchema

    plugins = headend.plugins
    schema = ExportSchema.for_asset_types(
        plugins.asset_types.get(n) for n in plugins.asset_types.names()
    )
    stream = ExportStream(export_format, schema, request.asset_types)
    pages = headend.storage.telemetry_pages(
        request.start,
        request.end,
        site_id=request.site_id,
        asset_id=request.asset_id,
        page_size=EXPORT_PAGE_ROWS,
    )
    try:
        async for page in pages:
            chunk = await asyncio.to_thread(stream.write, page)
            if chunk:
                yield chunk
        yield await asyncio.to_thread(stream.close)
    finally:
        with contextlib.suppress(Exception):
            await pages.aclose()  # type: ignore[attr-defined]
