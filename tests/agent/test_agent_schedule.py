"""Schedules on a real agent against the reference headend (real gRPC on loopback): a
newer dispatch cuts an older schedule at its start, a cancel stops one and returns the
asset to its default, and the agent's journal never runs a step twice."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from der_sdk.models import Dispatch
from der_sdk.testing import DEFAULT_ASSET_IDS, wait_until
from der_sdk.wire import codec
from der_sdk_agent.testing import AgentLink, AgentRunner
from tests.agent.conftest import A1, FaultBox, MakeAgent, flaky_config
from tests.agent.fake_headend import FakeHeadend

BESS_1 = DEFAULT_ASSET_IDS[0]  # -2..2 MW


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def _post(link: AgentLink, path: str, body: dict[str, Any] | None = None) -> Any:
    response = await link.http.post(path, json=body)
    assert response.status_code == 202, f"{path}: {response.status_code} {response.text}"
    return response.json()


async def _schedule(
    link: AgentLink, start_in_s: float, steps: list[tuple[float, float]], **more: Any
) -> Any:
    """``POST /dispatch`` of a schedule for BESS 1 starting in ``start_in_s``."""
    body = {
        "asset_id": BESS_1,
        "start_at": _at(start_in_s),
        "steps": [{"offset_s": offset, "mw": mw} for offset, mw in steps],
        **more,
    }
    return await _post(link, "/dispatch", body)


async def _setpoint_of(link: AgentLink) -> float | None:
    sample = await link.latest_telemetry(BESS_1)
    return None if sample is None else sample.mw_setpoint


async def test_a_newer_dispatch_cuts_an_older_schedule_at_its_start(
    der_run_agent: AgentRunner,
) -> None:
    link = await der_run_agent(adapter_type="sim-bess", assets=[BESS_1])
    older = await _schedule(link, 0.5, [(0, 1.0), (2.5, 1.5)], duration_s=5)
    await link.wait_for_dispatch(older["dispatch_id"], "active")
    newer = await _post(
        link,
        "/dispatch",
        {"asset_id": BESS_1, "start_at": _at(1.0), "mw": -0.5, "duration_s": 1.0},
    )

    cut = await link.wait_for_dispatch(older["dispatch_id"], "superseded")
    done = await link.wait_for_dispatch(newer["dispatch_id"], "completed")

    assert cut.superseded_by == newer["dispatch_id"]
    steps = cut.targets[0].steps or []
    assert [s.status for s in steps] == ["applied", "superseded"], "step 1 never ran"
    assert f"superseded by command {newer['dispatch_id']}" in (cut.targets[0].reason or "")
    assert done.targets[0].steps is not None and done.targets[0].steps[0].status == "applied"
    journal = link.agent.journal
    assert await journal.get(f"{older['dispatch_id']}#1") is None, "no row: never begun"


async def test_an_immediate_dispatch_supersedes_a_running_schedule_at_once(
    der_run_agent: AgentRunner,
) -> None:
    link = await der_run_agent(adapter_type="sim-bess", assets=[BESS_1])
    schedule = await _schedule(link, 0.2, [(0, 1.0), (30, 1.5)])
    await link.wait_for_dispatch(schedule["dispatch_id"], "active")
    now = await link.dispatch(0.25, asset_id=BESS_1)

    await link.wait_for_dispatch(now.dispatch_id, "applied")
    cut = await link.wait_for_dispatch(schedule["dispatch_id"], "superseded")

    assert cut.superseded_by == now.dispatch_id
    assert [s.status for s in cut.targets[0].steps or []] == ["applied", "superseded"]


async def test_cancel_stops_a_running_schedule_and_returns_the_asset_to_its_default(
    der_run_agent: AgentRunner,
) -> None:
    link = await der_run_agent(adapter_type="sim-bess", assets=[BESS_1])
    schedule = await _schedule(link, 0.2, [(0, 1.2), (60, -1.0)])
    dispatch_id = schedule["dispatch_id"]
    await link.wait_for_dispatch(dispatch_id, "active")
    await wait_until(lambda: _is(link, 1.2), "the step's setpoint in the telemetry")

    await _post(link, f"/dispatch/{dispatch_id}/cancel")
    record: Dispatch = await link.wait_for_dispatch(dispatch_id, "cancelled")
    await wait_until(lambda: _is(link, 0.0), "the asset back at 0 MW")

    assert [s.status for s in record.targets[0].steps or []] == ["applied", "cancelled"]
    cancel = await link.agent.journal.get(f"{dispatch_id}/cancel")
    assert cancel is not None and cancel.status == "applied"
    assert [(a.asset_id, a.mw) for a in cancel.allocations] == [(BESS_1, 0.0)]
    response = await link.http.post(f"/dispatch/{dispatch_id}/cancel")
    assert response.status_code == 409 and "is cancelled" in response.json()["detail"]


def _writes(box: FaultBox, asset_id: str) -> list[float]:
    return [mw for a, mw, _ in box.applied if a == asset_id]


async def _is(link: AgentLink, mw: float) -> bool:
    return await _setpoint_of(link) == mw


async def test_a_restarted_agent_skips_steps_whose_time_passed_and_runs_the_one_in_force(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox, tmp_path: Path
) -> None:
    now = [time.time()]  # the agents' wall clock, moved by hand
    config = flaky_config(clock_offset_max_s=1e9)  # the hand-moved clock is far off
    path = str(tmp_path / "agent.sqlite3")
    agent = make_agent(headend.address, config=config, buffer_path=path, clock=lambda: now[0])
    await agent.start()
    stream = await headend.wait_stream()
    start = now[0] + 10
    stream.send(
        codec.headend_setpoint(
            "s1",
            0.1,
            asset_id=A1,
            start_at=datetime.fromtimestamp(start, UTC),
            steps=[(0, 0.1), (10, 0.2), (20, 0.3)],
            duration_s=30,
        )
    )

    async def reported(status: str, step: int | None = None) -> bool:
        return any(
            a.command_id == "s1"
            and a.status == status
            and (a.step if a.HasField("step") else None) == step
            for s in headend.streams
            for a in s.setpoint_acks
        )

    await wait_until(lambda: reported("scheduled"), "the schedule in the journal")
    now[0] = start + 1  # step 0 is due
    await wait_until(lambda: reported("applied", 0), "step 0 applied")
    await agent.stop()

    now[0] = start + 22  # down through step 1's whole time; step 2 is in force
    restarted = make_agent(headend.address, config=config, buffer_path=path, clock=lambda: now[0])
    await restarted.start()
    await wait_until(lambda: reported("applied", 2), "step 2 applied after the restart")
    now[0] = start + 31  # the end
    await wait_until(lambda: reported("completed"), "the schedule completed")

    assert _writes(box, A1) == [0.1, 0.3, 0.0], "no past step replayed; once each"
    skipped = await restarted.journal.get("s1#1")
    assert skipped is not None and skipped.status == "skipped"
    late = await restarted.journal.get("s1#2")
    assert late is not None and "late" in (late.reason or "")
    assert restarted.journal.schedules == []
