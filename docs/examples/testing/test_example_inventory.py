"""Override der_inventory_yaml (here for one module) to serve another inventory."""

import httpx
import pytest

SITE = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
PV = "0b6c1e52-7f0e-4d8a-9a57-2c1f3e4d5a61"


@pytest.fixture
def der_inventory_yaml() -> str:
    return f"""
sites:
  - {{site_id: {SITE}, name: Solar Farm}}
assets:
  - {{asset_id: {PV}, site_id: {SITE}, name: PV 1, asset_type: pv, max_mw: 5, min_mw: 0}}
"""


async def test_the_headend_serves_the_overridden_inventory(der_http: httpx.AsyncClient) -> None:
    assets = (await der_http.get("/assets")).json()

    assert [(a["asset_id"], a["asset_type"]) for a in assets] == [(PV, "pv")]
