"""Dispatch anywhere (issue 17, item 1, and the dispatch side of items 5 and 6): replicas
as in-process headends on one PostgreSQL database and one NATS namespace, real agents.

PostgreSQL is the record; the replica holding an agent's stream pushes its commands; a
nudge over the bus asks it to, and reconciliation from PostgreSQL catches what a nudge
missed (der_sdk_headend/cluster/dispatch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest

from der_sdk.errors import DerSdkError
from der_sdk.models import Allocation, Dispatch, SetpointAck
from der_sdk.plugins import Plugins
from der_sdk.testing.devices import SimulatedDevicePlugin
from der_sdk.testing.waits import wait_until
from der_sdk.wire import codec
from der_sdk_headend.presence.registry import AgentStream
from tests.cluster.dispatch_kit import ClusterRig, OwnNats, Replica, cluster_rig
from tests.headend.headend_kit import BESS_1, BESS_2, BESS_3, SITE_A, RawAgent, make_config

pytestmark = pytest.mark.services


@pytest.fixture
async def rig(
    tmp_path: Path, der_plugins: Plugins, der_test_device: SimulatedDevicePlugin
) -> AsyncIterator[ClusterRig]:
    async with cluster_rig(tmp_path, der_plugins) as rig:
        yield rig


async def _same_everywhere(replicas: list[Replica], dispatch_id: str) -> Dispatch:
    """``GET /dispatch/{id}`` answers the same record and events on every replica."""
    seen = [await r.detail(dispatch_id) for r in replicas]
    first = seen[0]
    for replica, detail in zip(replicas[1:], seen[1:], strict=True):
        assert detail == first, f"{replica.name} shows another lifecycle than {replicas[0].name}"
    return first[0]


async def test_a_dispatch_posted_on_one_replica_is_applied_by_the_agent_on_another(
    rig: ClusterRig, der_test_device: SimulatedDevicePlugin
) -> None:
    # Reconciliation every minute: only the nudge can deliver within the test's wait.
    a = await rig.replica("replica-a", reconcile_s=60)
    b = await rig.replica("replica-b", reconcile_s=60)
    await rig.agent(SITE_A, [BESS_1], on=[b])

    created = await a.dispatch(asset_id=BESS_1, mw=0.5)
    assert created.state == "submitted", "A holds no stream for it"
    await a.wait_state(created.dispatch_id, "applied", timeout_s=5)

    record = await _same_everywhere([a, b], created.dispatch_id)
    assert record.targets[0].applied_mw == 0.5
    _, events = await b.detail(created.dispatch_id)
    assert [e.state for e in events] == ["submitted", "sent", "acked", "applied"]
    assert "replica replica-b" in events[0].detail, events[0].detail
    assert "at the request of another replica, to agent gw-1" in events[1].detail, events[1].detail
    assert a.dispatcher.nudges_sent == 1
    assert der_test_device.device(BESS_1).writes == [0.5]


async def test_a_dispatch_to_an_offline_asset_is_delivered_once_when_its_agent_joins_replica_c(
    rig: ClusterRig, der_test_device: SimulatedDevicePlugin
) -> None:
    a = await rig.replica("replica-a", reconcile_s=0.2)
    b = await rig.replica("replica-b", reconcile_s=0.2)
    c = await rig.replica("replica-c", reconcile_s=0.2)
    created = await a.dispatch(asset_id=BESS_2, mw=-0.75)
    assert created.state == "submitted"

    await rig.agent(SITE_A, [BESS_2], on=[c])
    await c.wait_state(created.dispatch_id, "applied", timeout_s=5)
    await asyncio.sleep(1.0)  # five reconciliation passes on each replica: none sends it again

    record = await _same_everywhere([a, b, c], created.dispatch_id)
    assert record.state == "applied"
    assert der_test_device.device(BESS_2).writes == [-0.75], "the device was written once"
    _, events = await a.detail(created.dispatch_id)
    assert [e.state for e in events] == ["submitted", "sent", "acked", "applied"]
    # Whichever comes first delivers it, once: the agent's register on C, or a
    # reconciliation pass (every 0.2 s here) that finds the agent already listed, on C
    # or on another replica, which then asks C.
    ways = (
        "on register of agent gw-1",
        "by reconciliation, to agent gw-1",
        "at the request of another replica, to agent gw-1",
    )
    assert any(way in events[1].detail for way in ways), events[1].detail


async def test_a_lost_nudge_is_delivered_by_reconciliation_within_seconds(
    rig: ClusterRig, der_test_device: SimulatedDevicePlugin
) -> None:
    a = await rig.replica("replica-a", reconcile_s=1.0)
    b = await rig.replica("replica-b", reconcile_s=1.0)
    await rig.agent(SITE_A, [BESS_3], on=[b])
    a.dispatcher.locate = lambda _asset: "replica-gone"  # a replica nobody serves

    loop = asyncio.get_running_loop()
    started = loop.time()
    created = await a.dispatch(asset_id=BESS_3, mw=0.25)
    await b.wait_state(created.dispatch_id, "applied", timeout_s=5)
    took = loop.time() - started

    assert a.dispatcher.nudges_failed == 1 and a.dispatcher.nudges_sent == 0
    assert b.dispatcher.reconciled >= 1
    assert took < 3.0, f"applied {took:.1f} s after the POST"
    _, events = await a.detail(created.dispatch_id)
    assert "by reconciliation, to agent gw-1" in events[1].detail, events[1].detail
    assert der_test_device.device(BESS_3).writes == [0.25]


async def test_a_site_dispatch_split_over_agents_on_two_replicas_is_applied_on_both(
    rig: ClusterRig, der_test_device: SimulatedDevicePlugin
) -> None:
    a = await rig.replica("replica-a", reconcile_s=60)
    b = await rig.replica("replica-b", reconcile_s=60)
    await rig.agent(SITE_A, [BESS_1], on=[a], agent_id="gw-a")
    await rig.agent(SITE_A, [BESS_2, BESS_3], on=[b], agent_id="gw-b")

    created = await b.dispatch(site_id=SITE_A, mw=1.4)
    await a.wait_state(created.dispatch_id, "applied", timeout_s=5)

    record = await _same_everywhere([a, b], created.dispatch_id)
    assert {t.asset_id: t.state for t in record.targets} == dict.fromkeys(
        (BESS_1, BESS_2, BESS_3), "applied"
    )
    for target in record.targets:
        assert der_test_device.device(target.asset_id).writes == [target.mw]


def _slow_reads(replica: Replica, delay_s: float) -> None:
    """Every dispatch read on ``replica`` takes ``delay_s`` more, after it read: two
    read-modify-writes at once would both read the old record."""
    storage = replica.headend.storage
    read = storage.get_dispatch

    async def slow(dispatch_id: str) -> Dispatch | None:
        record = await read(dispatch_id)
        await asyncio.sleep(delay_s)
        return record

    storage.get_dispatch = slow  # type: ignore[method-assign]


async def _concurrent_site_acks(rig: ClusterRig, *, locked: bool) -> Dispatch:
    """A site dispatch created on A with no agent online; A and B then record the
    outcome of one target each at the same moment."""
    a = await rig.replica("replica-a", reconcile_s=60)
    b = await rig.replica("replica-b", reconcile_s=60)
    created = await a.dispatch(site_id=SITE_A, mw=1.4)
    shares = {t.asset_id: t.mw for t in created.targets}
    for replica in (a, b):
        _slow_reads(replica, 0.3)
        if not locked:
            storage = replica.headend.storage
            storage.dispatch_lock = lambda _id: contextlib.nullcontext()  # type: ignore[method-assign, assignment, return-value]

    async def ack(replica: Replica, asset_id: str) -> None:
        stream = AgentStream(agent_id=f"gw-{replica.name}", site_id=SITE_A, peer="test")
        command_id = f"{created.dispatch_id}/{asset_id}"
        ack = SetpointAck(command_id=command_id, status="applied", applied_mw=shares[asset_id])
        await replica.dispatcher.on_ack(stream, ack)

    await asyncio.gather(ack(a, BESS_1), ack(b, BESS_2))
    record = await a.headend.storage.get_dispatch(created.dispatch_id)
    assert record is not None
    return record


async def test_two_replicas_acknowledging_targets_of_one_site_dispatch_at_once_keep_both(
    rig: ClusterRig,
) -> None:
    record = await _concurrent_site_acks(rig, locked=True)
    states = {t.asset_id: t.state for t in record.targets}
    assert states == {BESS_1: "applied", BESS_2: "applied", BESS_3: "submitted"}


async def test_without_the_dispatch_lock_one_of_two_concurrent_acknowledgements_is_lost(
    rig: ClusterRig,
) -> None:
    """The control of the test above: the same race without the lock loses a change,
    so that test proves the lock, not luck."""
    record = await _concurrent_site_acks(rig, locked=False)
    applied = [t.asset_id for t in record.targets if t.state == "applied"]
    assert len(applied) == 1, record.targets


async def test_a_dispatch_in_flight_on_a_replica_that_stopped_ends_applied_with_one_device_write(
    rig: ClusterRig, der_test_device: SimulatedDevicePlugin
) -> None:
    """The agent's stream was on A when the dispatch went out, and A is gone before the
    outcome was reported: the agent moves to B and reports the outcome from its journal
    there; the record ends ``applied`` with one device write."""
    a = await rig.replica("replica-a", reconcile_s=0.3)
    b = await rig.replica("replica-b", reconcile_s=0.3)
    device = der_test_device.device(BESS_1)
    write = device.write_setpoint
    release = asyncio.Event()

    async def held_write(mw: float) -> None:
        await release.wait()  # the write completes only once A is gone
        await write(mw)

    device.write_setpoint = held_write  # type: ignore[method-assign]
    await rig.agent(SITE_A, [BESS_1], on=[a, b], options={"timeout_s": 30})
    assert await _on(a, BESS_1)
    created = await a.dispatch(asset_id=BESS_1, mw=1.5)
    await a.wait_state(created.dispatch_id, "acked", timeout_s=5)

    await a.headend.stop()
    rig.replicas.remove(a)
    await wait_until(lambda: _on(b, BESS_1), "the agent registered with replica-b", timeout_s=10)
    release.set()
    await b.wait_state(created.dispatch_id, "applied", timeout_s=10)
    await asyncio.sleep(0.7)  # two reconciliation passes: nothing is written again
    assert device.writes == [1.5], "the device was written once"
    record, _ = await b.detail(created.dispatch_id)
    assert record.targets[0].command_id == created.dispatch_id


async def test_a_target_sent_on_a_stream_that_ended_is_sent_again_with_its_command_id_elsewhere(
    rig: ClusterRig,
) -> None:
    """A pushed the command and the stream ended before the agent acknowledged it: the
    target stays ``sent``; the agent registers with B, which sends the same command id
    again (the agent's journal applies it at most once)."""
    a = await rig.replica("replica-a", reconcile_s=0.3)
    b = await rig.replica("replica-b", reconcile_s=0.3)
    async with _raw_agent(a) as on_a:
        await on_a.register([BESS_1])
        created = await a.dispatch(asset_id=BESS_1, mw=0.5)
        first = await on_a.recv_kind("setpoint")
        assert created.state == "sent"
    await wait_until(lambda: _off(a, BESS_1), "the stream on replica-a ended", timeout_s=5)
    await asyncio.sleep(0.7)  # reconciliation passes with no stream anywhere: still sent
    assert (await b.detail(created.dispatch_id))[0].state == "sent"

    async with _raw_agent(b) as on_b:
        await on_b.register([BESS_1])
        again = await on_b.recv_kind("setpoint")
        assert again.command_id == first.command_id == created.dispatch_id
        applied = [Allocation(asset_id=BESS_1, mw=0.5, status="applied")]
        await on_b.send(codec.agent_setpoint_ack(again.command_id, "applied", applied))
        await b.wait_state(created.dispatch_id, "applied", timeout_s=5)
        assert (await on_b.recv_kind("outcome_ack")).command_id == created.dispatch_id
        await asyncio.sleep(0.7)  # reconciliation passes: the stream gets nothing more
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(on_b.recv(), 0.3)


@contextlib.asynccontextmanager
async def _raw_agent(replica: Replica) -> AsyncIterator[RawAgent]:
    channel = grpc.aio.insecure_channel(replica.headend.grpc_addr)
    try:
        yield RawAgent(channel)
    finally:
        await channel.close()


async def _off(replica: Replica, asset_id: str) -> bool:
    return replica.headend.presence.stream_for(asset_id) is None


async def _on(replica: Replica, asset_id: str) -> bool:
    return replica.headend.presence.stream_for(asset_id) is not None


async def test_during_a_bus_outage_a_dispatch_for_another_replica_is_delivered_from_the_database(
    tmp_path: Path, der_plugins: Plugins, der_test_device: SimulatedDevicePlugin
) -> None:
    """NATS down: the nudge fails visibly (logged, counted) and the holder's
    reconciliation delivers from PostgreSQL; NATS back: nudges deliver again."""
    nats = OwnNats(tmp_path / "nats")
    await nats.start()
    try:
        async with cluster_rig(tmp_path, der_plugins, bus_url=nats.url) as rig:
            a = await rig.replica("replica-a", reconcile_s=1.0)
            b = await rig.replica("replica-b", reconcile_s=1.0)
            await rig.agent(SITE_A, [BESS_1], on=[b])
            await nats.kill()
            await wait_until(lambda: _bus_down(a), "replica-a sees the bus down", timeout_s=10)

            during = await a.dispatch(asset_id=BESS_1, mw=0.5)
            await b.wait_state(during.dispatch_id, "applied", timeout_s=5)
            await wait_until(
                lambda: _true(a.dispatcher.nudges_failed == 1), "the nudge failed", timeout_s=5
            )

            await nats.start()
            await wait_until(lambda: _bus_up(a, b), "both replicas reconnected", timeout_s=15)
            b.dispatcher.reconcile_s = 60.0  # from now on only a nudge delivers in time
            await asyncio.sleep(1.1)  # b's pass due before the change runs once more
            after = await a.dispatch(asset_id=BESS_1, mw=-0.5)
            await b.wait_state(after.dispatch_id, "applied", timeout_s=5)
            assert a.dispatcher.nudges_sent == 1
    finally:
        await nats.kill()
    assert der_test_device.device(BESS_1).writes == [0.5, -0.5]


async def _bus_down(replica: Replica) -> bool:
    cluster = replica.headend.cluster
    return cluster is not None and not cluster.connected


async def _bus_up(*replicas: Replica) -> bool:
    return all(r.headend.cluster is not None and r.headend.cluster.connected for r in replicas)


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("value", ["0", "-1", "3601", "nan"])
def test_a_reconcile_interval_out_of_range_is_refused_naming_the_variable(
    tmp_path: Path, value: str
) -> None:
    with pytest.raises(DerSdkError, match="HEADEND_BUS_DISPATCH_RECONCILE_S"):
        make_config(tmp_path / "assets.yaml", HEADEND_BUS_DISPATCH_RECONCILE_S=value)
    config = make_config(tmp_path / "assets.yaml", HEADEND_BUS_DISPATCH_RECONCILE_S="0.5")
    assert config.bus_dispatch_reconcile_s == 0.5


# ----------------------------------------------------------------------- schedule cancel


def _schedule_body(asset_id: str) -> dict[str, Any]:
    """A schedule starting in 10 minutes: held by the agent, no step run yet."""
    start = datetime.now(UTC) + timedelta(minutes=10)
    return {
        "asset_id": asset_id,
        "start_at": start.isoformat(),
        "steps": [{"offset_s": 0, "mw": 0.5}, {"offset_s": 900, "mw": -0.5}],
        "duration_s": 1800,
    }


async def _target_state(replica: Replica, dispatch_id: str, state: str) -> Dispatch:
    async def probe() -> Dispatch | None:
        record, _ = await replica.detail(dispatch_id)
        return record if record.targets[0].state == state else None

    return await wait_until(
        probe, f"the target of {dispatch_id} {state} on {replica.name}", timeout_s=10
    )


async def _cancel(replica: Replica, dispatch_id: str) -> Dispatch:
    response = await replica.http.post(f"/dispatch/{dispatch_id}/cancel")
    assert response.status_code == 202, response.text
    return msgspec.json.decode(response.content, type=Dispatch)


async def test_a_schedule_cancelled_on_one_replica_is_cancelled_by_its_agent_on_another(
    rig: ClusterRig, der_test_device: SimulatedDevicePlugin
) -> None:
    # Reconciliation every minute: only the nudge can deliver the cancel in time.
    a = await rig.replica("replica-a", reconcile_s=60)
    b = await rig.replica("replica-b", reconcile_s=60)
    await rig.agent(SITE_A, [BESS_1], on=[b])
    created = await a.dispatch(**_schedule_body(BESS_1))
    await _target_state(a, created.dispatch_id, "scheduled")  # the agent holds it

    asked = await _cancel(a, created.dispatch_id)
    assert asked.state == "scheduled", "open until the agent reports the cancel"
    await b.wait_state(created.dispatch_id, "cancelled", timeout_s=10)

    record = await _same_everywhere([a, b], created.dispatch_id)
    assert [s.status for s in record.targets[0].steps or ()] == ["cancelled", "cancelled"]
    _, events = await a.detail(created.dispatch_id)
    details = [e.detail or "" for e in events]
    sent = "cancel sent for 1 schedule target(s) at the request of another replica, to agent"
    assert any(sent in d and "on replica replica-b" in d for d in details), details
    assert any("cancel applied" in d for d in details), details
    assert der_test_device.device(BESS_1).writes == [], "no step had run: nothing to revert"


async def test_a_schedule_cancel_lost_on_the_bus_reaches_its_agent_by_reconciliation(
    rig: ClusterRig,
) -> None:
    a = await rig.replica("replica-a", reconcile_s=0.5)
    b = await rig.replica("replica-b", reconcile_s=0.5)
    await rig.agent(SITE_A, [BESS_2], on=[b])
    created = await a.dispatch(**_schedule_body(BESS_2))
    await _target_state(a, created.dispatch_id, "scheduled")
    a.dispatcher.locate = lambda _asset: "replica-gone"  # the cancel's nudge goes nowhere

    await _cancel(a, created.dispatch_id)
    await b.wait_state(created.dispatch_id, "cancelled", timeout_s=10)
    _, events = await b.detail(created.dispatch_id)
    assert any("by reconciliation" in (e.detail or "") for e in events), events


async def test_a_schedule_cancelled_while_its_agent_was_offline_is_sent_when_it_registers(
    rig: ClusterRig,
) -> None:
    a = await rig.replica("replica-a", reconcile_s=0.3)
    b = await rig.replica("replica-b", reconcile_s=0.3)
    c = await rig.replica("replica-c", reconcile_s=0.3)
    async with _raw_agent(b) as on_b:
        await on_b.register([BESS_3])
        created = await a.dispatch(**_schedule_body(BESS_3))
        schedule = await on_b.recv_kind("setpoint")
        await on_b.send(codec.agent_setpoint_ack(schedule.command_id, "scheduled", ()))
        await _target_state(a, created.dispatch_id, "scheduled")
    await wait_until(lambda: _off(b, BESS_3), "the stream on replica-b ended", timeout_s=5)

    asked = await _cancel(a, created.dispatch_id)
    assert asked.state == "scheduled"
    await asyncio.sleep(0.7)  # reconciliation passes with no stream anywhere: still held

    async with _raw_agent(c) as on_c:
        await on_c.register([BESS_3])
        cancel = await on_c.recv_kind("setpoint")
        assert (cancel.command_id, cancel.cancels) == (
            f"{schedule.command_id}/cancel",
            schedule.command_id,
        )
        await on_c.send(codec.agent_setpoint_ack(schedule.command_id, "cancelled", ()))
        await on_c.recv_kind("outcome_ack")
        reverted = [Allocation(asset_id=BESS_3, mw=0.0, status="applied")]
        await on_c.send(codec.agent_setpoint_ack(cancel.command_id, "applied", reverted))
        assert (await on_c.recv_kind("outcome_ack")).command_id == cancel.command_id
        await c.wait_state(created.dispatch_id, "cancelled", timeout_s=5)
        await asyncio.sleep(0.7)  # reconciliation passes: the cancel is not sent again
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(on_c.recv(), 0.3)
