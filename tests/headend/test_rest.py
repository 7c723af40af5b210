"""The REST surface: inventory, plugins, health, OpenAPI and error bodies."""

from __future__ import annotations

import httpx
import msgspec
import pytest
from headend_kit import BESS_1, PV_1, SITE_A, SITE_A_ASSETS, SITE_B, ConnectAgent, sample
from litestar.serialization import encode_json

from der_sdk.models import Dispatch
from der_sdk_headend import Headend


async def test_assets_lists_the_inventory_and_an_unknown_asset_is_404(
    http: httpx.AsyncClient,
) -> None:
    assets = (await http.get("/assets")).json()
    assert [a["asset_id"] for a in assets] == [*SITE_A_ASSETS, PV_1]
    one = (await http.get(f"/assets/{BESS_1.upper()}")).json()
    assert one["asset_id"] == BESS_1 and one["max_mw"] == 2.0, "any UUID spelling works"
    missing = await http.get("/assets/nope")
    assert missing.status_code == 404
    assert missing.json() == {"status_code": 404, "detail": "unknown asset nope", "extra": None}


async def test_sites_list_their_asset_ids(http: httpx.AsyncClient) -> None:
    sites = {s["site_id"]: s for s in (await http.get("/sites")).json()}
    assert sites[SITE_A]["asset_ids"] == list(SITE_A_ASSETS)
    assert sites[SITE_B] == {
        "site_id": SITE_B,
        "name": "South Field",
        "location": None,
        "latitude": None,
        "longitude": None,
        "split_policy": None,
        "asset_ids": [PV_1],
    }


async def test_plugins_lists_the_builtins_with_their_hooks(http: httpx.AsyncClient) -> None:
    rows = {r["name"]: r for r in (await http.get("/plugins")).json()}
    for builtin in ("der_sdk.asset_types", "der_sdk.split", "der_sdk.storage.memory"):
        assert rows[builtin]["builtin"] is True
        assert rows[builtin]["package"] == "der-sdk"
    assert "der_split_policies" in rows["der_sdk.split"]["hooks"]
    assert rows["test-observer"]["builtin"] is False


async def test_healthz_is_ok_with_storage_and_connection_counts(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)

    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "storage": "memory",
        "agents_connected": 1,
        "assets_connected": 3,
        "reason": None,
        "ingest_queued_batches": 0,
        "ingest_queued_samples": 0,
        "programs": [],
    }


async def test_healthz_is_503_degraded_when_storage_is_unhealthy(
    headend: Headend, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unhealthy() -> bool:
        return False

    monkeypatch.setattr(headend.storage, "healthy", unhealthy)
    response = await http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded"


async def test_openapi_schema_is_served_with_every_endpoint(http: httpx.AsyncClient) -> None:
    response = await http.get("/schema/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "der-sdk headend"
    for path in (
        "/assets",
        "/assets/{asset_id}",
        "/sites",
        "/agents",
        "/telemetry/{asset_id}",
        "/telemetry/{asset_id}/history",
        "/dispatch",
        "/dispatch/history",
        "/dispatch/{dispatch_id}",
        "/heartbeat/{asset_id}",
        "/heartbeat/{asset_id}/history",
        "/plugins",
        "/healthz",
    ):
        assert path in schema["paths"], path
    assert "202" in schema["paths"]["/dispatch"]["post"]["responses"]


async def test_the_latest_sample_is_the_json_litestar_makes_of_it(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    """``GET /telemetry/{id}`` encodes the sample itself (the hot read route): the bytes
    are those Litestar makes of a returned sample, in the same field order and format."""
    agent = await connect_agent()
    await agent.register([BESS_1])
    details = {"soc_pct": 61.5, "mode": "idle", "cells": {"ok": True}}
    await agent.telemetry(1, [sample(BESS_1, seconds=3, mw=-1.25, seq=7, details=details)])

    response = await http.get(f"/telemetry/{BESS_1}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    stored = headend.ingest.latest(BESS_1)
    assert stored is not None
    assert response.content == encode_json(stored) == msgspec.json.encode(stored)
    assert response.content == (
        b'{"asset_id":"00000000-0000-4000-8000-000000000001",'
        b'"site_id":"6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f","ts":"2025-01-31T12:00:03Z",'
        b'"mw":-1.25,"mw_setpoint":null,"online":true,"status":null,"fault_code":null,'
        b'"seq":7,"quality":"good","quality_reason":null,'
        b'"details":{"soc_pct":61.5,"mode":"idle","cells":{"ok":true}}}'
    )
    assert int(response.headers["content-length"]) == len(response.content)

    operation = (await http.get("/schema/openapi.json")).json()["paths"]["/telemetry/{asset_id}"]
    ok = operation["get"]["responses"]["200"]
    assert ok["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/TelemetrySample"}}
    }
    assert ok["description"] == "Request fulfilled, document follows"


async def test_a_dispatch_record_answered_is_the_json_litestar_makes_of_it(
    headend: Headend, http: httpx.AsyncClient
) -> None:
    """``POST /dispatch`` encodes the record itself (the dispatch hot path): the bytes of
    the ``202`` and of a replayed ``200`` are those Litestar makes of a returned
    :class:`Dispatch` (field order, times), and the schema still names ``Dispatch``."""
    body = {"asset_id": BESS_1, "mw": 0.5, "ttl_s": 60}
    headers = {"Idempotency-Key": "same-bytes"}
    created = await http.post("/dispatch", json=body, headers=headers)
    replayed = await http.post("/dispatch", json=body, headers=headers)

    assert (created.status_code, replayed.status_code) == (202, 200)
    assert replayed.headers["idempotent-replayed"] == "true"
    for response in (created, replayed):
        assert response.headers["content-type"] == "application/json"
        record = msgspec.json.decode(response.content, type=Dispatch)
        assert response.content == encode_json(record)
        assert int(response.headers["content-length"]) == len(response.content)
    assert created.json()["expires_at"].endswith("Z")

    responses = (await http.get("/schema/openapi.json")).json()["paths"]["/dispatch"]["post"]
    for status in ("202", "200"):
        assert responses["responses"][status]["content"] == {
            "application/json": {"schema": {"$ref": "#/components/schemas/Dispatch"}}
        }
    assert responses["responses"]["202"]["description"] == (
        "Request accepted, processing continues off-line"
    )


async def test_an_unknown_route_is_a_json_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/no-such-thing")
    assert response.status_code == 404
    assert "detail" in response.json()
