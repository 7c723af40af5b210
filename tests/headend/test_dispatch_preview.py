"""``POST /dispatch/preview``: the targets and unallocated MW a dispatch would produce,
planned as ``POST /dispatch`` plans it, with nothing stored, sent or audited."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from headend_kit import BESS_1, BESS_2, BESS_3, NOT_IN_INVENTORY, SITE_A, bearer


async def preview(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/dispatch/preview", json=body)
    assert response.status_code == 200, response.text
    planned: dict[str, Any] = response.json()
    return planned


def shares(record: dict[str, Any]) -> list[tuple[str, float]]:
    return [(target["asset_id"], target["mw"]) for target in record["targets"]]


@pytest.mark.parametrize(
    "body",
    [
        {"asset_id": BESS_3, "mw": 0.25},
        {"asset_id": BESS_3, "mw": -4.0},
        {"site_id": SITE_A, "mw": 2.0},
        {"site_id": SITE_A, "mw": 9.0},
        {"site_id": SITE_A, "mw": -3.2, "ttl_s": 60},
    ],
    ids=["asset", "asset-clamped", "site", "site-over-capacity", "site-charging"],
)
async def test_preview_gives_the_targets_a_real_dispatch_then_gets(
    http: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    planned = await preview(http, **body)
    response = await http.post("/dispatch", json=body)
    assert response.status_code == 202, response.text
    record = response.json()

    assert shares(planned) == shares(record)
    assert planned["unallocated_mw"] == record["unallocated_mw"]
    assert planned["policy"] == record["policy"]
    assert planned["reason"] == record["reason"]
    assert "dispatch_id" not in planned


async def test_site_preview_shows_limits_policy_and_what_cannot_be_placed(
    http: httpx.AsyncClient,
) -> None:
    planned = await preview(http, site_id=SITE_A, mw=4.5)

    assert planned["policy"] == "capacity_weighted"
    assert planned["unallocated_mw"] == 1.0
    by_asset = {target["asset_id"]: target for target in planned["targets"]}
    assert by_asset[BESS_1] == {
        "asset_id": BESS_1,
        "asset_name": "BESS 1",
        "mw": 2.0,
        "min_mw": -2.0,
        "max_mw": 2.0,
        "reason": "at its limit max_mw 2",
        "kind": "setpoint",
        "available_min_mw": -2.0,
        "available_max_mw": 2.0,
        "basis": "no telemetry: static limits",
    }
    assert by_asset[BESS_3]["reason"] == "at its limit max_mw 0.5"


async def test_asset_preview_says_why_a_value_was_clamped(http: httpx.AsyncClient) -> None:
    planned = await preview(http, asset_id=BESS_2, mw=3)

    assert planned["policy"] is None
    assert planned["targets"] == [
        {
            "asset_id": BESS_2,
            "asset_name": "BESS 2",
            "mw": 1.0,
            "min_mw": -1.0,
            "max_mw": 1.0,
            "reason": "clamped to [-1, 1]",
            "kind": "setpoint",
            "available_min_mw": -1.0,
            "available_max_mw": 1.0,
            "basis": "no telemetry: static limits",
        }
    ]


async def test_preview_stores_and_sends_nothing(http: httpx.AsyncClient) -> None:
    before = (await http.get("/dispatch/history")).json()

    await preview(http, site_id=SITE_A, mw=1.0, duration_s=60)
    await preview(http, asset_id=BESS_1, mw=1.0)

    assert (await http.get("/dispatch/history")).json() == before == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"mw": 1}, "give asset_id or site_id"),
        ({"asset_id": BESS_1, "mw": 1, "ttl_s": 0}, "`$.ttl_s`"),
        ({"asset_id": BESS_1, "mw": 1, "duration_s": -5}, "`$.duration_s`"),
        (
            {"asset_id": BESS_1, "mw": 1, "ttl_s": 5, "expires_at": "2999-01-01T00:00:00Z"},
            "give expires_at or ttl_s",
        ),
        ({"asset_id": BESS_1, "mw": 1, "expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
        ({"asset_id": BESS_1, "mw": "lots"}, "`$.mw`"),
        ({"asset_id": BESS_1}, "`mw`"),
    ],
    ids=["no-target", "ttl", "duration", "both-expiries", "past-expiry", "mw-type", "no-mw"],
)
async def test_a_bad_preview_is_the_same_400_as_a_dispatch_naming_the_field(
    http: httpx.AsyncClient, body: dict[str, Any], named: str
) -> None:
    previewed = await http.post("/dispatch/preview", json=body)
    dispatched = await http.post("/dispatch", json=body)

    assert previewed.status_code == dispatched.status_code == 400, previewed.text
    assert named in previewed.json()["detail"]
    said = [r.json()["detail"].partition(" (headend time")[0] for r in (previewed, dispatched)]
    assert said[0] == said[1]


async def test_previewing_an_unknown_asset_is_a_404_naming_it(http: httpx.AsyncClient) -> None:
    response = await http.post("/dispatch/preview", json={"asset_id": NOT_IN_INVENTORY, "mw": 1})

    assert response.status_code == 404
    assert response.json()["detail"] == f"unknown asset {NOT_IN_INVENTORY}"


async def test_a_viewer_may_not_preview_and_nothing_is_audited(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    body = {"site_id": SITE_A, "mw": 1.0}
    refused = await auth_http.post(
        "/dispatch/preview", json=body, headers=bearer(role_tokens["viewer"])
    )
    allowed = await auth_http.post(
        "/dispatch/preview", json=body, headers=bearer(role_tokens["operator"])
    )

    assert refused.status_code == 403
    assert "needs the operator role" in refused.json()["detail"]
    assert allowed.status_code == 200
    audit = await auth_http.get(
        "/audit", params={"action": "dispatch.create"}, headers=bearer(role_tokens["admin"])
    )
    assert audit.json() == []
