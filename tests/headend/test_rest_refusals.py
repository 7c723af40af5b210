"""REST refusals: bad input is a 4xx that says what and where, never a 500, and the
OpenAPI document declares every status an operation can answer with.

Everything goes to a real headend over loopback HTTP with ``HEADEND_AUTH=on``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from headend_kit import BESS_1, NOT_IN_INVENTORY, bearer

from der_sdk_headend.rest.body import MAX_BODY_BYTES
from der_sdk_headend.rest.params import MAX_LIMIT

BODY_ROUTES = ("/dispatch", "/tokens")
DEEP = 5_000

# --------------------------------------------------------------------------- bodies


async def post(
    http: httpx.AsyncClient, token: str, path: str, content: bytes, media_type: str | None
) -> httpx.Response:
    headers = bearer(token)
    if media_type is not None:
        headers["Content-Type"] = media_type
    return await http.post(path, content=content, headers=headers)


def detail(response: httpx.Response) -> str:
    body = response.json()
    assert body["status_code"] == response.status_code
    return str(body["detail"])


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"[" * DEEP + b"]" * DEEP, "Expected `object`, got `array`"),
        (b'{"mw": ' + b"[" * DEEP + b"]" * DEEP + b"}", "`$.mw`"),
        (b'{"role": ' + b"[" * DEEP + b"]" * DEEP + b"}", "`$.role`"),
        (b"{" * DEEP, "request body is malformed JSON: "),
    ],
    ids=["array", "in-mw", "in-role", "unclosed"],
)
async def test_json_nested_thousands_deep_is_a_400_naming_where(
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    path: str,
    content: bytes,
    named: str,
) -> None:
    response = await post(auth_http, role_tokens["admin"], path, content, "application/json")
    assert response.status_code == 400, response.text
    if path == "/tokens" and "$.mw" in named:
        named = "unknown field `mw`"
    if path == "/dispatch" and "$.role" in named:
        named = "unknown field `role`"
    assert named in detail(response)


@pytest.mark.parametrize(
    "number", [b"1e400", b"-1e400", b"1" + b"0" * 400, b"-" + b"9" * 5000], ids=str
)
async def test_a_number_that_overflows_is_a_400_naming_the_field(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], number: bytes
) -> None:
    body = b'{"asset_id": "%s", "mw": %s}' % (BESS_1.encode(), number)
    response = await post(auth_http, role_tokens["operator"], "/dispatch", body, "application/json")
    assert response.status_code == 400, response.text
    assert detail(response) == "invalid request body at `$.mw`: Number out of range"


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b'{"asset_id": ', "request body is malformed JSON: Input data was truncated"),
        (b'{"mw": 1,}', "request body is malformed JSON: "),
        (b'{"mw": NaN}', "request body is malformed JSON: invalid character (byte 7)"),
    ],
)
async def test_malformed_json_is_a_400_saying_where(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], content: bytes, said: str
) -> None:
    response = await post(
        auth_http, role_tokens["operator"], "/dispatch", content, "application/json"
    )
    assert response.status_code == 400, response.text
    assert detail(response).startswith(said)


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize(
    "media_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_a_body_that_is_not_json_is_a_415(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], path: str, media_type: str | None
) -> None:
    body = json.dumps({"asset_id": BESS_1, "mw": 0.1, "role": "viewer"}).encode()
    response = await post(auth_http, role_tokens["admin"], path, body, media_type)
    assert response.status_code == 415, response.text
    shown = f"`{media_type.partition(';')[0]}`" if media_type else "no Content-Type"
    assert detail(response) == (
        f"request body must be JSON: send `Content-Type: application/json` (got {shown})"
    )


@pytest.mark.parametrize(
    "media_type", ["application/json; charset=utf-8", "application/merge+json"]
)
async def test_json_media_types_with_parameters_or_suffix_are_json(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], media_type: str
) -> None:
    body = json.dumps({"asset_id": BESS_1, "mw": 0.1}).encode()
    response = await post(auth_http, role_tokens["operator"], "/dispatch", body, media_type)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_a_body_over_the_limit_is_a_413_naming_it(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], path: str
) -> None:
    body = json.dumps({"mw": 0.1, "asset_id": "x" * MAX_BODY_BYTES}).encode()
    response = await post(auth_http, role_tokens["admin"], path, body, "application/json")
    assert response.status_code == 413, response.text
    assert f"request body larger than {MAX_BODY_BYTES} bytes" in detail(response)


# --------------------------------------------------------------------------- queries


@pytest.mark.parametrize("route", ["telemetry", "heartbeat"])
@pytest.mark.parametrize("name", ["start", "end"])
@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+01:00"])
async def test_a_time_whose_utc_is_out_of_range_is_a_400_naming_it(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], route: str, name: str, value: str
) -> None:
    response = await auth_http.get(
        f"/{route}/{BESS_1}/history", params={name: value}, headers=bearer(role_tokens["viewer"])
    )
    assert response.status_code == 400, response.text
    assert detail(response) == (
        f"query parameter `{name}`: {value!r} is out of range: in UTC it must lie within "
        "the years 1 to 9999"
    )


# --------------------------------------------------------------------------- OpenAPI

ERROR_STATUSES: dict[tuple[str, str], set[int]] = {
    ("get", "/assets"): {400, 401, 403},
    ("get", "/assets/{asset_id}"): {400, 401, 403, 404},
    ("get", "/sites"): {401, 403},
    ("get", "/agents"): {401, 403, 503},
    ("get", "/telemetry/{asset_id}"): {400, 401, 403, 404, 503},
    ("get", "/telemetry/{asset_id}/history"): {400, 401, 403, 404, 503},
    ("get", "/telemetry/export"): {400, 401, 403, 404, 503},
    ("post", "/dispatch"): {400, 401, 403, 404, 409, 413, 415, 503},
    ("post", "/dispatch/preview"): {400, 401, 403, 404, 413, 415, 503},
    ("get", "/dispatch/history"): {400, 401, 403, 503},
    ("get", "/dispatch/{dispatch_id}"): {400, 401, 403, 404, 503},
    ("post", "/dispatch/{dispatch_id}/cancel"): {400, 401, 403, 404, 409, 503},
    ("get", "/heartbeat/{asset_id}"): {400, 401, 403, 404, 503},
    ("get", "/heartbeat/{asset_id}/history"): {400, 401, 403, 404, 503},
    ("get", "/events"): {400, 401, 403, 503},
    ("get", "/plugins"): {401, 403},
    ("get", "/healthz"): {503},
    ("get", "/metrics"): {401, 403},
    ("get", "/tokens"): {401, 403},
    ("post", "/tokens"): {400, 401, 403, 413, 415, 503},
    ("delete", "/tokens/{token_id}"): {400, 401, 403, 404, 503},
    ("get", "/audit"): {400, 401, 403, 503},
    ("get", "/alarms"): {400, 401, 403, 503},
    ("get", "/alarms/{alarm_id}"): {400, 401, 403, 404, 503},
    ("post", "/alarms/{alarm_id}/ack"): {400, 401, 403, 404, 503},
}
"""The error statuses of each operation (docs/headend.md, "Refusals"): 401/403 for a
protected one, 404 for an id in the path (and an unknown dispatch target), 400 for any
input, 413/415 for a body, 503 where storage answers, 409 for a reused Idempotency-Key."""


async def openapi(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/schema/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    }


async def test_every_operation_declares_the_refusals_it_can_answer(
    auth_http: httpx.AsyncClient,
) -> None:
    document = await openapi(auth_http)
    declared = {
        key: {int(status) for status in operation["responses"] if int(status) >= 400}
        for key, operation in operations(document).items()
    }
    assert declared == ERROR_STATUSES
    for key, operation in operations(document).items():
        for status in ERROR_STATUSES[key] - {503}:
            content = operation["responses"][str(status)]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (key, status)


async def test_each_refusal_the_server_answers_is_declared(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    """Provoke every refusal a role, an id, a parameter or a body can cause on every
    operation, and find each answer among the operation's declared statuses."""
    document = await openapi(auth_http)
    seen: dict[tuple[str, str], set[int]] = {}
    ids = {
        "asset_id": NOT_IN_INVENTORY,
        "dispatch_id": NOT_IN_INVENTORY,
        "token_id": "tok_0",
        "alarm_id": NOT_IN_INVENTORY,
    }
    for (method, template), operation in operations(document).items():
        path = template.format(**ids)
        tries: list[dict[str, Any]] = [
            {},
            {"headers": bearer(role_tokens["viewer"])},
            {"headers": bearer(role_tokens["admin"])},
            {"headers": bearer(role_tokens["admin"]), "params": {"limit": MAX_LIMIT + 1}},
            {"headers": bearer(role_tokens["admin"]), "params": {"start": "x", "state": "x"}},
        ]
        if "{" in template:
            known = template.format(**{**ids, "asset_id": BESS_1})
            tries.append({"headers": bearer(role_tokens["admin"]), "url": known})
        if "requestBody" in operation:
            admin = bearer(role_tokens["admin"])
            tries += [
                {"headers": admin, "content": b"{}"},
                {"headers": admin, "json": {"mw": 1, "asset_id": NOT_IN_INVENTORY}},
                {"headers": {**admin, "Content-Type": "application/json"}, "content": b"[" * DEEP},
                {"headers": {**admin, "Content-Type": "text/plain"}, "content": b"{}"},
                {"headers": admin, "json": {"mw": 1, "pad": "x" * MAX_BODY_BYTES}},
            ]
        for request in tries:
            url = request.pop("url", path)
            response = await auth_http.request(method.upper(), url, **request)
            seen.setdefault((method, template), set()).add(response.status_code)
    for key, statuses in seen.items():
        declared = {int(status) for status in operations(document)[key]["responses"]}
        assert statuses <= declared, f"{key}: answered {statuses - declared}, not declared"
    refusals = {status for statuses in seen.values() for status in statuses if status >= 400}
    assert refusals == {400, 401, 403, 404, 413, 415}


async def test_openapi_declares_parameter_bounds_enums_and_formats(
    auth_http: httpx.AsyncClient,
) -> None:
    document = await openapi(auth_http)
    by_operation = operations(document)

    def parameter(method: str, path: str, name: str) -> dict[str, Any]:
        found = [p for p in by_operation[(method, path)]["parameters"] if p["name"] == name]
        assert len(found) == 1, (path, name)
        schema: dict[str, Any] = found[0]["schema"]
        return schema

    for path, names in (
        ("/telemetry/{asset_id}/history", ("start", "end")),
        ("/heartbeat/{asset_id}/history", ("start", "end")),
        ("/events", ("since", "until")),
        ("/telemetry/export", ("from", "to")),
    ):
        for name in names:
            schema = parameter("get", path, name)
            assert (schema["type"], schema["format"]) == ("string", "date-time")
    for path in (
        "/telemetry/{asset_id}/history",
        "/heartbeat/{asset_id}/history",
        "/dispatch/history",
        "/audit",
        "/events",
        "/alarms",
    ):
        schema = parameter("get", path, "limit")
        assert (schema["minimum"], schema["maximum"], schema["default"]) == (1, MAX_LIMIT, 100)
    assert parameter("get", "/alarms", "state")["enum"] == ["active", "cleared"]
    severities = ["info", "warning", "major", "critical"]
    assert parameter("get", "/alarms", "severity")["enum"] == severities
    state = parameter("get", "/dispatch/history", "state")
    assert set(state["enum"]) == {
        "submitted",
        "sent",
        "acked",
        "applied",
        "rejected",
        "failed",
        "superseded",
        "expired",
        "scheduled",
        "active",
        "completed",
        "cancelled",
        "pending",
    }


async def test_bodies_that_refuse_unknown_fields_declare_no_additional_properties(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    document = await openapi(auth_http)
    for (method, path), operation in operations(document).items():
        if "requestBody" not in operation:
            continue
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = document["components"]["schemas"][ref.rpartition("/")[2]]
        assert schema["additionalProperties"] is False, path
        response = await auth_http.request(
            method.upper(), path, json={"surplus": 1}, headers=bearer(role_tokens["admin"])
        )
        assert response.status_code == 400
        assert "unknown field `surplus`" in detail(response)
    # Response bodies stay open: newer headends may add fields.
    assert "additionalProperties" not in document["components"]["schemas"]["Dispatch"]
