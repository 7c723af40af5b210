"""Device conditions: what an adapter raises and clears becomes a durable outbox event
(``condition_raised`` / ``condition_cleared``) that the link sends to the headend."""

from __future__ import annotations

import asyncio

from der_sdk.conditions import ConditionQueue
from der_sdk.testing.waits import wait_until
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
