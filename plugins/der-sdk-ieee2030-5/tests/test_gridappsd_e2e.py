"""The ``ieee2030.5`` program source against an independent server, PNNL's GridAPPS-D
IEEE 2030.5 server (``gridappsd_server.py``), over mutual TLS with the certificates it
issued: a DERControl created through the server's admin API reaches a simulated battery
at its start time through the headend and a real agent; real power is mirrored to the
server; the server going away leaves the schedule running and ``/healthz`` degraded.

This server has no Response resource, so the Responses are proved against the test
double (``test_csip_double.py``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from der_sdk_ieee2030_5.http import Sep2Client, build_ssl_context
from der_sdk_ieee2030_5.identity import certificate_lfdi
from envoy_schema.server.schema.sep2.der import DERControlBase, DERControlResponse
from envoy_schema.server.schema.sep2.der_control_types import ActivePower
from envoy_schema.server.schema.sep2.event import EventStatus
from envoy_schema.server.schema.sep2.metering_mirror import MirrorUsagePointListResponse
from envoy_schema.server.schema.sep2.types import DateTimeIntervalType
from gridappsd_server import GridappsdServer, server_venv

from der_sdk.testing.inventory import DEFAULT_INVENTORY_YAML, DEFAULT_SITE_ID
from der_sdk.testing.waits import wait_until
from der_sdk_agent.testing import AgentRunner

# the first run installs the server in its venv (minutes); later runs reuse it
pytestmark = pytest.mark.timeout(1500)

CONTROL = "D1" + "0" * 30
LEAD_S = 35  # the control starts this long after it is made: headend and agent start first


@pytest.fixture
def gridappsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GridappsdServer]:
    """A fresh server for each test (it serves one connection at a time, and a test may
    stop it)."""
    venv = server_venv()
    server = GridappsdServer(tmp_path_factory.mktemp("gridappsd"))
    server.start(venv)
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def control_start(gridappsd: GridappsdServer) -> AsyncIterator[int]:
    """A DERControl of 1.2 MW for 20 s made through the server's admin API (admin
    certificate), before the headend starts: the server advertises pollRate 900 s, and
    the client honours it, so the control must be there for the first poll."""
    cert, key = gridappsd.tls("admin")
    admin = Sep2Client(
        gridappsd.url,
        verify=build_ssl_context(cert, key, gridappsd.ca),
        timeout_s=10,
    )
    now = int(time.time())
    start = now + LEAD_S
    control = DERControlResponse(
        mRID=CONTROL,
        description="evening support",
        creationTime=now,
        EventStatus_=EventStatus(currentStatus=0, dateTime=now, potentiallySuperseded=False),
        interval=DateTimeIntervalType(start=start, duration=20),
        DERControlBase_=DERControlBase(opModTargetW=ActivePower(value=1200, multiplier=3)),
    )
    try:
        await admin.post("/admin/derp/0/derc", control)
        yield start
    finally:
        await admin.aclose()


@pytest.fixture
def der_inventory_yaml(gridappsd: GridappsdServer, control_start: int) -> str:
    cert, key = gridappsd.tls("site1")
    return DEFAULT_INVENTORY_YAML + (
        "programs:\n"
        "  - name: gridappsd\n"
        "    source: ieee2030.5\n"
        f"    sites: [{DEFAULT_SITE_ID}]\n"
        "    options:\n"
        f"      server_url: {gridappsd.url}\n"
        f"      cert: {cert}\n"
        f"      key: {key}\n"
        f"      ca: {gridappsd.ca}\n"
        "      poll_interval_s: 1\n"
        "      mirror_interval_s: 1\n"
        f"      end_devices: [{{site_id: {DEFAULT_SITE_ID}}}]\n"
    )


async def site_dispatches(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/dispatch/history", params={"site_id": DEFAULT_SITE_ID})
    response.raise_for_status()
    return [r for r in response.json() if r.get("source") == "program:gridappsd"]


async def site_setpoint(http: httpx.AsyncClient, assets: list[str]) -> float | None:
    total = 0.0
    for asset_id in assets:
        response = await http.get(f"/telemetry/{asset_id}")
        if response.status_code != 200 or response.json()["mw_setpoint"] is None:
            return None
        total += response.json()["mw_setpoint"]
    return round(total, 6)


async def test_a_der_control_made_on_gridappsd_reaches_the_battery_at_its_start(
    gridappsd: GridappsdServer,
    control_start: int,
    der_http: httpx.AsyncClient,
    der_run_agent: AgentRunner,
) -> None:
    link = await der_run_agent(adapter_type="sim-bess")
    lfdi = certificate_lfdi(Path(gridappsd.tls("site1")[0]))

    async def scheduled() -> list[dict[str, Any]] | None:
        return await site_dispatches(der_http) or None

    rows = await wait_until(scheduled, timeout_s=30, what="the control as a dispatch")
    assert [(r["external_id"], r["mw"]) for r in rows] == [(f"{lfdi}/{CONTROL}", 1.2)]
    assert rows[0]["start_at"].startswith(
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(control_start))
    )

    async def applied() -> bool:
        return await site_setpoint(der_http, link.asset_ids) == 1.2

    await wait_until(applied, timeout_s=LEAD_S + 15, what="the site at 1.2 MW")
    assert time.time() >= control_start - 0.5, "not before its start time"

    # real power mirrored to the server's MirrorUsagePointList (the device's own view)
    cert, key = gridappsd.tls("site1")
    client = Sep2Client(
        gridappsd.url, verify=build_ssl_context(cert, key, gridappsd.ca), timeout_s=10
    )
    try:
        _, mirrors = await client.get_all(
            "/mup", MirrorUsagePointListResponse, lambda page: page.mirrorUsagePoints
        )
    finally:
        await client.aclose()
    assert [m.deviceLFDI.upper() for m in mirrors] == [lfdi]


async def test_with_gridappsd_gone_the_schedule_still_runs_and_healthz_is_degraded(
    gridappsd: GridappsdServer,
    control_start: int,
    der_http: httpx.AsyncClient,
    der_run_agent: AgentRunner,
) -> None:
    link = await der_run_agent(adapter_type="sim-bess")

    async def scheduled() -> bool:
        return bool(await site_dispatches(der_http))

    await wait_until(scheduled, timeout_s=30, what="the control as a dispatch")
    gridappsd.stop()

    async def degraded() -> dict[str, Any] | None:
        response = await der_http.get("/healthz")
        body: dict[str, Any] = response.json()
        return body if response.status_code == 503 else None

    body = await wait_until(degraded, timeout_s=15, what="/healthz degraded")
    assert "gridappsd" in body["reason"]

    async def applied() -> bool:
        return await site_setpoint(der_http, link.asset_ids) == 1.2

    await wait_until(applied, timeout_s=LEAD_S + 15, what="the site at 1.2 MW, server gone")
