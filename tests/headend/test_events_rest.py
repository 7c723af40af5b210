"""``GET /events``: the operator-visible record, filtered by asset, site, kind and time,
newest first, never the audit trail; bad filters are 400s that name the parameter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from der_sdk.models import Event
from der_sdk.testing import DEFAULT_ASSET_IDS, DEFAULT_SITE_ID
from der_sdk_headend.service import Headend

BESS_1, BESS_2, _ = DEFAULT_ASSET_IDS
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OTHER_SITE = "0be00000-0000-4000-8000-0000000000a1"


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
async def stored(der_headend: Headend) -> list[Event]:
    """Events as the headend stores them, oldest first."""
    events = [
        Event(ts=at(0), kind="audit", message="token.create", site_id=DEFAULT_SITE_ID),
        Event(
            ts=at(1),
            kind="condition_raised",
            message="inverter tripped",
            asset_id=BESS_1,
            site_id=DEFAULT_SITE_ID,
            data={"code": "inverter_trip", "severity": "major"},
        ),
        Event(
            ts=at(2),
            kind="condition_raised",
            message="charger fault",
            asset_id=BESS_2,
            site_id=DEFAULT_SITE_ID,
            data={"code": "charger_fault", "severity": "major"},
        ),
        Event(
            ts=at(3),
            kind="condition_cleared",
            message="inverter restarted",
            asset_id=BESS_1,
            site_id=DEFAULT_SITE_ID,
            data={"code": "inverter_trip", "severity": "major"},
        ),
        Event(ts=at(4), kind="registration_refused", message="refused", site_id=OTHER_SITE),
    ]
    for event in events:
        await der_headend.storage.append_event(event)
    return events


async def _messages(http: httpx.AsyncClient, **params: object) -> list[str]:
    response = await http.get("/events", params=params)
    assert response.status_code == 200, response.text
    return [e["message"] for e in response.json()]


async def test_events_are_listed_newest_first_without_audit_records(
    der_http: httpx.AsyncClient, stored: list[Event]
) -> None:
    response = await der_http.get("/events")
    assert response.status_code == 200
    body = response.json()
    assert [e["message"] for e in body] == [
        "refused",
        "inverter restarted",
        "charger fault",
        "inverter tripped",
    ]
    assert body[1] == {
        "ts": "2026-03-01T12:00:03Z",
        "kind": "condition_cleared",
        "message": "inverter restarted",
        "asset_id": BESS_1,
        "site_id": DEFAULT_SITE_ID,
        "data": {"code": "inverter_trip", "severity": "major"},
    }


async def test_events_filter_by_asset_site_kind_and_time(
    der_http: httpx.AsyncClient, stored: list[Event]
) -> None:
    assert await _messages(der_http, asset_id=BESS_1) == ["inverter restarted", "inverter tripped"]
    assert await _messages(der_http, asset_id=BESS_1.upper()) == [  # ids are canonicalised
        "inverter restarted",
        "inverter tripped",
    ]
    assert await _messages(der_http, site_id=OTHER_SITE) == ["refused"]
    assert await _messages(der_http, kind="condition_raised") == [
        "charger fault",
        "inverter tripped",
    ]
    # since inclusive, until exclusive; a naive time is UTC
    assert await _messages(der_http, since="2026-03-01T12:00:02Z", until="2026-03-01T12:00:04") == [
        "inverter restarted",
        "charger fault",
    ]
    assert await _messages(der_http, site_id=DEFAULT_SITE_ID, limit=2) == [
        "inverter restarted",
        "charger fault",
    ]
    # the next page: the oldest ts of the last one as `until`
    assert await _messages(der_http, site_id=DEFAULT_SITE_ID, until="2026-03-01T12:00:02Z") == [
        "inverter tripped"
    ]
    assert await _messages(der_http, asset_id="no-longer-in-the-inventory") == []


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"limit": 0}, "query parameter `limit`: must be between 1 and 10000, got 0"),
        ({"limit": 10001}, "query parameter `limit`: must be between 1 and 10000, got 10001"),
        (
            {"since": "yesterday"},
            "query parameter `since`: 'yesterday' is not an ISO 8601 time",
        ),
        ({"until": "12:00"}, "query parameter `until`: '12:00' is not an ISO 8601 time"),
        (
            {"since": "2026-03-01T12:00:05Z", "until": "2026-03-01T12:00:05Z"},
            "query parameters `since` and `until`: `since` (2026-03-01T12:00:05+00:00) must "
            "be before `until` (2026-03-01T12:00:05+00:00)",
        ),
        ({"kind": "audit"}, "query parameter `kind`: 'audit' records are listed by GET /audit"),
    ],
)
async def test_bad_filters_are_400s_naming_the_parameter(
    der_http: httpx.AsyncClient, params: dict[str, object], detail: str
) -> None:
    response = await der_http.get("/events", params=params)
    assert response.status_code == 400, response.text
    assert detail in response.json()["detail"]


async def test_a_limit_that_is_not_a_number_is_a_400(der_http: httpx.AsyncClient) -> None:
    response = await der_http.get("/events", params={"limit": "ten"})
    assert response.status_code == 400
    assert "limit" in response.json()["detail"]


async def test_the_openapi_document_describes_the_route_and_its_filters(
    der_http: httpx.AsyncClient,
) -> None:
    schema = (await der_http.get("/schema/openapi.json")).json()
    operation = schema["paths"]["/events"]["get"]
    assert operation["security"] == [{"BearerToken": ["viewer"]}]
    assert {p["name"] for p in operation["parameters"]} == {
        "asset_id",
        "site_id",
        "kind",
        "since",
        "until",
        "limit",
    }
    assert {"200", "400", "401", "403", "503"} <= set(operation["responses"])
