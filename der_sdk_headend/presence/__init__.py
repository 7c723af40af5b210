"""Presence: which live agent stream serves which asset, and the sessions that record it."""

from der_sdk_headend.presence.registry import AgentStream, Presence

__all__ = ["AgentStream", "Presence"]
