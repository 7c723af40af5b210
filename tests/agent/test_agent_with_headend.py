"""The agent against the reference headend (``der_sdk.testing``): the headend
acknowledges everything the agent keeps until acknowledged, so nothing piles up."""

from __future__ import annotations

from der_sdk.models import Event
from der_sdk.testing import DEFAULT_ASSET_IDS, wait_until
from der_sdk_agent.testing import AgentRunner

BESS_1 = DEFAULT_ASSET_IDS[0]


async def test_the_reference_headend_acknowledges_batches_outcomes_events_and_reports(
    der_run_agent: AgentRunner,
) -> None:
    link = await der_run_agent(adapter_type="sim-bess")
    agent = link.agent
    dispatch = await link.dispatch(1.0, asset_id=BESS_1, duration_s=0.1)
    await link.wait_for_dispatch(dispatch.dispatch_id, "applied")

    async def reverted() -> list[Event]:
        return await link.headend.storage.events(asset_id=BESS_1, kind="duration_reverted")

    await wait_until(reverted, "the duration_reverted event at the headend")
    await agent.dispatch(asset_id=BESS_1, mw=0.5)  # a local command: reported

    async def settled() -> bool:
        stats = agent.stats()
        return (
            stats.unreported_outcomes == 0  # SetpointOutcomeAck
            and stats.unacked_local_dispatches == 0  # LocalDispatchAck
            and stats.unacked_events == 0  # EventAck
            and stats.buffer_batches <= 2  # TelemetryAck with stored_through
        )

    await wait_until(settled, "the headend to acknowledge", last_seen=agent.stats)
    assert agent.stats().samples_dropped == 0
    assert agent.journal.in_force[BESS_1] == "local"
    entry = await agent.journal.get(dispatch.dispatch_id)
    assert entry is not None and entry.status == "applied" and entry.reported


async def test_conditions_an_adapter_reports_become_one_alarm_at_the_headend(
    der_run_agent: AgentRunner,
) -> None:
    """The whole path of device conditions (docs/alarms.md): the adapter's reporter, the
    agent's durable outbox, the link, and the headend's alarm per asset and code."""
    link = await der_run_agent(adapter_type="sim-bess")
    agent, storage = link.agent, link.headend.storage
    reporter = agent.adapters[BESS_1].conditions  # what the adapter's ctx.conditions is
    reporter.raise_condition("inverter_trip", "critical", "DC fault")
    reporter.clear_condition("inverter_trip", "reset")
    reporter.raise_condition("inverter_trip", "critical", "DC fault")

    seen: list[object] = []

    async def alarmed() -> bool:
        found = await storage.alarms(asset_id=BESS_1)
        seen[:] = [agent.stats().unacked_events, found]
        return agent.stats().unacked_events == 0 and bool(found) and found[0].raise_count == 2

    # A correctness wait, not a speed goal: under a full suite's load the agent's outbox
    # and the headend's side-record writes can take seconds.
    await wait_until(
        alarmed,
        "the headend to acknowledge the conditions and keep the alarm",
        timeout_s=20,
        last_seen=lambda: f"unacked events, alarms: {seen}",
    )
    (alarm,) = await storage.alarms(asset_id=BESS_1)
    assert (alarm.code, alarm.severity, alarm.state) == ("inverter_trip", "critical", "active")
    assert alarm.text == "DC fault"
    assert alarm.raise_count == 2, "raised again within the de-bounce time: the same alarm"
