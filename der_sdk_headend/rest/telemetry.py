"""``/telemetry``: the latest sample of an asset, and its stored history."""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath

from der_sdk.models import TelemetrySample
from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.body import encode_json
from der_sdk_headend.rest.errors import known_asset
from der_sdk_headend.rest.openapi import NEEDS_STORAGE
from der_sdk_headend.rest.params import LimitQuery, TimeQuery, check_limit, parse_time
from der_sdk_headend.rest.state import headend_of

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["TelemetryController", "encode_sample"]


def encode_sample(sample: TelemetrySample) -> bytes:
    """The JSON of a sample, byte for byte what Litestar makes of a returned
    :class:`TelemetrySample` (:func:`~der_sdk_headend.rest.body.encode_json`)."""
    return encode_json(sample)


class TelemetryController(Controller):
    path = "/telemetry"
    tags = ["telemetry"]

    @get(
        "/{asset_id:str}",
        summary="The latest sample: core fields plus `details`",
        # Answers pre-encoded bytes (see below); the schema still says what they are.
        responses={
            200: ResponseSpec(data_container=TelemetrySample, description=HTTPStatus.OK.description)
        },
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def latest(
        self, request: Request[Any, Any, Any], asset_id: FromPath[str]
    ) -> Response[bytes]:
        # The hot read route: the headend from the app's state, not by injection, and the
        # answer encoded here; the JSON is what Litestar makes of a returned sample.
        headend = headend_of(request)
        asset = known_asset(headend.inventory, asset_id)
        sample = headend.ingest.latest(asset.asset_id)
        if sample is None:
            raise NotFoundException(f"no telemetry received yet for asset {asset.asset_id}")
        return Response(encode_sample(sample), media_type="application/json")

    @get(
        "/{asset_id:str}/history",
        summary="Stored samples, newest first",
        description="`start` inclusive, `end` exclusive, ISO 8601 (a naive time is UTC); "
        "`limit` 1..10000, default 100.",
        **access("viewer"),
        **NEEDS_STORAGE,
    )
    async def history(
        self,
        headend: NamedDependency[Headend],
        asset_id: FromPath[str],
        start: TimeQuery = None,
        end: TimeQuery = None,
        limit: LimitQuery = 100,
    ) -> list[TelemetrySample]:
        asset = known_asset(headend.inventory, asset_id)
        return await headend.storage.telemetry_history(
            asset.asset_id,
            start=parse_time(start, "start"),
            end=parse_time(end, "end"),
            limit=check_limit(limit),
        )
