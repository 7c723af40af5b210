"""The dispatcher's records go to storage in order, several changes per transaction when
they come while one is being written: a new dispatch with its audit record, an outcome
that arrives while the dispatch's creation is being written. An outcome is confirmed to
the agent only once it is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest

from der_sdk.inventory import parse_inventory
from der_sdk.models import (
    Dispatch,
    DispatchEvent,
    DispatchRequest,
    DispatchTarget,
    Event,
    ScheduleStep,
    SetpointAck,
    SetpointCommand,
    TargetStep,
)
from der_sdk.plugins import load_plugins
from der_sdk.split import DEFAULT_SPLIT_POLICY
from der_sdk.storage.memory import MemoryStorage
from der_sdk_headend.dispatch import Dispatcher
from der_sdk_headend.dispatch.records import copy_dispatch
from der_sdk_headend.dispatch.router import AgentPeer
from tests.headend.headend_kit import BESS_1, INVENTORY_YAML, SITE_A


class GatedStorage(MemoryStorage):
    """Memory storage whose dispatch writes wait at a gate while it is shut, and which
    keeps what each write held."""

    def __init__(self, ordered: bool = False) -> None:
        super().__init__()
        self.ordered_writes = ordered
        self._in_order = asyncio.Lock()  # writes are stored in the order they were called
        self.gate = asyncio.Event()
        self.gate.set()
        self.writes: list[tuple[list[tuple[str, str]], list[str]]] = []
        self.fail: Exception | None = None

    async def record_dispatches(
        self, records: Sequence[tuple[Dispatch, DispatchEvent]], events: Sequence[Event] = ()
    ) -> None:
        self.writes.append(
            ([(d.dispatch_id, e.state) for d, e in records], [e.message for e in events])
        )
        async with self._in_order:
            await self.gate.wait()
            if self.fail is not None:
                raise self.fail
            await super().record_dispatches(records, events)


@dataclass(eq=False)
class Agent:
    agent_id: str = "gw-1"
    site_id: str = SITE_A
    commands: list[SetpointCommand] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)

    def serves(self, asset_id: str) -> bool:
        return True

    def describe(self) -> str:
        return f"agent {self.agent_id}"


@dataclass
class Router:
    agent: Agent

    def peer_for(self, asset_id: str) -> Agent:
        return self.agent

    def deliver(self, peer: AgentPeer, command: SetpointCommand) -> None:
        self.agent.commands.append(command)

    def confirm_outcome(self, peer: AgentPeer, command_id: str, step: int | None = None) -> None:
        self.agent.confirmed.append(command_id)


@pytest.fixture(params=[False, True], ids=["one-at-a-time", "ordered"])
def storage(request: pytest.FixtureRequest) -> GatedStorage:
    return GatedStorage(ordered=request.param)


def _dispatcher(storage: GatedStorage, agent: Agent) -> Dispatcher:
    return Dispatcher(
        parse_inventory(INVENTORY_YAML),
        load_plugins(entry_points=False),
        storage,
        Router(agent),
        DEFAULT_SPLIT_POLICY,
    )


def _audit(dispatch: Dispatch) -> Event:
    return Event(ts=dispatch.created_at, kind="audit", message=f"{dispatch.dispatch_id} created")


def _applied(command: SetpointCommand) -> SetpointAck:
    return SetpointAck(command_id=command.command_id, status="applied", applied_mw=command.mw)


async def _until(condition: object) -> None:
    for _ in range(100):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_a_new_dispatch_and_its_audit_record_are_one_write(storage: GatedStorage) -> None:
    agent = Agent()
    dispatcher = _dispatcher(storage, agent)

    dispatch, created = await dispatcher.submit(
        DispatchRequest(mw=0.5, asset_id=BESS_1), audit=_audit
    )

    assert created
    assert storage.writes == [
        ([(dispatch.dispatch_id, "sent")], [f"{dispatch.dispatch_id} created"])
    ]
    assert [e.message for e in await storage.events(kind="audit")] == [
        f"{dispatch.dispatch_id} created"
    ]


async def test_an_outcome_during_the_creation_write_is_confirmed_only_once_stored(
    storage: GatedStorage,
) -> None:
    agent = Agent()
    dispatcher = _dispatcher(storage, agent)
    storage.gate.clear()
    submit = asyncio.create_task(dispatcher.submit(DispatchRequest(mw=0.5, asset_id=BESS_1)))
    await _until(lambda: storage.writes)
    (command,) = agent.commands  # pushed before its record is stored

    ack = asyncio.create_task(dispatcher.on_ack(agent, _applied(command)))
    await _until(lambda: [d.state for d in dispatcher.open_dispatches()] == [])
    assert not submit.done() and not ack.done()
    assert agent.confirmed == []  # not stored yet
    assert len(storage.writes) == 1

    storage.gate.set()
    await submit
    await ack

    assert [w[0] for w in storage.writes] == [
        [(command.command_id, "sent")],
        [(command.command_id, "applied")],
    ]
    assert agent.confirmed == [command.command_id]
    stored = await storage.get_dispatch(command.command_id)
    assert stored is not None and stored.state == "applied"
    assert [e.state for e in await storage.dispatch_events(command.command_id)] == [
        "sent",
        "applied",
    ]


async def test_changes_queued_during_a_write_go_together_in_the_next_one() -> None:
    storage, agent = GatedStorage(), Agent()
    dispatcher = _dispatcher(storage, agent)
    storage.gate.clear()
    first = asyncio.create_task(dispatcher.submit(DispatchRequest(mw=0.5, asset_id=BESS_1)))
    await _until(lambda: storage.writes)
    (command,) = agent.commands
    acked = SetpointAck(command_id=command.command_id, status="acked")
    waiting = [
        asyncio.create_task(dispatcher.on_ack(agent, acked)),
        asyncio.create_task(dispatcher.submit(DispatchRequest(mw=0.7, asset_id=BESS_1))),
    ]
    await _until(lambda: len(agent.commands) == 2)

    storage.gate.set()
    await first
    await asyncio.gather(*waiting)

    assert [len(w[0]) for w in storage.writes] == [1, 2]
    assert dispatcher.records.transactions == 2
    assert dispatcher.records.records == 3


async def test_a_repeated_outcome_is_confirmed_only_after_the_first_is_stored(
    storage: GatedStorage,
) -> None:
    agent = Agent()
    dispatcher = _dispatcher(storage, agent)
    dispatch = await dispatcher.create(DispatchRequest(mw=0.5, asset_id=BESS_1))
    (command,) = agent.commands
    storage.gate.clear()
    first = asyncio.create_task(dispatcher.on_ack(agent, _applied(command)))
    await _until(lambda: len(storage.writes) == 2)

    again = asyncio.create_task(dispatcher.on_ack(agent, _applied(command)))
    await asyncio.sleep(0.01)
    assert agent.confirmed == [] and not again.done()

    storage.gate.set()
    await asyncio.gather(first, again)
    assert agent.confirmed == [dispatch.dispatch_id, dispatch.dispatch_id]
    assert len(storage.writes) == 2  # the repeat changed nothing, so wrote nothing


async def test_a_failed_write_fails_the_dispatch_request_and_confirms_nothing(
    storage: GatedStorage,
) -> None:
    agent = Agent()
    dispatcher = _dispatcher(storage, agent)
    storage.fail = OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await dispatcher.submit(DispatchRequest(mw=0.5, asset_id=BESS_1))
    (command,) = agent.commands
    with pytest.raises(OSError, match="disk full"):
        await dispatcher.on_ack(agent, _applied(command))
    assert agent.confirmed == []  # the agent keeps reporting it


async def test_with_ordered_storage_a_change_is_handed_over_while_the_one_before_is_written() -> (
    None
):
    storage, agent = GatedStorage(ordered=True), Agent()
    dispatcher = _dispatcher(storage, agent)
    storage.gate.clear()
    submit = asyncio.create_task(dispatcher.submit(DispatchRequest(mw=0.5, asset_id=BESS_1)))
    await _until(lambda: storage.writes)
    (command,) = agent.commands

    ack = asyncio.create_task(dispatcher.on_ack(agent, _applied(command)))
    await _until(lambda: len(storage.writes) == 2)  # not waiting for the first
    assert agent.confirmed == []

    storage.gate.set()
    await asyncio.gather(submit, ack)
    assert agent.confirmed == [command.command_id]
    stored = await storage.get_dispatch(command.command_id)
    assert stored is not None and stored.state == "applied"


def test_a_copied_dispatch_is_equal_and_shares_nothing_mutable() -> None:
    at = datetime(2026, 6, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    original = Dispatch(
        dispatch_id="d1",
        mw=0.1 + 0.2,
        state="scheduled",
        created_at=at,
        updated_at=at,
        site_id=SITE_A,
        start_at=at,
        steps=[ScheduleStep(offset_s=0.0, mw=1 / 3)],
        targets=[
            DispatchTarget(
                asset_id=BESS_1,
                mw=1 / 3,
                state="scheduled",
                steps=[TargetStep(offset_s=0.0, mw=1 / 3, at=at)],
            )
        ],
    )

    copied = copy_dispatch(original)
    assert copied == original
    assert copied.start_at is not None and copied.start_at.utcoffset() == timedelta(hours=2)

    copied.targets[0].state = "active"
    assert copied.targets[0].steps is not None
    copied.targets[0].steps[0].status = "applied"
    assert original.targets[0].state == "scheduled"
    assert original.targets[0].steps is not None
    assert original.targets[0].steps[0].status == "pending"
