"""Routing and delivery: which agent serves an asset now, and how a command reaches it.

The dispatcher plans commands and follows their lifecycle; it reaches agents only through
a :class:`DispatchRouter`, and knows an agent only as an :class:`AgentPeer`. This process's
implementation, :class:`PresenceRouter`, looks assets up in :class:`~der_sdk_headend.
presence.Presence` and queues commands on the stream's outbox. A headend of several
replicas replaces it with one that finds the replica holding the agent's stream and
carries commands there over the message bus.
"""

from __future__ import annotations

from typing import Protocol

from der_sdk.models import SetpointCommand, SetpointOutcomeAck
from der_sdk_headend.presence import AgentStream, Presence

__all__ = ["AgentPeer", "DispatchRouter", "PresenceRouter"]


class AgentPeer(Protocol):
    """What dispatch knows of an agent at the other end of a live stream."""

    @property
    def agent_id(self) -> str: ...

    @property
    def site_id(self) -> str: ...

    def serves(self, asset_id: str) -> bool:
        """Whether the agent serves ``asset_id`` on this stream now."""
        ...

    def describe(self) -> str:
        """The agent, its site and address, for log lines."""
        ...


class DispatchRouter(Protocol):
    """Finds the agent serving an asset and hands it commands. Never blocks: delivery
    queues the command, the stream's writer sends it."""

    def peer_for(self, asset_id: str) -> AgentPeer | None:
        """The live agent serving ``asset_id``, or ``None`` when it is offline. Two
        assets served by one stream give the same (equal, same hash) peer."""
        ...

    def deliver(self, peer: AgentPeer, command: SetpointCommand) -> None:
        """Queue ``command`` for ``peer``'s agent."""
        ...

    def confirm_outcome(self, peer: AgentPeer, command_id: str, step: int | None = None) -> None:
        """Tell ``peer``'s agent that the outcome of ``command_id`` (of its ``step``, for
        a schedule's step report) is recorded (``SetpointOutcomeAck``), so it stops
        reporting it."""
        ...


class PresenceRouter:
    """The router of one headend process: the streams registered in its ``presence``."""

    def __init__(self, presence: Presence) -> None:
        self._presence = presence

    def peer_for(self, asset_id: str) -> AgentStream | None:
        return self._presence.stream_for(asset_id)

    def deliver(self, peer: AgentPeer, command: SetpointCommand) -> None:
        _stream(peer).send(command)

    def confirm_outcome(self, peer: AgentPeer, command_id: str, step: int | None = None) -> None:
        _stream(peer).send(SetpointOutcomeAck(command_id=command_id, step=step))


def _stream(peer: AgentPeer) -> AgentStream:
    if not isinstance(peer, AgentStream):
        raise TypeError(f"{peer.describe()} is not a stream of this headend process")
    return peer
