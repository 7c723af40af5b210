"""Fault tests of scheduled dispatch (docs/dispatch.md): the agent runs a schedule by its
own clock through a link cut and across a SIGKILL, and refuses one when its clock is off.

Real gRPC over TCP (through :class:`TcpProxy` where the link is cut), a real headend on
SQLite, and the agent in process or as a subprocess killed with SIGKILL. The full 30 s
link cut is marked ``slow``; a 5 s one always runs.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from der_sdk.plugins import Plugins
from der_sdk.testing.devices import SimulatedDevicePlugin
from der_sdk.testing.faults import AgentProcess, TcpProxy
from tests.faults.conftest import (
    B2,
    SITE,
    gateway_agent,
    in_process_headend,
    wait_until,
    write_agent_config,
)

ON_TIME_S = 1.0
"""How late a step may reach the device on a loaded CI machine and still be on time."""


def _iso(ts: datetime) -> str:
    return ts.isoformat()


async def _schedule(
    http: httpx.AsyncClient,
    start: datetime,
    steps: list[tuple[float, float]],
    duration_s: float,
) -> str:
    """``POST /dispatch`` of a schedule for B2; its dispatch id."""
    created = await http.post(
        "/dispatch",
        json={
            "asset_id": B2,
            "start_at": _iso(start),
            "steps": [{"offset_s": offset, "mw": mw} for offset, mw in steps],
            "duration_s": duration_s,
        },
    )
    assert created.status_code == 202, created.text
    dispatch_id: str = created.json()["dispatch_id"]
    return dispatch_id


async def _record(http: httpx.AsyncClient, dispatch_id: str) -> dict[str, Any]:
    response = await http.get(f"/dispatch/{dispatch_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _until_state(
    http: httpx.AsyncClient, dispatch_id: str, state: str, within: float
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body = await _record(http, dispatch_id)
        return body if body["state"] == state else None

    return await wait_until(reached, within=within, what=f"dispatch {dispatch_id} {state}")


@pytest.mark.parametrize(
    "cut_s", [pytest.param(5.0, id="5s"), pytest.param(30.0, id="30s", marks=pytest.mark.slow)]
)
async def test_a_three_step_schedule_runs_on_time_on_the_agent_across_a_link_cut(
    cut_s: float,
    tmp_path: Path,
    inventory_path: Path,
    der_plugins: Plugins,
    der_test_device: SimulatedDevicePlugin,
) -> None:
    headend = await in_process_headend(inventory_path, tmp_path / "der.db", der_plugins)
    try:
        async with TcpProxy("127.0.0.1", headend.grpc_port) as proxy:
            agent = gateway_agent(
                tmp_path, inventory_path, der_plugins, proxy.addr, default_adapter="test-device"
            )
            await agent.start()
            try:
                async with asyncio.timeout(15):
                    await agent.wait_connected()
                device = der_test_device.device(B2)
                written: list[tuple[float, float]] = []
                write = device.write_setpoint

                async def timed_write(mw: float) -> None:
                    written.append((time.time(), mw))
                    await write(mw)

                device.write_setpoint = timed_write  # type: ignore[method-assign]
                start = datetime.now(UTC) + timedelta(seconds=2)
                offsets = [0.0, round(cut_s * 0.3, 3), round(cut_s * 0.6, 3)]
                duration_s = round(cut_s * 0.85, 3)
                async with httpx.AsyncClient(base_url=headend.http_url, timeout=5) as http:
                    dispatch_id = await _schedule(
                        http, start, list(zip(offsets, (0.5, -1.0, 1.5), strict=True)), duration_s
                    )

                    async def held_by_the_agent() -> bool:
                        body = await _record(http, dispatch_id)
                        return body["targets"][0]["state"] == "scheduled"

                    await wait_until(held_by_the_agent, within=10, what="the agent holds it")
                    proxy.cut()  # from before the start to after the end
                    cut_at = time.time()
                    await asyncio.sleep(start.timestamp() + duration_s + 0.5 - cut_at)
                    during_cut = await _record(http, dispatch_id)
                    proxy.heal()
                    record = await _until_state(http, dispatch_id, "completed", within=30)
            finally:
                await agent.stop()
    finally:
        await headend.stop()

    assert during_cut["state"] == "scheduled", "the headend heard nothing during the cut"
    due = [start.timestamp() + o for o in offsets] + [start.timestamp() + duration_s]
    assert [mw for _, mw in written] == [0.5, -1.0, 1.5, 0.0], "each step written once"
    for (at, mw), when in zip(written, due, strict=True):
        assert when - 0.05 <= at <= when + ON_TIME_S, f"{mw} MW written {at - when:+.3f} s off"
    assert all(cut_at < at < cut_at + cut_s + 2 for at, _ in written), "all during the cut"
    steps = record["targets"][0]["steps"]
    assert [s["status"] for s in steps] == ["applied", "applied", "applied"]
    assert [s["applied_mw"] for s in steps] == [0.5, -1.0, 1.5]
    details = [e["detail"] for e in record["events"]]
    for index in range(3):
        assert sum(f"step {index} applied" in d for d in details) == 1, details
    states = [e["state"] for e in record["events"]]
    assert "active" in states and states[-1] == "completed", states
    assert "returned to default" in (record["targets"][0]["reason"] or "")


async def test_an_agent_killed_mid_schedule_resumes_at_the_step_in_force_without_replay(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins
) -> None:
    headend = await in_process_headend(inventory_path, tmp_path / "der.db", der_plugins)
    config = write_agent_config(tmp_path / "agent.yaml")
    agent = AgentProcess(
        inventory_path, headend.grpc_addr, tmp_path, site_id=SITE, agent_config_path=config
    )
    try:
        async with agent, httpx.AsyncClient(base_url=headend.http_url, timeout=5) as http:
            await agent.wait_registered()
            start = datetime.now(UTC) + timedelta(seconds=2)
            dispatch_id = await _schedule(http, start, [(0, 0.5), (5, -1.0), (12, 1.5)], 15)

            async def step_0_reported() -> bool:
                body = await _record(http, dispatch_id)
                return body["targets"][0]["steps"][0]["status"] == "applied"

            await wait_until(step_0_reported, within=10, what="step 0 applied")
            assert await agent.kill() == -9
            # dead until step 1 is due, then back within its window
            await asyncio.sleep(max(0.0, start.timestamp() + 6 - time.time()))
            await agent.restart()
            record = await _until_state(http, dispatch_id, "completed", within=30)
            log = agent.log_text()
    finally:
        await headend.stop()

    steps = record["targets"][0]["steps"]
    assert [s["status"] for s in steps] == ["applied", "applied", "applied"], steps
    assert "late" in (steps[1]["reason"] or ""), "step 1 ran late, after the restart"
    at = [datetime.fromisoformat(s["at"]).timestamp() for s in steps]
    assert at[1] >= start.timestamp() + 6, "step 1 ran after the restart, not before the kill"
    assert abs(at[2] - (start.timestamp() + 12)) <= ON_TIME_S, "step 2 ran on time"
    for index in range(3):
        runs = re.findall(rf"schedule {dispatch_id}: step {index} ", log)
        assert len(runs) == 1, f"step {index} ran {len(runs)} times:\n{log}"
    assert log.count("--- start 2 of") == 1


async def test_a_schedule_is_refused_with_the_reason_when_the_agent_clock_is_off(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins
) -> None:
    headend = await in_process_headend(inventory_path, tmp_path / "der.db", der_plugins)
    agent = gateway_agent(
        tmp_path,
        inventory_path,
        der_plugins,
        headend.grpc_addr,
        clock=lambda: time.time() - 10.0,  # ten seconds behind
        clock_offset_max_s=2,
        heartbeat_interval_s=0.2,
    )
    await agent.start()
    try:
        async with asyncio.timeout(15):
            await agent.wait_connected()
        async with httpx.AsyncClient(base_url=headend.http_url, timeout=5) as http:

            async def offset_reported() -> float | None:
                rows = (await http.get("/agents")).json()
                offsets = [r["clock_offset_s"] for r in rows if r["asset_id"] == B2]
                return offsets[0] if offsets and offsets[0] is not None else None

            offset = await wait_until(offset_reported, within=10, what="the agent's offset")
            created = await http.post(
                "/dispatch",
                json={
                    "asset_id": B2,
                    "start_at": _iso(datetime.now(UTC) + timedelta(seconds=30)),
                    "mw": 1.0,
                },
            )
            assert created.status_code == 202, created.text
            record = await _until_state(http, created.json()["dispatch_id"], "rejected", 10)
    finally:
        await agent.stop()
        await headend.stop()
    assert 9.0 <= offset <= 11.0, offset
    assert "behind the headend's" in record["reason"]
    assert "clock_offset_max_s" in record["reason"] and "2 s" in record["reason"]
    assert record["targets"][0]["steps"][0]["status"] == "rejected", "it never runs"
