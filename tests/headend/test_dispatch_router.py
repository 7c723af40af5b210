"""Routing sits behind :class:`DispatchRouter`: the dispatcher reaches agents through any
router (a multi-replica headend brings its own), and this process's router queues domain
commands on the stream's outbox. Dispatch, presence and ingest never see protobuf."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from der_sdk.inventory import parse_inventory
from der_sdk.models import DispatchRequest, SetpointAck, SetpointCommand, SetpointOutcomeAck
from der_sdk.plugins import load_plugins
from der_sdk.split import DEFAULT_SPLIT_POLICY
from der_sdk.storage.memory import MemoryStorage
from der_sdk_headend.dispatch import Dispatcher, DispatchRouter, PresenceRouter
from der_sdk_headend.dispatch.router import AgentPeer
from der_sdk_headend.presence import AgentStream, Presence
from tests.headend.headend_kit import BESS_1, BESS_2, BESS_3, INVENTORY_YAML, SITE_A

HEADEND = Path(__file__).resolve().parents[2] / "der_sdk_headend"


@dataclass(eq=False)
class Remote:
    """An agent held by another replica, as a bus-backed router would know it."""

    agent_id: str
    site_id: str
    assets: set[str]

    def serves(self, asset_id: str) -> bool:
        return asset_id in self.assets

    def describe(self) -> str:
        return f"agent {self.agent_id} on another replica"


@dataclass
class BusRouter:
    """A router with no streams at all: it records what it would publish."""

    peers: list[Remote] = field(default_factory=list)
    published: list[tuple[str, SetpointCommand | SetpointOutcomeAck]] = field(default_factory=list)

    def peer_for(self, asset_id: str) -> Remote | None:
        return next((p for p in self.peers if p.serves(asset_id)), None)

    def deliver(self, peer: AgentPeer, command: SetpointCommand) -> None:
        self.published.append((peer.agent_id, command))

    def confirm_outcome(self, peer: AgentPeer, command_id: str) -> None:
        self.published.append((peer.agent_id, SetpointOutcomeAck(command_id=command_id)))


def _dispatcher(router: DispatchRouter) -> Dispatcher:
    return Dispatcher(
        parse_inventory(INVENTORY_YAML),
        load_plugins(entry_points=False),
        MemoryStorage(),
        router,
        DEFAULT_SPLIT_POLICY,
    )


async def test_the_dispatcher_routes_delivers_and_settles_through_any_router() -> None:
    router = BusRouter()
    dispatcher = _dispatcher(router)
    waiting = await dispatcher.create(DispatchRequest(mw=0.5, asset_id=BESS_1))
    assert (waiting.state, router.published) == ("submitted", [])

    gateway = Remote("gw-1", SITE_A, {BESS_1, BESS_2, BESS_3})
    router.peers.append(gateway)
    assert await dispatcher.deliver_pending(gateway) == 1
    site = await dispatcher.create(DispatchRequest(mw=1.0, site_id=SITE_A))
    assert site.state == "sent"
    assert [(agent, type(m).__name__, m.command_id) for agent, m in router.published] == [
        ("gw-1", "SetpointCommand", waiting.dispatch_id),
        ("gw-1", "SetpointCommand", site.dispatch_id),
    ]

    await dispatcher.on_ack(
        gateway, SetpointAck(command_id=waiting.dispatch_id, status="applied", applied_mw=0.5)
    )
    assert router.published[-1] == ("gw-1", SetpointOutcomeAck(command_id=waiting.dispatch_id))


async def test_the_local_router_queues_domain_commands_on_the_serving_stream() -> None:
    presence = Presence(MemoryStorage(), load_plugins(entry_points=False))
    inventory = parse_inventory(INVENTORY_YAML)
    stream = AgentStream(agent_id="gw-1", site_id=SITE_A, peer="ipv4:127.0.0.1:1")
    await presence.attach(stream, [inventory.asset(BESS_1)])
    router = PresenceRouter(presence)
    assert router.peer_for(BESS_1) is stream and router.peer_for(BESS_2) is None

    command = SetpointCommand(command_id="c1", mw=0.5, asset_id=BESS_1)
    router.deliver(stream, command)
    router.confirm_outcome(stream, "c1")
    assert [await stream.outbox.get(), await stream.outbox.get()] == [
        command,
        SetpointOutcomeAck(command_id="c1"),
    ]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_dispatch_presence_and_ingest_import_no_protobuf() -> None:
    wire = ("der_sdk.wire", "google.protobuf", "grpc", "der_sdk_headend.link")
    for room in ("dispatch", "presence", "ingest"):
        for path in sorted((HEADEND / room).glob("*.py")):
            seen = sorted(n for n in _imports(path) if n.startswith(wire))
            assert not seen, f"{path.relative_to(HEADEND.parent)} imports {', '.join(seen)}"
