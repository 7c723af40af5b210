"""The console's Site and Dispatch pages, server side: the split preview is the REST
preview, guardrails (limits, confirmation) are enforced on the server, roles and CSRF are
checked, and a console dispatch is stored and audited like a REST one.

Browser flows are in tests/console (Playwright); these go over loopback HTTP to a real
headend, as a browser would (cookie, CSRF token from the page).
"""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    BESS_3,
    NOT_IN_INVENTORY,
    SITE_A,
    SITE_A_ASSETS,
    ConnectAgent,
    bearer,
    eventually,
    post_form,
    preview_rows,
)

from der_sdk.models import TelemetrySample, utc_now

COOKIE = "der_console"


async def history(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/dispatch/history")
    assert response.status_code == 200
    records: list[dict[str, Any]] = response.json()
    return records


@pytest.fixture
async def console(auth_headend: Any, role_tokens: dict[str, str]) -> Any:
    """Clients of a headend with authentication on, signed in by cookie: role -> client."""
    clients: dict[str, httpx.AsyncClient] = {}
    for role, secret in role_tokens.items():
        clients[role] = httpx.AsyncClient(
            base_url=auth_headend.http_url, timeout=5.0, cookies={COOKIE: secret}
        )
    try:
        yield clients
    finally:
        for client in clients.values():
            await client.aclose()


# --------------------------------------------------------------------------- pages


async def test_site_page_lists_its_assets_and_offers_operators_the_split_form(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get(f"/console/sites/{SITE_A}")

    assert response.status_code == 200
    page = response.text
    for asset_id in (BESS_1, BESS_2, BESS_3):
        assert f'id="asset-{asset_id}"' in page
    assert "North Yard" in page
    assert 'id="site-dispatch-form"' in page
    assert 'id="site-aggregate-mw"' in page and 'id="site-trend"' in page
    assert "-3.5 to 3.5 MW" in page, "the site's range is shown"


async def test_an_unknown_site_page_is_a_404(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/console/sites/{NOT_IN_INVENTORY}")

    assert response.status_code == 404
    assert NOT_IN_INVENTORY in response.text


async def test_dispatch_page_shows_each_target_with_its_limits(http: httpx.AsyncClient) -> None:
    response = await http.get("/console/dispatch", params={"asset_id": BESS_3})

    assert response.status_code == 200
    page = response.text
    assert 'id="dispatch-form"' in page and 'id="dispatch-history"' in page
    assert f'value="asset:{BESS_3}" data-min="-0.5" data-max="0.5"' in page
    assert f'value="asset:{BESS_3}"' in page and "selected" in page
    assert f'value="site:{SITE_A}" data-min="-3.5" data-max="3.5"' in page


async def test_a_viewer_sees_no_dispatch_form_and_a_forged_post_is_refused(
    console: dict[str, httpx.AsyncClient],
) -> None:
    viewer = console["viewer"]
    for path in ("/console/dispatch", f"/console/sites/{SITE_A}"):
        page = (await viewer.get(path)).text
        assert "dispatch-form" not in page and "Preview" not in page, path

    for path in ("/console/dispatch", "/console/dispatch/preview"):
        forged = await post_form(
            viewer, path, {"site_id": SITE_A, "mw": 1, "confirm": "yes"}, htmx=False
        )
        assert forged.status_code == 403, (path, forged.text)
    admin = bearer(console["admin"].cookies[COOKIE])
    assert (await console["admin"].get("/dispatch/history", headers=admin)).json() == []


async def test_a_console_post_without_the_csrf_token_is_refused(
    console: dict[str, httpx.AsyncClient],
) -> None:
    operator = console["operator"]

    response = await operator.post(
        "/console/dispatch", data={"asset_id": BESS_1, "mw": "0.1", "confirm": "yes"}
    )

    assert response.status_code == 403
    assert (await operator.get("/dispatch/history")).json() == []


# --------------------------------------------------------------------------- preview


@pytest.mark.parametrize(
    "body",
    [
        {"site_id": SITE_A, "mw": 2.0},
        {"site_id": SITE_A, "mw": -3.5},
        {"asset_id": BESS_2, "mw": 1},
    ],
    ids=["site", "site-charging-full", "asset"],
)
async def test_console_preview_shows_the_targets_of_the_rest_preview(
    http: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    rest = (await http.post("/dispatch/preview", json=body)).json()

    response = await post_form(http, "/console/dispatch/preview", body)

    assert response.status_code == 200, response.text
    assert preview_rows(response.text) == [(t["asset_id"], t["mw"]) for t in rest["targets"]]
    unallocated = re.search(r'id="preview-unallocated">([^<]+)<', response.text)
    assert unallocated and float(unallocated.group(1)) == rest["unallocated_mw"]
    assert await history(http) == [], "a preview stores nothing"


@pytest.mark.parametrize(
    ("fields", "named", "status"),
    [
        ({"site_id": SITE_A, "mw": 4}, "mw 4 is outside the limits of site North Yard", 400),
        ({"asset_id": BESS_3, "mw": -0.6}, "mw -0.6 is outside the limits of asset BESS 3", 400),
        ({"site_id": SITE_A, "mw": "lots"}, "form field `mw`: 'lots' is not a number", 400),
        ({"site_id": SITE_A}, "form field `mw`: give a number of MW", 400),
        ({"site_id": SITE_A, "mw": 1, "ttl_s": 0}, "form field `ttl_s`", 400),
        ({"site_id": SITE_A, "mw": 1, "expires_at": "soon"}, "form field `expires_at`", 400),
        ({"mw": 1}, "form field `target`: choose an asset or a site", 400),
        ({"target": "pump:x", "mw": 1}, "form field `target`", 400),
        ({"asset_id": NOT_IN_INVENTORY, "mw": 1}, f"unknown asset {NOT_IN_INVENTORY}", 404),
    ],
    ids=["site-range", "asset-range", "mw", "no-mw", "ttl", "expiry", "no-target", "kind", "404"],
)
@pytest.mark.parametrize("path", ["/console/dispatch/preview", "/console/dispatch"])
async def test_a_bad_form_is_refused_on_the_server_naming_the_field(
    http: httpx.AsyncClient, fields: dict[str, Any], named: str, status: int, path: str
) -> None:
    response = await post_form(http, path, {**fields, "confirm": "yes"})

    assert response.status_code == status, response.text
    assert 'id="dispatch-error"' in response.text
    assert named in response.text.replace("&#39;", "'")
    assert await history(http) == []


# --------------------------------------------------------------------------- confirm and send


async def test_a_site_dispatch_is_sent_only_once_confirmed(http: httpx.AsyncClient) -> None:
    asked = await post_form(http, "/console/dispatch", {"site_id": SITE_A, "mw": 1.5})

    assert asked.status_code == 200
    assert 'id="dispatch-confirm-reason"' in asked.text and "Confirmation needed" in asked.text
    assert 'name="confirm" value="yes"' in asked.text
    assert await history(http) == []

    sent = await post_form(
        http, "/console/dispatch", {"site_id": SITE_A, "mw": 1.5, "confirm": "yes"}
    )

    assert sent.status_code == 202, sent.text
    (record,) = await history(http)
    assert record["site_id"] == SITE_A and record["source"] == "console"
    assert f'data-dispatch-id="{record["dispatch_id"]}"' in sent.text
    rest = (await http.post("/dispatch/preview", json={"site_id": SITE_A, "mw": 1.5})).json()
    assert [(t["asset_id"], t["mw"]) for t in record["targets"]] == [
        (t["asset_id"], t["mw"]) for t in rest["targets"]
    ]


async def test_a_small_asset_change_is_sent_without_confirmation_a_large_one_is_not(
    http: httpx.AsyncClient,
) -> None:
    small = await post_form(http, "/console/dispatch", {"target": f"asset:{BESS_1}", "mw": 0.9})
    large = await post_form(http, "/console/dispatch", {"target": f"asset:{BESS_1}", "mw": -1.5})

    assert small.status_code == 202, small.text
    assert large.status_code == 200
    assert "more than 50% of BESS 1&#39;s 2 MW" in large.text
    (record,) = await history(http)
    assert record["asset_id"] == BESS_1 and record["mw"] == 0.9


async def test_a_plain_form_post_redirects_to_the_dispatch_page(http: httpx.AsyncClient) -> None:
    response = await post_form(
        http, "/console/dispatch", {"asset_id": BESS_2, "mw": 0.2}, htmx=False
    )

    assert response.status_code == 303
    (record,) = await history(http)
    assert response.headers["location"] == f"/console/dispatch?sent={record['dispatch_id']}"


async def test_a_console_dispatch_is_audited_like_a_rest_one(
    console: dict[str, httpx.AsyncClient], role_tokens: dict[str, str]
) -> None:
    operator = console["operator"]

    sent = await post_form(
        operator, "/console/dispatch", {"site_id": SITE_A, "mw": 1, "confirm": "yes"}
    )
    refused = await post_form(operator, "/console/dispatch", {"asset_id": BESS_1, "mw": 9})

    assert sent.status_code == 202 and refused.status_code == 400
    admin = bearer(role_tokens["admin"])
    records = (
        await operator.get("/audit", params={"action": "dispatch.create"}, headers=admin)
    ).json()
    (record,) = records
    assert record["outcome"] == "ok"
    assert record["details"]["via"] == "console"
    assert record["actor"]["role"] == "operator" and record["source"] == "127.0.0.1"
    assert record["site_id"] == SITE_A


# --------------------------------------------------------------------------- history


async def test_history_shows_each_dispatch_with_per_target_outcome_and_lifecycle(
    http: httpx.AsyncClient,
) -> None:
    await post_form(http, "/console/dispatch", {"site_id": SITE_A, "mw": 2, "confirm": "yes"})
    (record,) = await history(http)
    dispatch_id = record["dispatch_id"]

    table = await http.get("/console/dispatch/history", headers={"HX-Request": "true"})
    events = await http.get(f"/console/dispatch/{dispatch_id}/events")

    assert table.status_code == 200
    assert f'id="dispatch-{dispatch_id}"' in table.text
    assert 'data-state="submitted"' in table.text, "no agent: kept submitted"
    for target in record["targets"]:
        assert f'<li data-asset-id="{target["asset_id"]}">' in table.text
    assert f'hx-get="/console/dispatch/{dispatch_id}/events"' in table.text
    assert events.status_code == 200
    assert "submitted" in events.text and "created by console" in events.text
    missing = await http.get(f"/console/dispatch/{NOT_IN_INVENTORY}/events")
    assert missing.status_code == 404


async def test_site_page_shows_live_values_and_the_aggregate_trend_from_storage(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    now = utc_now()
    samples = [
        TelemetrySample(
            asset_id=BESS_1,
            site_id=SITE_A,
            ts=now - timedelta(seconds=s),
            mw=1.2,
            mw_setpoint=1.0,
            details={"soc_pct": 55.0},
        )
        for s in (40, 20)
    ]
    samples.append(TelemetrySample(asset_id=BESS_2, site_id=SITE_A, ts=now, mw=0.3))
    await agent.telemetry(1, samples)

    async def stored() -> bool:
        response = await http.get(f"/telemetry/{BESS_2}/history")
        return len(response.json()) == 1

    await eventually(stored, "the samples are stored")
    page = (await http.get(f"/console/sites/{SITE_A}")).text

    assert '<strong id="site-aggregate-mw">1.50</strong>' in page
    assert f'data-asset-id="{BESS_1}" data-field="details.soc_pct" data-digits="1" ' in page
    assert 'data-unit="%">55.0 %<' in page, "the battery's key figure, live"
    assert '<strong id="site-connected">3</strong>' in page
    assert f'data-asset-id="{BESS_1}" data-field="mw_setpoint">1.00<' in page
    found = re.search(r'<script type="application/json" id="site-trend-data">(.*?)</script>', page)
    assert found
    trend = json.loads(found.group(1))
    assert [v for v in trend["mw"] if v is not None][-1] == pytest.approx(1.5)

    # the confirmation share counts from the setpoint now (1.0), not from 0
    small = await post_form(http, "/console/dispatch", {"asset_id": BESS_1, "mw": 1.9})
    large = await post_form(http, "/console/dispatch", {"asset_id": BESS_1, "mw": -0.5})
    assert small.status_code == 202 and 'data-state="sent"' in small.text
    assert large.status_code == 200 and "a change of 1.5 MW" in large.text


async def test_site_page_filters_its_assets_on_the_server(http: httpx.AsyncClient) -> None:
    response = await http.get(f"/console/sites/{SITE_A}", params={"q": "bess 2"})

    assert response.status_code == 200
    assert f'id="asset-{BESS_2}"' in response.text
    assert f'id="asset-{BESS_1}"' not in response.text
    assert '<span class="muted" id="site-assets-count">1 of 3 assets</span>' in response.text
    assert '<strong id="site-connected">0</strong> of 3' in response.text


async def test_duration_and_expiry_from_the_form_reach_the_dispatch(
    http: httpx.AsyncClient,
) -> None:
    expires = (utc_now() + timedelta(hours=1)).replace(microsecond=0, tzinfo=None)

    sent = await post_form(
        http,
        "/console/dispatch",
        {"asset_id": BESS_2, "mw": 0.3, "duration_s": 900, "expires_at": expires.isoformat()},
    )

    assert sent.status_code == 202, sent.text
    (record,) = await history(http)
    assert record["duration_s"] == 900
    assert record["expires_at"] == expires.isoformat() + "Z", "a time without zone is UTC"


async def test_a_posted_policy_reaches_the_console_preview(http: httpx.AsyncClient) -> None:
    body = {"site_id": SITE_A, "mw": 1.5, "policy": "equal"}
    rest = (await http.post("/dispatch/preview", json=body)).json()
    default = (await http.post("/dispatch/preview", json={"site_id": SITE_A, "mw": 1.5})).json()
    assert rest["targets"] != default["targets"], "equal differs from capacity_weighted here"

    response = await post_form(http, "/console/dispatch/preview", body)
    assert response.status_code == 200, response.text
    assert preview_rows(response.text) == [(t["asset_id"], t["mw"]) for t in rest["targets"]]
    assert 'name="policy" value="equal"' in response.text, "the confirm form keeps it"

    refused = await post_form(http, "/console/dispatch/preview", {**body, "policy": "nope"})
    assert refused.status_code == 400
    assert "unknown split policy 'nope'" in html.unescape(refused.text)
