"""The ``ieee2030.5`` program source end to end against the **test double** server of
``der_sdk_ieee2030_5.testing`` (built on envoy-schema's models): a real headend, a real
agent with a simulated battery, the client's walk, its Responses and mirrored power.

The independent server (PNNL's GridAPPS-D 2030.5 server) cannot show Responses (it has no
response resource); these tests prove them here. See ``test_gridappsd_e2e.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio
from der_sdk_ieee2030_5.testing import Sep2TestServer
from envoy_schema.server.schema.sep2.der import DERControlBase
from envoy_schema.server.schema.sep2.der_control_types import ActivePower
from envoy_schema.server.schema.sep2.event import EventStatusType
from envoy_schema.server.schema.sep2.response import ResponseType

from der_sdk.testing.inventory import DEFAULT_ASSET_IDS, DEFAULT_INVENTORY_YAML
from der_sdk.testing.waits import wait_until
from der_sdk_agent.testing import AgentRunner

BESS_1 = DEFAULT_ASSET_IDS[0]  # ±2 MW
LFDI = "3E4F45AB31EDFE5B67E343E5E4562E31984E23E5"
R = ResponseType
C0001 = "C0001".ljust(32, "0")  # a DERControl mRID (128 bits in hex)
C0002 = "C0002".ljust(32, "0")
C0003 = "C0003".ljust(32, "0")
C0004 = "C0004".ljust(32, "0")
A0001 = "A0001".ljust(32, "0")
B0001 = "B0001".ljust(32, "0")
B0002 = "B0002".ljust(32, "0")
C0005 = "C0005".ljust(32, "0")


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``predicate`` as a probe for ``wait_until``."""

    async def probe() -> bool:
        return predicate()

    return probe


def target_w(watts: int) -> DERControlBase:
    return DERControlBase(opModTargetW=ActivePower(value=watts, multiplier=0))


@pytest_asyncio.fixture
async def sep2() -> AsyncIterator[Sep2TestServer]:
    server = Sep2TestServer(poll_rate=1)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def der_inventory_yaml(sep2: Sep2TestServer) -> str:
    return DEFAULT_INVENTORY_YAML + (
        "programs:\n"
        "  - name: utility\n"
        "    source: ieee2030.5\n"
        f"    assets: [{BESS_1}]\n"
        "    options:\n"
        f"      server_url: {sep2.url}\n"
        "      allow_plain_http: true\n"
        "      poll_interval_s: 0.2\n"
        "      mirror_interval_s: 0.5\n"
        f"      end_devices: [{{asset_id: {BESS_1}, lfdi: {LFDI}}}]\n"
    )


async def program_dispatches(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/dispatch/history", params={"asset_id": BESS_1})
    response.raise_for_status()
    rows: list[dict[str, Any]] = response.json()
    return [r for r in rows if r.get("source") == "program:utility"]


async def setpoint(http: httpx.AsyncClient) -> float | None:
    response = await http.get(f"/telemetry/{BESS_1}")
    if response.status_code != 200:
        return None
    value: float | None = response.json()["mw_setpoint"]
    return value


async def test_a_der_control_reaches_the_battery_at_its_start_and_the_server_hears_each_step(
    sep2: Sep2TestServer, der_http: httpx.AsyncClient, der_run_agent: AgentRunner
) -> None:
    await der_run_agent(adapter_type="sim-bess", assets=[BESS_1])
    program = sep2.add_program(primacy=1, description="peak support")
    start = int(time.time()) + 6
    sep2.add_control(program, mrid=C0001, start=start, duration=3, base=target_w(1_500_000))

    await wait_until(holds(lambda: len(sep2.end_devices) == 1), what="the end device registered")
    assert sep2.end_devices[0].lFDI == LFDI
    await wait_until(
        holds(lambda: sep2.statuses(C0001) == [R.EVENT_RECEIVED]),
        what="the received response",
        last_seen=lambda: sep2.responses,
    )
    rows = await program_dispatches(der_http)
    assert [(r["external_id"], r["mw"], r["state"]) for r in rows] == [
        (f"{LFDI}/{C0001}", 1.5, "scheduled")
    ]
    assert await setpoint(der_http) != 1.5, "nothing before its start"

    async def applied() -> bool:
        return await setpoint(der_http) == 1.5

    await wait_until(applied, timeout_s=15, what="the battery at 1.5 MW")
    assert time.time() >= start - 0.5, "applied at its start time, not before"
    await wait_until(
        holds(lambda: R.EVENT_COMPLETED in sep2.statuses(C0001)), timeout_s=15, what="completed"
    )
    assert sep2.statuses(C0001) == [R.EVENT_RECEIVED, R.EVENT_STARTED, R.EVENT_COMPLETED]
    assert {r.endDeviceLFDI for r in sep2.responses} == {LFDI}
    # real power mirrored: one MirrorUsagePoint, readings in W signed as der-sdk signs MW
    assert [m.deviceLFDI for m in sep2.mirrors] == [LFDI]
    values = [r.reading.value for r in sep2.readings if r.reading is not None]
    assert any(v is not None and v > 1_000_000 for v in values), values


async def test_a_control_cancelled_on_the_server_is_cancelled_here_and_answered(
    sep2: Sep2TestServer, der_http: httpx.AsyncClient, der_run_agent: AgentRunner
) -> None:
    await der_run_agent(adapter_type="sim-bess", assets=[BESS_1])
    program = sep2.add_program(primacy=1, description="dr")
    sep2.add_control(
        program, mrid=C0002, start=int(time.time()) + 60, duration=600, base=target_w(-(10**6))
    )

    async def state() -> str | None:
        rows = await program_dispatches(der_http)
        return rows[0]["state"] if rows else None

    await wait_until(holds(lambda: sep2.statuses(C0002) == [R.EVENT_RECEIVED]), what="received")
    sep2.set_status(program, C0002, EventStatusType.Cancelled)

    async def cancelled() -> bool:
        return await state() == "cancelled"

    await wait_until(cancelled, what="the dispatch cancelled")
    await wait_until(
        holds(lambda: R.EVENT_CANCELLED in sep2.statuses(C0002)), what="cancel answered"
    )
    assert sep2.statuses(C0002) == [R.EVENT_RECEIVED, R.EVENT_CANCELLED]


async def test_primacy_decides_between_overlapping_programs_and_the_loser_is_told(
    sep2: Sep2TestServer, der_http: httpx.AsyncClient
) -> None:
    utility = sep2.add_program(primacy=1, description="utility")
    market = sep2.add_program(primacy=64, description="market")
    start = int(time.time()) + 120
    # created later, but in the program of lower precedence: it loses where they overlap
    sep2.add_control(
        utility, mrid=A0001, start=start, duration=600, base=target_w(10**6), created=start - 1000
    )
    sep2.add_control(
        market,
        mrid=B0001,
        start=start + 60,
        duration=60,
        base=target_w(-(10**6)),
        created=start - 10,
    )
    sep2.add_control(market, mrid=B0002, start=start + 300, duration=600, base=target_w(500_000))

    async def windows() -> list[tuple[str, float, float]] | None:
        rows = await program_dispatches(der_http)
        found = sorted(
            (
                r["external_id"].split("/")[1],
                datetime.fromisoformat(r["start_at"]).timestamp() - start,
                r["duration_s"],
            )
            for r in rows
        )
        return found if len(found) == 2 else None

    # the utility's control whole; the market's second control after it; its first none
    assert await wait_until(windows, what="two dispatches") == [
        (A0001, 0.0, 600.0),
        (B0002, 600.0, 300.0),
    ]
    await wait_until(
        holds(lambda: R.EVENT_ABORTED_DUE_TO_ALTERNATE_PROGRAM_EVENT in sep2.statuses(B0001)),
        what="the covered control told",
    )
    assert R.EVENT_ABORTED_DUE_TO_ALTERNATE_PROGRAM_EVENT in sep2.statuses(B0001)


async def test_a_control_that_maps_to_nothing_is_answered_not_applicable(
    sep2: Sep2TestServer, der_http: httpx.AsyncClient
) -> None:
    program = sep2.add_program(primacy=1, description="volt-var")
    sep2.add_control(
        program,
        mrid=C0003,
        start=int(time.time()) + 60,
        duration=60,
        base=DERControlBase(rampTms=500),
    )
    await wait_until(
        holds(lambda: R.REJECTED_CONTROL_PARAM_NOT_APPLICABLE in sep2.statuses(C0003)),
        what="not applicable",
    )
    assert await program_dispatches(der_http) == []


async def test_with_the_server_down_the_schedule_runs_and_healthz_says_so(
    sep2: Sep2TestServer, der_http: httpx.AsyncClient, der_run_agent: AgentRunner
) -> None:
    await der_run_agent(adapter_type="sim-bess", assets=[BESS_1])
    program = sep2.add_program(primacy=1, description="peak")
    sep2.add_control(
        program, mrid=C0004, start=int(time.time()) + 8, duration=30, base=target_w(-800_000)
    )

    async def scheduled() -> bool:
        rows = await program_dispatches(der_http)
        return bool(rows) and rows[0]["state"] in ("scheduled", "active")

    await wait_until(scheduled, what="the dispatch scheduled")
    port = sep2.port
    await sep2.stop()

    async def degraded() -> dict[str, Any] | None:
        response = await der_http.get("/healthz")
        body: dict[str, Any] = response.json()
        return body if response.status_code == 503 else None

    await wait_until(degraded, what="/healthz degraded")
    body = await degraded()
    assert body is not None and "utility" in body["reason"]

    async def applied() -> bool:
        return await setpoint(der_http) == -0.8

    await wait_until(applied, timeout_s=20, what="the schedule applied with the server down")
    await sep2.start(port)

    async def healthy() -> bool:
        return (await der_http.get("/healthz")).status_code == 200

    await wait_until(healthy, what="/healthz ok again")


async def test_an_operator_s_manual_dispatch_holds_the_battery_and_the_server_hears_opt_out(
    sep2: Sep2TestServer, der_http: httpx.AsyncClient, der_run_agent: AgentRunner
) -> None:
    await der_run_agent(adapter_type="sim-bess", assets=[BESS_1])
    manual = await der_http.post(
        "/dispatch", json={"asset_id": BESS_1, "mw": 0.3, "duration_s": 300}
    )
    assert manual.status_code in (200, 201, 202), manual.text
    program = sep2.add_program(primacy=1, description="peak")
    sep2.add_control(
        program, mrid=C0005, start=int(time.time()) + 30, duration=60, base=target_w(10**6)
    )
    await wait_until(
        holds(lambda: R.USER_CHOSE_OPT_OUT in sep2.statuses(C0005)), what="the opt-out"
    )
    assert sep2.statuses(C0005) == [R.EVENT_RECEIVED, R.USER_CHOSE_OPT_OUT]
    assert await program_dispatches(der_http) == []
