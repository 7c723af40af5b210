"""The ``LocalDispatch`` report behind the OPC UA server's writes, without a network: what
the agent's dispatch path reports for a local command, and its wire round trip.

The headend side (recorded with source ``local``, acknowledged, once per command id) is
proven end to end in ``test_opcua_e2e.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from der_sdk import load_plugins
from der_sdk.agent_config import AgentConfig
from der_sdk.models import Asset
from der_sdk.wire import codec, pb
from der_sdk_agent.agent import Agent

SITE = "11111111-1111-4111-8111-111111111111"
A1 = "aaaaaaaa-0000-4000-8000-000000000001"
A2 = "aaaaaaaa-0000-4000-8000-000000000002"
ASSETS = [
    Asset(asset_id=A1, site_id=SITE, name="A1", capacity_mwh=2, max_mw=0.5, min_mw=-0.5),
    Asset(asset_id=A2, site_id=SITE, name="A2", capacity_mwh=6, max_mw=3, min_mw=-3),
]


def test_a_local_dispatch_round_trips_on_the_wire() -> None:
    report = codec.LocalDispatchReport(
        command_id="local-1",
        mw=4.0,
        ts=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        status="applied",
        site_id=SITE,
        duration_s=60.0,
        reason="0.5 MW unallocated",
        allocations=(
            codec.Allocation(asset_id=A1, mw=0.5),
            codec.Allocation(asset_id=A2, mw=3.0, reason="clamped"),
        ),
        unallocated_mw=0.5,
        policy="capacity_weighted",
    )
    wire = codec.agent_local_dispatch(report).SerializeToString()
    message = pb.AgentMessage.FromString(wire)
    assert message.WhichOneof("msg") == "local_dispatch"
    assert codec.local_dispatch_from_pb(message.local_dispatch) == report
    ack = codec.headend_local_dispatch_ack("local-1")
    assert ack.WhichOneof("msg") == "local_dispatch_ack"
    assert ack.local_dispatch_ack.command_id == "local-1"


def test_optional_fields_stay_unset_on_the_wire() -> None:
    report = codec.LocalDispatchReport(
        command_id="local-2", mw=0.1, ts=datetime.now(UTC), status="applied", asset_id=A1
    )
    msg = codec.agent_local_dispatch(report).local_dispatch
    assert not msg.HasField("site_id") and not msg.HasField("duration_s")
    assert not msg.HasField("policy") and not msg.HasField("reason")
    assert codec.local_dispatch_from_pb(msg) == report


async def test_local_commands_are_reported_and_headend_commands_are_not() -> None:
    agent = Agent(
        agent_id="gw-local",
        site_id=SITE,
        assets=ASSETS,
        headend="127.0.0.1:1",  # never started: no link
        config=AgentConfig(),
        plugins=load_plugins(),
    )
    reports: list[codec.LocalDispatchReport] = []
    agent.dispatcher.add_local_listener(reports.append)
    for runtime in agent.adapters.values():
        assert await runtime.connect()
    try:
        await agent.dispatcher.handle("from-headend", asset_id=A1, site_id=None, mw=0.2)
        assert reports == []

        outcome = await agent.dispatch(site_id=SITE, mw=5.0, duration_s=30.0)
        (report,) = reports
        assert report.command_id == outcome.command_id and report.command_id.startswith("local-")
        assert report.site_id == SITE and report.asset_id is None
        assert report.mw == 5.0 and report.duration_s == 30.0 and report.status == "applied"
        assert report.policy == "capacity_weighted"
        assert {a.asset_id: a.mw for a in report.allocations} == {
            A1: pytest.approx(0.5),
            A2: pytest.approx(3.0),
        }
        assert report.unallocated_mw == pytest.approx(1.5)
        assert agent.link.unacked_local_dispatches == 1  # queued for the headend

        await agent.dispatch(asset_id=A1, site_id=SITE, mw=9.0)  # asset_id wins
        assert reports[-1].asset_id == A1 and reports[-1].site_id is None
        assert reports[-1].policy is None
        assert reports[-1].allocations[0].mw == pytest.approx(0.5)  # clamped

        await agent.dispatch(asset_id=A1, mw=float("nan"))  # not a command: not reported
        assert len(reports) == 2
    finally:
        await agent.dispatcher.close()
        for runtime in agent.adapters.values():
            await runtime.close()
