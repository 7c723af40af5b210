"""der_headend and der_http: a real headend on memory storage, and a REST client for it."""

import httpx

from der_sdk.testing import DEFAULT_ASSET_IDS


async def test_the_headend_serves_its_inventory(der_http: httpx.AsyncClient) -> None:
    health = await der_http.get("/healthz")
    assets = await der_http.get("/assets")

    assert health.status_code == 200
    assert [a["asset_id"] for a in assets.json()] == list(DEFAULT_ASSET_IDS)
