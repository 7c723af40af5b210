"""Device conditions: what an adapter raises and clears becomes a durable outbox event
(``condition_raised`` / ``condition_cleared``) that the link sends to the headend."""

from __future__ import annotations

import asyncio
from pathlib import Path

from der_sdk.conditions import ConditionQueue
from der_sdk.testing.waits import wait_until
from der_sdk_agent.store import BufferFile, Outbox
from tests.agent.conftest import A1, A2, FaultBox, MakeAgent, flaky_config
from tests.agent.fake_headend import FakeHeadend


async def test_each_adapter_gets_its_own_condition_queue(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox
) -> None:
    agent = make_agent(headend.address, config=flaky_config())
    assert isinstance(box.conditions[A1], ConditionQueue)
    assert box.conditions[A1] is agent.adapters[A1].conditions
    assert box.conditions[A1] is not box.conditions[A2]


async def test_raised_and_cleared_conditions_are_committed_once_each_with_the_asset(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox
) -> None:
    agent = make_agent(headend.address, config=flaky_config())
    reporter = box.conditions[A1]
    reporter.raise_condition("inverter_trip", "major", "inverter tripped")
    reporter.raise_condition("inverter_trip", "critical", "again")  # active: no-op
    reporter.clear_condition("unknown_code")  # never raised: no-op

    await agent.sample_once()
    reporter.clear_condition("inverter_trip")
    reporter.clear_condition("inverter_trip")  # no longer active: no-op
    await agent.sample_once()

    events = await agent.outbox.events.all()
    assert [(e.kind, e.asset_id, e.message, e.data) for e in events] == [
        (
            "condition_raised",
            A1,
            "inverter tripped",
            {"code": "inverter_trip", "severity": "major"},
        ),
        (
            "condition_cleared",
            A1,
            "inverter_trip cleared",
            {"code": "inverter_trip", "severity": "major"},
        ),
    ]
    assert events[0].ts < events[1].ts


async def test_a_condition_raised_between_polls_reaches_the_headend_without_waiting_for_one(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox
) -> None:
    agent = make_agent(headend.address, config=flaky_config(telemetry_interval_s=3600))
    await agent.start()
    await agent.wait_connected()
    await asyncio.sleep(0.05)  # past the first poll, the next is an hour away

    box.conditions[A2].raise_condition("charger_fault", "warning", "connector 2 stuck")

    event = await wait_until(
        lambda: _event_of(headend, "condition_raised"), "the condition_raised event"
    )
    assert event.asset_id == A2
    assert event.message == "connector 2 stuck"


async def _event_of(headend: FakeHeadend, kind: str) -> object | None:
    events = [e for stream in headend.streams for e in stream.events]
    return next((e for e in events if e.kind == kind), None)


async def test_a_condition_raised_just_before_stop_is_in_the_buffer_file_after_it(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox, tmp_path: Path
) -> None:
    path = tmp_path / "buffer.sqlite3"
    agent = make_agent(
        headend.address, config=flaky_config(telemetry_interval_s=3600), buffer_path=str(path)
    )
    await agent.start()
    box.conditions[A1].raise_condition("overspeed_stop", "warning", "stopped at 26 m/s")
    await agent.stop()  # before the recorder task had a turn

    file = BufferFile(str(path))
    outbox = Outbox(file)
    try:
        events = await outbox.events.all()
    finally:
        await file.close()
    assert [(e.kind, e.asset_id, e.data["code"]) for e in events] == [
        ("condition_raised", A1, "overspeed_stop")
    ]
