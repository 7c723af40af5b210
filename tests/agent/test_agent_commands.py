"""The dispatch lifecycle at the agent over real gRPC: acked then final, at most one
device write per command id (resent setpoints, reconnects, agent restarts), expiry,
outcomes re-reported until acknowledged, local reports and events kept until
acknowledged, the duration revert event and the link-loss fallback."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from der_sdk.models import utc_now
from der_sdk.testing import wait_until
from der_sdk.wire import codec, pb
from der_sdk_agent.store import BufferFile, CommandJournal
from der_sdk_agent.store.journal import RESTARTED_REASON
from tests.agent.conftest import A1, A2, SITE, FaultBox, MakeAgent, flaky_config
from tests.agent.fake_headend import FakeHeadend


def _writes(box: FaultBox, asset_id: str) -> list[float]:
    return [mw for a, mw, _ in box.applied if a == asset_id]


async def test_setpoint_is_acked_then_applied_each_with_a_time(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox
) -> None:
    agent = make_agent(headend.address, config=flaky_config())
    await agent.start()
    stream = await headend.wait_stream()
    before = codec.datetime_to_us(utc_now())
    final = await headend.setpoint("c1", 0.7, asset_id=A1)
    acks = [a for a in stream.setpoint_acks if a.command_id == "c1"]
    assert [a.status for a in acks] == ["acked", "applied"]
    assert before <= acks[0].ts_us <= acks[1].ts_us
    assert final.applied_mw == pytest.approx(0.7) and _writes(box, A1) == [0.7]

    # the outcome ack travels back after the final ack: wait for it to be recorded
    async def reported() -> bool:
        found = await agent.journal.get("c1")
        return found is not None and found.reported

    await wait_until(reported, "the outcome of c1 to be marked reported")
    entry = await agent.journal.get("c1")
    assert entry is not None and entry.status == "applied" and entry.reported


async def test_same_setpoint_twice_writes_the_device_once_and_repeats_the_outcome(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox
) -> None:
    agent = make_agent(headend.address, config=flaky_config())
    await agent.start()
    stream = await headend.wait_stream()
    first = await headend.setpoint("c1", 0.4, site_id=SITE)
    again = await headend.setpoint("c1", 0.4, site_id=SITE)
    assert again.status == first.status == "applied"
    assert list(again.allocations) == list(first.allocations)
    assert again.ts_us == first.ts_us  # the recorded outcome, not a new one
    assert [a.status for a in stream.setpoint_acks] == ["acked", "applied", "applied"]
    assert len(box.applied) == 2  # one write per asset of the site, once


async def test_setpoint_resent_after_a_reconnect_is_not_applied_again(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox
) -> None:
    agent = make_agent(headend.address, config=flaky_config())
    await agent.start()
    first = await headend.wait_stream()
    await headend.setpoint("c1", 0.3, asset_id=A2)
    first.close()
    second = await headend.wait_stream(index=1)
    ack = await headend.setpoint("c1", 0.3, asset_id=A2, stream=second)
    assert ack.status == "applied" and _writes(box, A2) == [0.3]
    assert [a.status for a in second.setpoint_acks] == ["applied"]  # no second "acked"


async def test_setpoint_resent_after_an_agent_restart_is_not_applied_again(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox, tmp_path: Path
) -> None:
    path = str(tmp_path / "agent.sqlite3")
    agent = make_agent(headend.address, config=flaky_config(), buffer_path=path)
    await agent.start()
    await headend.wait_stream()
    await headend.setpoint("c1", -0.6, asset_id=A1)
    await agent.stop()

    restarted = make_agent(headend.address, config=flaky_config(), buffer_path=path)
    await restarted.start()
    stream = await headend.wait_stream(index=1)
    assert stream.stream_id == headend.streams[0].stream_id
    ack = await headend.setpoint("c1", -0.6, asset_id=A1, stream=stream)
    assert ack.status == "applied" and _writes(box, A1) == [-0.6]
    assert restarted.journal.in_force == {A1: "headend"}


async def test_command_in_progress_when_the_agent_died_is_failed_and_never_applied(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox, tmp_path: Path
) -> None:
    path = str(tmp_path / "agent.sqlite3")
    died = BufferFile(path)  # what an agent killed between the journal and the device left
    await CommandJournal(died).receive("c9", asset_id=A1, site_id=None, mw=0.9, duration_s=None)
    await died.close()

    agent = make_agent(headend.address, config=flaky_config(), buffer_path=path)
    await agent.start()
    stream = await headend.wait_stream()
    [reported] = await headend.wait_for(lambda: stream.final_acks("c9"))
    assert reported.status == "failed" and reported.reason == RESTARTED_REASON
    ack = await headend.setpoint("c9", 0.9, asset_id=A1)
    assert ack.status == "failed" and box.applied == []


async def test_expired_setpoint_is_never_applied(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox
) -> None:
    agent = make_agent(headend.address, config=flaky_config())
    await agent.start()
    stream = await headend.wait_stream()
    ack = await headend.setpoint("late", 0.5, asset_id=A1, expires_in_ms=0)
    assert ack.status == "expired" and "not applied" in ack.reason
    assert [a.status for a in stream.setpoint_acks] == ["acked", "expired"]

    # One waits behind a slow write and its deadline passes meanwhile.
    box.apply_delay_s = 0.3
    headend.send_setpoint("slow", 0.2, asset_id=A2)
    ack = await headend.setpoint("queued", 0.8, asset_id=A1, expires_in_ms=100)
    assert ack.status == "expired"
    assert (await headend.setpoint("fresh", 0.1, asset_id=A1, expires_in_ms=5000)).status == (
        "applied"
    )
    assert box.applied == [(A2, 0.2, None), (A1, 0.1, None)]  # "late" and "queued": never


async def test_absolute_expiry_by_the_agent_clock_applies_too_and_skew_is_logged(
    headend: FakeHeadend,
    make_agent: MakeAgent,
    box: FaultBox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="der.agent")
    agent = make_agent(headend.address, config=flaky_config())
    await agent.start()
    await headend.wait_stream()
    past = utc_now() - timedelta(seconds=30)  # a headend clock 30 s behind, say
    ack = await headend.setpoint("stale", 0.5, asset_id=A1, expires_in_ms=60_000, expires_at=past)
    assert ack.status == "expired" and box.applied == []
    [skew] = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
    assert "stale" in skew and "earlier" in skew

    soon = utc_now() + timedelta(seconds=30)
    assert (await headend.setpoint("ok", 0.4, asset_id=A1, expires_at=soon)).status == "applied"
    assert box.applied == [(A1, 0.4, None)]


async def test_outcome_is_reported_on_every_stream_until_acknowledged(
    make_agent: MakeAgent, box: FaultBox
) -> None:
    async with FakeHeadend(auto_outcome_ack=False) as headend:
        agent = make_agent(headend.address, config=flaky_config())
        await agent.start()
        first = await headend.wait_stream()
        await headend.setpoint("c1", 0.5, asset_id=A1)
        assert agent.stats().unreported_outcomes == 1
        first.close()

        second = await headend.wait_stream(index=1)
        [again] = await headend.wait_for(lambda: second.final_acks("c1"))
        assert again.status == "applied" and again.allocations[0].mw == 0.5
        second.outcome_ack("c1")
        await headend.wait_for(lambda: agent.stats().unreported_outcomes == 0)
        second.close()

        third = await headend.wait_stream(index=2)
        await headend.wait_for(lambda: len(third.batches) >= 2)
        assert third.setpoint_acks == [] and _writes(box, A1) == [0.5]


async def test_local_reports_and_events_outlive_a_restart_and_repeat_until_acknowledged(
    make_agent: MakeAgent, box: FaultBox, tmp_path: Path
) -> None:
    path = str(tmp_path / "agent.sqlite3")
    headend = FakeHeadend(auto_local_ack=False, auto_event_ack=False)
    await headend.start()
    await headend.stop()  # nobody listening yet
    agent = make_agent(headend.address, config=flaky_config(), buffer_path=path)
    outcome = await agent.dispatch(asset_id=A1, mw=0.25)
    event = await agent.outbox.add_event("custom", "seen offline")
    await agent.stop()

    restarted = make_agent(headend.address, config=flaky_config(), buffer_path=path)
    assert restarted.link.unacked_local_dispatches == 0  # not open yet
    await headend.start()
    try:
        await restarted.start()
        assert restarted.stats().unacked_local_dispatches == 1
        first = await headend.wait_stream()
        await headend.wait_for(lambda: first.local_dispatches and first.events)
        assert first.local_dispatches[0].command_id == outcome.command_id
        assert first.events[0].event_id == event.event_id
        first.event_ack(event.event_id)
        await headend.wait_for(lambda: restarted.outbox.events.count == 0)
        first.close()

        second = await headend.wait_stream(index=1)
        await headend.wait_for(lambda: second.local_dispatches)
        assert second.events == []  # acknowledged: not sent again
        second.send(codec.headend_local_dispatch_ack(outcome.command_id))
        await headend.wait_for(lambda: restarted.link.unacked_local_dispatches == 0)
        assert _writes(box, A1) == [0.25]
    finally:
        await restarted.stop()
        await headend.stop()


async def test_duration_revert_is_recorded_as_an_event(
    headend: FakeHeadend, make_agent: MakeAgent, box: FaultBox
) -> None:
    agent = make_agent(headend.address, config=flaky_config())
    await agent.start()
    stream = await headend.wait_stream()
    await headend.setpoint("d1", 0.6, asset_id=A1, duration_s=0.1)
    [event] = await headend.wait_for(lambda: stream.events)
    assert event.kind == "duration_reverted" and event.asset_id == A1
    data = msgspec.json.decode(event.data_json)
    assert data["duration_s"] == 0.1 and data["mw"] == 0.0 and data["status"] == "applied"
    assert _writes(box, A1) == [0.6, 0.0]
    assert agent.journal.in_force[A1] == "default"


async def test_link_loss_fallback_returns_headend_assets_to_default_once_per_outage(
    make_agent: MakeAgent, box: FaultBox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="der.agent")
    headend = FakeHeadend()
    await headend.start()
    agent = make_agent(headend.address, config=flaky_config(link_loss_hold_s=0.3))
    try:
        await agent.start()
        await headend.wait_stream()
        await headend.setpoint("from-headend", 0.8, asset_id=A1)
        await agent.dispatch(asset_id=A2, mw=-0.5)  # an edge service's command: left alone
        await headend.stop()

        await headend.wait_for(lambda: len(_writes(box, A1)) == 2, within=3)
        assert _writes(box, A1) == [0.8, 0.0] and _writes(box, A2) == [-0.5]
        await asyncio.sleep(0.5)  # once per outage
        assert _writes(box, A1) == [0.8, 0.0] and agent.link.stats.fallbacks == 1
        assert agent.journal.in_force == {A1: "fallback", A2: "local"}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("returned 1 asset(s)" in m and A1 in m for m in warnings)

        await headend.start()
        stream = await headend.wait_stream(index=1)

        def fallback_report() -> pb.LocalDispatch | None:
            return next((d for d in stream.local_dispatches if d.asset_id == A1), None)

        fallback = await headend.wait_for(fallback_report)
        await headend.wait_for(lambda: stream.events)
        assert fallback.asset_id == A1 and fallback.mw == 0.0 and fallback.status == "applied"
        assert "link-loss fallback" in fallback.reason
        [event] = stream.events
        assert event.kind == "link_loss_fallback"
        assert msgspec.json.decode(event.data_json)["assets"] == {A1: 0.0}
    finally:
        await agent.stop()
        await headend.stop()


async def test_hold_fallback_keeps_every_setpoint_and_only_logs(
    make_agent: MakeAgent, box: FaultBox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="der.agent")
    headend = FakeHeadend()
    await headend.start()
    config = flaky_config(link_loss_hold_s=0.2, link_loss_fallback="hold")
    agent = make_agent(headend.address, config=config)
    try:
        await agent.start()
        await headend.wait_stream()
        await headend.setpoint("c1", 0.8, asset_id=A1)
        await headend.stop()
        await headend.wait_for(lambda: agent.link.stats.fallbacks == 1, within=3)
        assert _writes(box, A1) == [0.8] and agent.outbox.events.count == 0
        assert any("'hold'" in r.getMessage() for r in caplog.records)
    finally:
        await agent.stop()


async def test_hundreds_of_waiting_reports_and_events_are_all_sent_once_in_pages(
    make_agent: MakeAgent,
) -> None:
    headend = FakeHeadend(auto_local_ack=False)
    await headend.start()
    await headend.stop()
    agent = make_agent(headend.address, config=flaky_config())
    for n in range(250):
        await agent.outbox.local_reports.add(
            codec.LocalDispatchReport(
                command_id=f"local-{n}", mw=0.1, ts=utc_now(), status="applied", asset_id=A1
            )
        )
        if n % 2:
            await agent.outbox.add_event("custom", f"event {n}")
    await headend.start()
    try:
        await agent.start()
        stream = await headend.wait_stream()
        await headend.wait_for(
            lambda: len(stream.local_dispatches) >= 250 and len(stream.events) >= 125
        )
        ids = [d.command_id for d in stream.local_dispatches]
        assert ids == [f"local-{n}" for n in range(250)]  # oldest first, each once
        await headend.wait_for(lambda: agent.outbox.events.count == 0)
        assert agent.stats().unacked_local_dispatches == 250
    finally:
        await agent.stop()
        await headend.stop()
