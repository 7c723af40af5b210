"""Scheduled dispatch at the headend (docs/dispatch.md): ``start_at`` and ``steps`` are
checked with 400s that name the step, planned step by step (a site's steps split by its
policy), sent ahead of the start, followed from the agent's step reports, superseded when
a newer dispatch overlaps before delivery, and cancelled with ``POST
/dispatch/{id}/cancel``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from headend_kit import BESS_1, BESS_2, BESS_3, SITE_A, ConnectAgent, RawAgent, eventually

from der_sdk.models import SCHEDULE_HORIZON_S, SCHEDULE_MAX_STEPS, Allocation
from der_sdk.wire import codec


class _In(float):
    """A ``start_at`` this many seconds after the test runs (parameters are made at
    collection, maybe minutes earlier)."""


def _resolved(body: dict[str, Any]) -> dict[str, Any]:
    return {k: _at(v) if isinstance(v, _In) else v for k, v in body.items()}


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def _schedule(**body: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "asset_id": BESS_2,
        "start_at": _In(600),
        "steps": [{"offset_s": 0, "mw": 0.5}, {"offset_s": 900, "mw": -0.5}],
        "duration_s": 1800,
    }
    values.update(body)
    return {k: v for k, v in values.items() if v is not None}


async def _until(
    http: httpx.AsyncClient, dispatch_id: str, state: str, detail: str | None = None
) -> dict[str, Any]:
    """The record once it is in ``state`` (and, if given, has an event with ``detail``)."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update((await http.get(f"/dispatch/{dispatch_id}")).json())
        events = [e["detail"] or "" for e in seen["events"]]
        return seen["state"] == state and (detail is None or any(detail in e for e in events))

    await eventually(reached, f"dispatch {dispatch_id} {state}")
    return seen


async def _create(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/dispatch", json=_resolved(body))
    assert response.status_code == 202, response.text
    record: dict[str, Any] = response.json()
    return record


async def _held_by_an_agent(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> tuple[RawAgent, str, Any]:
    """A schedule for BESS 2 created with its agent connected: (agent, id, setpoint)."""
    agent = await connect_agent()
    await agent.register([BESS_2])
    record = await _create(http, _schedule())
    return agent, record["dispatch_id"], await agent.recv_kind("setpoint")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            _schedule(
                steps=[
                    {"offset_s": 0, "mw": 0.5},
                    {"offset_s": 60, "mw": 0.2},
                    {"offset_s": 120, "mw": 1.5},
                ]
            ),
            f"steps[2].mw 1.5 MW is outside the limits of asset {BESS_2} (bess, control "
            "kind setpoint): [-1, 1] MW",
        ),
        (
            _schedule(steps=[{"offset_s": 0, "mw": 0.5}, {"offset_s": 0, "mw": 0.2}]),
            "steps[1].offset_s must be more than steps[0].offset_s (0)",
        ),
        (
            _schedule(
                steps=[
                    {"offset_s": 0, "mw": 0.5},
                    {"offset_s": 90, "mw": 0.1},
                    {"offset_s": 30, "mw": 0},
                ]
            ),
            "steps[2].offset_s must be more than steps[1].offset_s (90)",
        ),
        (_schedule(steps=[{"offset_s": 5, "mw": 0.5}]), "steps[0].offset_s must be 0"),
        (
            _schedule(
                steps=[{"offset_s": 0, "mw": 0}, {"offset_s": SCHEDULE_HORIZON_S + 1, "mw": 0}],
                duration_s=None,
            ),
            f"steps[1].offset_s must be at most {SCHEDULE_HORIZON_S} seconds (7 days)",
        ),
        (
            _schedule(steps=[{"offset_s": i, "mw": 0} for i in range(SCHEDULE_MAX_STEPS + 1)]),
            f"steps: at most {SCHEDULE_MAX_STEPS} steps, got {SCHEDULE_MAX_STEPS + 1}",
        ),
        (_schedule(steps=[]), "steps is empty"),
        (_schedule(start_at=_In(-60)), "is in the past"),
        (_schedule(start_at=_In(SCHEDULE_HORIZON_S + 60)), "(7 days) after now"),
        (_schedule(start_at="2030-01-01T12:00:00"), "start_at needs a time zone"),
        (_schedule(start_at=None), "steps need start_at"),
        (_schedule(mw=0.5), "give mw or steps, not both"),
        (_schedule(duration_s=900), "duration_s (900 s) must be more than the last step's"),
        (_schedule(ttl_s=60), "takes no expires_at or ttl_s"),
        (
            {"site_id": SITE_A, "start_at": _In(60), "mw": 3.6},
            f"mw 3.6 MW is outside the limits of site {SITE_A}",
        ),
    ],
    ids=[
        "step-over-limit",
        "offsets-equal",
        "offsets-decrease",
        "first-not-zero",
        "beyond-horizon",
        "too-many",
        "no-steps",
        "start-in-past",
        "start-too-far",
        "start-naive",
        "steps-without-start",
        "mw-and-steps",
        "duration-too-short",
        "schedule-with-ttl",
        "site-over-limit",
    ],
)
async def test_a_bad_schedule_is_a_400_naming_the_step_and_nothing_is_stored(
    http: httpx.AsyncClient, body: dict[str, Any], detail: str
) -> None:
    for path in ("/dispatch", "/dispatch/preview"):
        response = await http.post(path, json=_resolved(body))
        assert response.status_code == 400, response.text
        assert detail in response.json()["detail"], (path, response.json()["detail"])
    assert (await http.get("/dispatch/history")).json() == []


async def test_a_site_schedule_is_split_step_by_step_as_its_preview_shows(
    http: httpx.AsyncClient,
) -> None:
    body = {
        "site_id": SITE_A,
        "start_at": _at(300),
        "steps": [{"offset_s": 0, "mw": 2.0}, {"offset_s": 600, "mw": -3.0}],
        "duration_s": 1200,
    }
    preview = (await http.post("/dispatch/preview", json=body)).json()
    record = await _create(http, body)

    assert record["state"] == "scheduled" and record["start_at"] is not None
    assert [s["mw"] for s in record["steps"]] == [2.0, -3.0]
    by_asset = {t["asset_id"]: t for t in record["targets"]}
    for index, mw in enumerate((2.0, -3.0)):  # each step split as a dispatch of its MW now
        now = (await http.post("/dispatch/preview", json={"site_id": SITE_A, "mw": mw})).json()
        expected = {t["asset_id"]: t["mw"] for t in now["targets"]}
        assert {a: t["steps"][index]["mw"] for a, t in by_asset.items()} == expected
    assert by_asset[BESS_3]["steps"][1]["mw"] == -0.5, "held at its limit"
    assert all(s["status"] == "pending" for t in record["targets"] for s in t["steps"])
    assert [p["shares"] for p in preview["steps"]] == [
        {t: by_asset[t]["steps"][i]["mw"] for t in (BESS_1, BESS_2, BESS_3)} for i in range(2)
    ]
    assert all(t["state"] == "submitted" for t in record["targets"]), "no agent: kept"


async def test_a_schedule_is_sent_ahead_and_follows_the_agents_step_reports(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent, dispatch_id, setpoint = await _held_by_an_agent(http, connect_agent)
    assert setpoint.command_id == dispatch_id and setpoint.asset_id == BESS_2
    assert setpoint.HasField("start_at_us") and setpoint.duration_s == 1800
    assert [(s.offset_s, s.mw) for s in setpoint.steps] == [(0.0, 0.5), (900.0, -0.5)]

    await agent.send(codec.agent_setpoint_ack(dispatch_id, "scheduled", ()))
    await _until(http, dispatch_id, "scheduled")
    applied = (Allocation(asset_id=BESS_2, mw=0.5),)
    at = datetime.now(UTC)
    await agent.send(codec.agent_setpoint_ack(dispatch_id, "applied", applied, ts=at, step=0))
    confirm = await agent.recv_kind("outcome_ack")
    assert (confirm.command_id, confirm.step) == (dispatch_id, 0)
    active = await _until(http, dispatch_id, "active")
    step = active["targets"][0]["steps"][0]
    assert (step["status"], step["applied_mw"]) == ("applied", 0.5)
    assert datetime.fromisoformat(step["at"]) == at

    # the agent's answer to a schedule sent again (its journal says active) is progress,
    # not an outcome; a repeated step report changes nothing; then the next step, the end
    await agent.send(codec.agent_setpoint_ack(dispatch_id, "active", ()))
    await agent.send(codec.agent_setpoint_ack(dispatch_id, "failed", applied, step=0))
    repeated = await agent.recv_kind("outcome_ack")
    assert repeated.HasField("step"), "no outcome_ack for the progress report"
    assert (await _until(http, dispatch_id, "active"))["targets"][0]["state"] == "active"
    skipped = (Allocation(asset_id=BESS_2, mw=-0.5, status="skipped"),)
    await agent.send(codec.agent_setpoint_ack(dispatch_id, "skipped", skipped, step=1))
    await agent.recv_kind("outcome_ack")
    await agent.send(codec.agent_setpoint_ack(dispatch_id, "completed", (), reason="ended"))
    assert (await agent.recv_kind("outcome_ack")).command_id == dispatch_id
    done = await _until(http, dispatch_id, "completed")
    assert [s["status"] for s in done["targets"][0]["steps"]] == ["applied", "skipped"]
    details = [e["detail"] for e in done["events"]]
    assert sum("step 0 applied" in d for d in details) == 1


async def test_a_newer_dispatch_supersedes_an_undelivered_schedule_it_overlaps_only(
    http: httpx.AsyncClient,
) -> None:
    later = await _create(http, _schedule(start_at=_at(3600)))
    earlier_ends = await _create(
        http, _schedule(start_at=_at(60), steps=None, mw=0.2, duration_s=120)
    )
    newer = await _create(http, _schedule(start_at=_at(3000), steps=None, mw=-0.2, duration_s=1200))

    after = {d["dispatch_id"]: d for d in (await http.get("/dispatch/history")).json()}
    assert after[later["dispatch_id"]]["state"] == "superseded"
    assert after[later["dispatch_id"]]["superseded_by"] == newer["dispatch_id"]
    assert after[earlier_ends["dispatch_id"]]["state"] == "scheduled", "no overlap"
    assert after[newer["dispatch_id"]]["state"] == "scheduled"


async def test_cancel_stops_an_undelivered_schedule_and_a_final_one_is_a_409(
    http: httpx.AsyncClient,
) -> None:
    record = await _create(http, _schedule())
    dispatch_id = record["dispatch_id"]

    cancelled = await http.post(f"/dispatch/{dispatch_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    body = cancelled.json()
    assert body["state"] == "cancelled" and body["cancel_requested_at"] is not None
    assert [s["status"] for s in body["targets"][0]["steps"]] == ["cancelled", "cancelled"]

    again = await http.post(f"/dispatch/{dispatch_id}/cancel")
    assert again.status_code == 409
    assert f"dispatch {dispatch_id} is cancelled" in again.json()["detail"]
    assert (await http.post("/dispatch/nope/cancel")).status_code == 404
    audit = (await http.get("/audit", params={"action": "dispatch.cancel"})).json()
    assert [(a["outcome"], a["details"]["dispatch_id"]) for a in audit] == [
        ("refused", dispatch_id),
        ("ok", dispatch_id),
    ]


async def test_cancel_of_a_held_schedule_is_sent_to_the_agent_and_settles_from_its_report(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent, dispatch_id, _ = await _held_by_an_agent(http, connect_agent)
    await agent.send(codec.agent_setpoint_ack(dispatch_id, "scheduled", ()))

    response = await http.post(f"/dispatch/{dispatch_id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "scheduled", "open until the agent reports it"
    cancel = await agent.recv_kind("setpoint")
    assert (cancel.command_id, cancel.cancels) == (f"{dispatch_id}/cancel", dispatch_id)

    reverted = (Allocation(asset_id=BESS_2, mw=0.0),)
    await agent.send(codec.agent_setpoint_ack(dispatch_id, "cancelled", (), reason="by cancel"))
    await agent.recv_kind("outcome_ack")
    await agent.send(codec.agent_setpoint_ack(f"{dispatch_id}/cancel", "applied", reverted))
    assert (await agent.recv_kind("outcome_ack")).command_id == f"{dispatch_id}/cancel"

    body = await _until(http, dispatch_id, "cancelled", detail="cancel applied")
    assert [s["status"] for s in body["targets"][0]["steps"]] == ["cancelled", "cancelled"]


async def test_an_immediate_dispatch_already_sent_cannot_be_cancelled(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_2])
    record = await _create(http, {"asset_id": BESS_2, "mw": 0.3})
    await agent.recv_kind("setpoint")

    response = await http.post(f"/dispatch/{record['dispatch_id']}/cancel")

    assert response.status_code == 409
    assert "is sent" in response.json()["detail"]
