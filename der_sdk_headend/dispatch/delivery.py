"""The commands each agent gets for a dispatch, worked out before anything is sent.

A per-asset target goes out as ``Setpoint(command_id=dispatch_id, asset_id)``. A site
dispatch whose assets are all served by one agent goes out as one site ``Setpoint`` (the
agent splits it) unless the caller says the agent must not split it (``agent_splits``
false: the dispatch was split by another policy than the agent's); otherwise each live
target gets its own per-asset command ``"<dispatch_id>/<asset_id>"``. A target sent
before and not acknowledged goes out again with the same command id. Routing lookups go
through the :class:`DispatchRouter`.

A schedule always goes out as per-asset commands carrying that asset's steps (the site's
steps split here, as previewed), so a newer dispatch for one asset of a site cuts only
that asset's schedule. Once a cancel was asked for, a schedule's targets on the agent get
a cancel command (``"<command_id>/cancel"``) instead of the schedule again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from der_sdk.inventory import Inventory
from der_sdk.models import Dispatch, DispatchTarget, SetpointCommand
from der_sdk_headend.dispatch.lifecycle import expired_because, expires_in_ms, remaining_s
from der_sdk_headend.dispatch.router import AgentPeer, DispatchRouter

__all__ = [
    "SCHEDULE_HELD_STATES",
    "Command",
    "Delivery",
    "cancel_command",
    "cancel_command_id",
    "plan_delivery",
    "route_new",
    "schedule_command_id",
    "undelivered",
]


SCHEDULE_HELD_STATES: frozenset[str] = frozenset({"sent", "acked", "scheduled", "active"})
"""A schedule target's states while its agent may hold it: what a cancel is sent for."""


@dataclass(slots=True)
class Command:
    """One setpoint for an agent, and the targets it carries."""

    setpoint: SetpointCommand
    targets: list[DispatchTarget]


@dataclass(slots=True)
class Delivery:
    """What registering an agent does to one open dispatch."""

    resend: list[Command] = field(default_factory=list)
    resend_how: str = ""
    deliver: list[Command] = field(default_factory=list)
    deliver_how: str = ""
    expire: list[DispatchTarget] = field(default_factory=list)
    expired_why: str = ""


def undelivered(target: DispatchTarget, peer: AgentPeer) -> bool:
    """Whether registering ``peer`` would send ``target`` (first time or again)."""
    return target.state in ("submitted", "sent") and peer.serves(target.asset_id)


def route_new(
    dispatch: Dispatch,
    router: DispatchRouter,
    inventory: Inventory,
    now: datetime,
    *,
    agent_splits: bool = True,
) -> tuple[list[tuple[AgentPeer, Command]], str]:
    """The commands a new dispatch sends now, to whom, and a sentence saying so."""
    if dispatch.start_at is not None:
        return _route_schedule(dispatch, router)
    if dispatch.asset_id is not None:
        target = dispatch.targets[0]
        peer = router.peer_for(target.asset_id)
        if peer is None:
            return [], f"asset {target.asset_id} offline, kept submitted"
        command = _asset_command(dispatch, target, dispatch.dispatch_id, dispatch.duration_s, now)
        return [(peer, command)], f"sent to {peer.describe()}"

    assert dispatch.site_id is not None
    site_assets = [a.asset_id for a in inventory.assets_for_site(dispatch.site_id)]
    peers = {router.peer_for(a) for a in site_assets}
    if len(peers) == 1 and agent_splits:
        (peer,) = peers
        if peer is not None:
            command = _site_command(dispatch, dispatch.duration_s, now)
            return [(peer, command)], f"one site setpoint sent to {peer.describe()}"
    routed: list[tuple[AgentPeer, Command]] = []
    for target in dispatch.targets:
        peer = router.peer_for(target.asset_id)
        if peer is not None:
            command_id = f"{dispatch.dispatch_id}/{target.asset_id}"
            routed.append(
                (peer, _asset_command(dispatch, target, command_id, dispatch.duration_s, now))
            )
    waiting = len(dispatch.targets) - len(routed)
    return (
        routed,
        f"per-asset setpoints sent to {len(routed)} live asset(s), {waiting} kept submitted",
    )


def _route_schedule(
    dispatch: Dispatch, router: DispatchRouter
) -> tuple[list[tuple[AgentPeer, Command]], str]:
    routed: list[tuple[AgentPeer, Command]] = []
    for target in dispatch.targets:
        peer = router.peer_for(target.asset_id)
        if peer is not None:
            routed.append((peer, _schedule_command(dispatch, target)))
    waiting = len(dispatch.targets) - len(routed)
    return (
        routed,
        f"schedule sent ahead of its start to {len(routed)} live asset(s), "
        f"{waiting} kept submitted",
    )


def schedule_command_id(dispatch: Dispatch, target: DispatchTarget) -> str:
    """The command id of a schedule's target: the dispatch id for an asset dispatch,
    ``"<dispatch_id>/<asset_id>"`` for a site's."""
    if dispatch.asset_id is not None:
        return dispatch.dispatch_id
    return f"{dispatch.dispatch_id}/{target.asset_id}"


def _schedule_command(dispatch: Dispatch, target: DispatchTarget) -> Command:
    setpoint = SetpointCommand(
        command_id=target.command_id or schedule_command_id(dispatch, target),
        mw=target.mw,
        asset_id=target.asset_id,
        duration_s=dispatch.duration_s,
        start_at=dispatch.start_at,
        steps=tuple((s.offset_s, s.mw) for s in target.steps or ()),
    )
    return Command(setpoint, [target])


def cancel_command(dispatch: Dispatch, target: DispatchTarget) -> Command:
    """The command that cancels ``target``'s schedule on its agent."""
    command_id = target.command_id or schedule_command_id(dispatch, target)
    setpoint = SetpointCommand(
        command_id=cancel_command_id(dispatch, target),
        mw=0.0,
        asset_id=target.asset_id,
        cancels=command_id,
    )
    return Command(setpoint, [])


def cancel_command_id(dispatch: Dispatch, target: DispatchTarget) -> str:
    """The id of :func:`cancel_command` for ``target``: its schedule's command id and
    ``/cancel``."""
    return f"{target.command_id or schedule_command_id(dispatch, target)}/cancel"


def plan_delivery(
    peer: AgentPeer,
    dispatch: Dispatch,
    inventory: Inventory,
    now: datetime,
    built_at: datetime,
    *,
    agent_splits: bool = True,
) -> Delivery:
    """The commands a registering ``peer`` gets for ``dispatch``: its unacknowledged
    targets again, its submitted ones for the first time (or expired, when ``now`` is past
    the expiry or the duration). ``built_at`` sets the commands' ``expires_in_ms``.

    :raises Exception: whatever building a command raises (dates that overflow); the
        caller settles the dispatch's targets for ``peer`` as ``failed``.
    """
    if dispatch.start_at is not None:
        return _plan_schedule_delivery(peer, dispatch, now)
    delivery = Delivery()
    again = [t for t in dispatch.targets if t.state == "sent" and peer.serves(t.asset_id)]
    if again:
        delivery.resend_how, delivery.resend = _resend(
            dispatch, again, remaining_s(dispatch, now), built_at
        )
    waiting = [t for t in dispatch.targets if t.state == "submitted" and peer.serves(t.asset_id)]
    if not waiting:
        return delivery
    why = expired_because(dispatch, now)
    if why is not None:
        delivery.expire, delivery.expired_why = waiting, why
        return delivery
    duration_s = remaining_s(dispatch, now)
    if dispatch.asset_id is None and dispatch.site_id is not None:
        site_assets = inventory.assets_for_site(dispatch.site_id)
        whole_site = (
            agent_splits
            and all(peer.serves(a.asset_id) for a in site_assets)
            and all(t.state == "submitted" for t in dispatch.targets)
        )
        if whole_site:
            delivery.deliver_how = "submitted site setpoint delivered"
            delivery.deliver = [_site_command(dispatch, duration_s, built_at)]
            return delivery
        delivery.deliver_how = f"submitted setpoints for {len(waiting)} asset(s) delivered"
        delivery.deliver = [
            _asset_command(
                dispatch, t, f"{dispatch.dispatch_id}/{t.asset_id}", duration_s, built_at
            )
            for t in waiting
        ]
        return delivery
    delivery.deliver_how = "submitted setpoint delivered"
    delivery.deliver = [
        _asset_command(dispatch, t, dispatch.dispatch_id, duration_s, built_at) for t in waiting
    ]
    return delivery


def _plan_schedule_delivery(peer: AgentPeer, dispatch: Dispatch, now: datetime) -> Delivery:
    """A schedule's commands for ``peer``: cancel commands once a cancel was asked for
    (for every target the agent may hold), else its sent targets again and its submitted
    ones for the first time (expired when the schedule's end passed)."""
    delivery = Delivery()
    mine = [t for t in dispatch.targets if peer.serves(t.asset_id)]
    if dispatch.cancel_requested_at is not None:
        held = [t for t in mine if t.state in SCHEDULE_HELD_STATES]
        if held:
            delivery.resend_how = f"cancel sent for {len(held)} schedule target(s)"
            delivery.resend = [cancel_command(dispatch, t) for t in held]
        return delivery
    again = [t for t in mine if t.state == "sent"]
    if again:
        delivery.resend_how = f"{len(again)} unacknowledged schedule command(s) sent again"
        delivery.resend = [_schedule_command(dispatch, t) for t in again]
    waiting = [t for t in mine if t.state == "submitted"]
    if not waiting:
        return delivery
    why = expired_because(dispatch, now)
    if why is not None:
        delivery.expire, delivery.expired_why = waiting, why
        return delivery
    delivery.deliver_how = f"schedule delivered for {len(waiting)} asset(s)"
    delivery.deliver = [_schedule_command(dispatch, t) for t in waiting]
    return delivery


def _resend(
    dispatch: Dispatch,
    targets: Sequence[DispatchTarget],
    duration_s: float | None,
    built_at: datetime,
) -> tuple[str, list[Command]]:
    """Unacknowledged commands, to send again unchanged (same command ids)."""
    groups: dict[str, list[DispatchTarget]] = {}
    for target in targets:
        groups.setdefault(target.command_id or dispatch.dispatch_id, []).append(target)
    commands: list[Command] = []
    for command_id, group in groups.items():
        if command_id == dispatch.dispatch_id and dispatch.asset_id is None:
            commands.append(_site_command(dispatch, duration_s, built_at))
        else:
            commands += [
                _asset_command(dispatch, t, command_id, duration_s, built_at) for t in group
            ]
    return f"{len(groups)} unacknowledged command(s) sent again", commands


def _asset_command(
    dispatch: Dispatch,
    target: DispatchTarget,
    command_id: str,
    duration_s: float | None,
    built_at: datetime,
) -> Command:
    setpoint = SetpointCommand(
        command_id=command_id,
        mw=target.mw,
        asset_id=target.asset_id,
        duration_s=duration_s,
        expires_in_ms=expires_in_ms(dispatch, built_at),
        expires_at=dispatch.expires_at,
    )
    return Command(setpoint, [target])


def _site_command(dispatch: Dispatch, duration_s: float | None, built_at: datetime) -> Command:
    setpoint = SetpointCommand(
        command_id=dispatch.dispatch_id,
        mw=dispatch.mw,
        site_id=dispatch.site_id,
        duration_s=duration_s,
        expires_in_ms=expires_in_ms(dispatch, built_at),
        expires_at=dispatch.expires_at,
    )
    return Command(setpoint, list(dispatch.targets))
