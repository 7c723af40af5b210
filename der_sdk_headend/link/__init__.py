"""The agent link: the gRPC ``AgentLink`` service agents dial out to."""

from der_sdk_headend.link.servicer import REGISTER_TIMEOUT_S, AgentLinkService, add_agent_link

__all__ = ["REGISTER_TIMEOUT_S", "AgentLinkService", "add_agent_link"]
