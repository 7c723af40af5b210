"""Dispatch over REST, routed down real agent streams: targets, split and clamp, pending
delivery, supersede, acknowledgements and the lifecycle record."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    BESS_3,
    PV_1,
    SITE_A,
    SITE_A_ASSETS,
    SITE_B,
    ConnectAgent,
    eventually,
)

from der_sdk import deprecations
from der_sdk.wire import codec


async def dispatch(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/dispatch", json=body)
    assert response.status_code == 202, response.text
    record: dict[str, Any] = response.json()
    return record


async def wait_for_state(http: httpx.AsyncClient, dispatch_id: str, state: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def reached() -> bool:
        found.update((await http.get(f"/dispatch/{dispatch_id}")).json())
        return found.get("state") == state

    await eventually(reached, f"dispatch {dispatch_id} is {state}")
    return found


async def test_per_asset_dispatch_sends_a_setpoint_for_the_asset_and_returns_202_sent(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)

    record = await dispatch(http, asset_id=BESS_2, site_id=SITE_A, mw=0.75, duration_s=60)

    assert record["state"] == "sent"
    assert record["asset_id"] == BESS_2
    assert record["targets"] == [
        {
            "asset_id": BESS_2,
            "mw": 0.75,
            "state": "sent",
            "applied_mw": None,
            "reason": None,
            "command_id": record["dispatch_id"],
            "steps": None,  # not a schedule
        }
    ]
    setpoint = await agent.recv_kind("setpoint")
    assert setpoint.command_id == record["dispatch_id"]
    assert setpoint.asset_id == BESS_2
    assert not setpoint.HasField("site_id"), "asset_id wins: no site fan-out"
    assert setpoint.mw == 0.75
    assert setpoint.duration_s == 60


async def test_per_asset_dispatch_is_clamped_to_the_asset_limits(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_3])

    record = await dispatch(http, asset_id=BESS_3, mw=-4.0)

    (target,) = record["targets"]
    assert target["mw"] == -0.5
    assert target["reason"] == "clamped to [-0.5, 0.5]"
    assert (await agent.recv_kind("setpoint")).mw == -0.5


async def test_site_dispatch_to_one_gateway_sends_one_site_setpoint_with_weighted_clamped_targets(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)

    record = await dispatch(http, site_id=SITE_A, mw=3.0)

    assert record["state"] == "sent"
    assert record["policy"] == "capacity_weighted"
    assert record["unallocated_mw"] == 0.0
    shares = {t["asset_id"]: t["mw"] for t in record["targets"]}
    assert list(shares) == list(SITE_A_ASSETS)
    assert sum(shares.values()) == pytest.approx(3.0)
    assert shares[BESS_3] == 0.5, "clamped to max_mw"
    assert shares[BESS_1] == pytest.approx(2 * shares[BESS_2]), "4 MWh vs 2 MWh"
    assert all(t["state"] == "sent" for t in record["targets"])
    setpoint = await agent.recv_kind("setpoint")
    assert setpoint.command_id == record["dispatch_id"]
    assert setpoint.site_id == SITE_A and not setpoint.HasField("asset_id")
    assert setpoint.mw == 3.0, "the agent splits the requested MW itself"


async def test_site_dispatch_beyond_the_site_limits_reports_the_unallocated_part(
    http: httpx.AsyncClient,
) -> None:
    record = await dispatch(http, site_id=SITE_A, mw=5.0)

    assert sum(t["mw"] for t in record["targets"]) == pytest.approx(3.5)
    assert record["unallocated_mw"] == pytest.approx(1.5)
    assert "could not be placed" in record["reason"]


async def test_site_dispatch_over_several_streams_sends_per_asset_setpoints_and_keeps_the_rest(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    one = await connect_agent()
    await one.register([BESS_1], agent_id="bess-1")
    two = await connect_agent()
    await two.register([BESS_2], agent_id="bess-2")

    record = await dispatch(http, site_id=SITE_A, mw=3.0)

    assert record["state"] == "submitted", "BESS 3 is offline"
    states = {t["asset_id"]: t["state"] for t in record["targets"]}
    assert states == {BESS_1: "sent", BESS_2: "sent", BESS_3: "submitted"}
    shares = {t["asset_id"]: t["mw"] for t in record["targets"]}
    for agent, asset_id in ((one, BESS_1), (two, BESS_2)):
        setpoint = await agent.recv_kind("setpoint")
        assert setpoint.command_id == f"{record['dispatch_id']}/{asset_id}"
        assert setpoint.asset_id == asset_id
        assert setpoint.mw == pytest.approx(shares[asset_id])


async def test_dispatch_to_an_offline_asset_is_pending_delivered_on_register_and_applied_on_ack(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    record = await dispatch(http, asset_id=BESS_2, mw=0.5)
    assert record["state"] == "submitted"
    assert record["targets"][0]["state"] == "submitted"

    agent = await connect_agent()
    await agent.register([BESS_2], agent_id="late")
    setpoint = await agent.recv_kind("setpoint")
    assert setpoint.command_id == record["dispatch_id"]
    assert setpoint.asset_id == BESS_2 and setpoint.mw == 0.5
    await wait_for_state(http, record["dispatch_id"], "sent")

    await agent.send(
        codec.agent_setpoint_ack(
            setpoint.command_id, "applied", [codec.Allocation(asset_id=BESS_2, mw=0.5)]
        )
    )
    applied = await wait_for_state(http, record["dispatch_id"], "applied")

    assert applied["targets"][0]["state"] == "applied"
    assert applied["targets"][0]["applied_mw"] == 0.5
    assert [e["state"] for e in applied["events"]] == ["submitted", "sent", "applied"]
    assert "late" in applied["events"][-1]["detail"]


async def test_pending_site_dispatch_is_delivered_as_one_site_setpoint_to_a_full_gateway(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    record = await dispatch(http, site_id=SITE_A, mw=-1.0)
    assert record["state"] == "submitted"

    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    setpoint = await agent.recv_kind("setpoint")
    assert setpoint.command_id == record["dispatch_id"]
    assert setpoint.site_id == SITE_A and setpoint.mw == -1.0

    allocations = [
        codec.Allocation(asset_id=t["asset_id"], mw=t["mw"]) for t in record["targets"][:2]
    ] + [codec.Allocation(asset_id=BESS_3, mw=0.0, status="failed", reason="inverter trip")]
    await agent.send(codec.agent_setpoint_ack(setpoint.command_id, "applied", allocations))
    done = await wait_for_state(http, record["dispatch_id"], "failed")

    states = {t["asset_id"]: t["state"] for t in done["targets"]}
    assert states == {BESS_1: "applied", BESS_2: "applied", BESS_3: "failed"}
    bess_3 = next(t for t in done["targets"] if t["asset_id"] == BESS_3)
    assert bess_3["reason"] == "inverter trip" and bess_3["applied_mw"] is None


async def test_a_newer_dispatch_supersedes_older_pending_targets_for_the_same_asset(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    older = await dispatch(http, asset_id=BESS_1, mw=1.0)
    newer = await dispatch(http, asset_id=BESS_1, mw=-1.0)

    superseded = (await http.get(f"/dispatch/{older['dispatch_id']}")).json()
    assert superseded["state"] == "superseded"
    assert newer["dispatch_id"] in superseded["targets"][0]["reason"]
    agent = await connect_agent()
    await agent.register([BESS_1])
    setpoint = await agent.recv_kind("setpoint")
    assert setpoint.command_id == newer["dispatch_id"] and setpoint.mw == -1.0
    history = (await http.get("/dispatch/history", params={"state": "superseded"})).json()
    assert [d["dispatch_id"] for d in history] == [older["dispatch_id"]]


async def test_a_rejecting_ack_marks_the_dispatch_rejected_with_the_reason(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1])
    record = await dispatch(http, asset_id=BESS_1, mw=1.0)
    setpoint = await agent.recv_kind("setpoint")
    await agent.send(codec.agent_setpoint_ack(setpoint.command_id, "rejected", [], "local mode"))

    done = await wait_for_state(http, record["dispatch_id"], "rejected")
    assert done["reason"] == "local mode"
    assert done["targets"][0]["reason"] == "local mode"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('{"asset_id": "x", "mw": "ten"}', "mw"),
        ('{"site_id": "x", "mw": 1, "priority": 5}', "priority"),
        ('{"asset_id": "x"}', "mw"),
        ('{"asset_id": 7, "mw": 1}', "asset_id"),
        ('{"mw": 1}', "asset_id or site_id"),
        (f'{{"asset_id": "{BESS_1}", "mw": 1, "duration_s": -5}}', "duration_s"),
        ("[1, 2]", "object"),
        ("{not json", "malformed"),
    ],
)
async def test_malformed_dispatch_body_is_400_naming_the_field(
    http: httpx.AsyncClient, body: str, named: str
) -> None:
    response = await http.post(
        "/dispatch", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert named in response.json()["detail"]


async def test_dispatch_to_an_unknown_asset_or_site_is_404(http: httpx.AsyncClient) -> None:
    unknown_asset = await http.post("/dispatch", json={"asset_id": "nope", "mw": 1})
    assert unknown_asset.status_code == 404
    assert unknown_asset.json()["detail"] == "unknown asset nope"
    unknown_site = await http.post("/dispatch", json={"site_id": "nope", "mw": 1})
    assert unknown_site.status_code == 404
    assert unknown_site.json()["detail"] == "unknown site nope"
    missing = await http.get("/dispatch/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404


async def test_dispatch_history_filters_by_target_and_state_newest_first(
    http: httpx.AsyncClient,
) -> None:
    first = await dispatch(http, asset_id=BESS_1, mw=1.0)
    second = await dispatch(http, site_id=SITE_A, mw=1.0)
    third = await dispatch(http, asset_id=PV_1, mw=2.0)

    everything = (await http.get("/dispatch/history")).json()
    assert [d["dispatch_id"] for d in everything] == [
        third["dispatch_id"],
        second["dispatch_id"],
        first["dispatch_id"],
    ]
    by_asset = (await http.get("/dispatch/history", params={"asset_id": BESS_1})).json()
    assert [d["dispatch_id"] for d in by_asset] == [second["dispatch_id"], first["dispatch_id"]]
    submitted = (await http.get("/dispatch/history", params={"state": "submitted"})).json()
    assert [d["dispatch_id"] for d in submitted] == [third["dispatch_id"], second["dispatch_id"]]
    old_name = (await http.get("/dispatch/history", params={"state": "pending"})).json()
    assert old_name == submitted, "state=pending, the old name, still filters submitted"
    by_site = (await http.get("/dispatch/history", params={"site_id": SITE_B})).json()
    assert [d["dispatch_id"] for d in by_site] == [third["dispatch_id"]]
    bad = await http.get("/dispatch/history", params={"state": "done"})
    assert bad.status_code == 400 and "`state`" in bad.json()["detail"]


async def test_state_pending_is_logged_as_deprecated_once_with_since_and_removal(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deprecations, "_logged", set())  # as in a fresh headend process
    await dispatch(http, asset_id=BESS_1, mw=1.0)
    submitted = (await http.get("/dispatch/history", params={"state": "submitted"})).json()
    with caplog.at_level(logging.WARNING, logger="der.deprecations"):
        for _ in range(2):
            response = await http.get("/dispatch/history", params={"state": "pending"})
            assert response.status_code == 200 and response.json() == submitted
    assert [r.getMessage() for r in caplog.records if r.name == "der.deprecations"] == [
        "GET /dispatch/history?state=pending is deprecated since der-sdk 0.2 and will be "
        "removed in der-sdk 0.3; filter with state=submitted, the same state under its new "
        "name (a REST client used it; logged once per process)"
    ]
