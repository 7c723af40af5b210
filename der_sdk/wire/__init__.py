"""The agent↔headend wire: generated protobuf code plus the one module that converts it
to and from the domain model (:mod:`der_sdk.wire.codec`)."""

from der_sdk.wire._generated import agent_link_pb2 as pb
from der_sdk.wire._generated import agent_link_pb2_grpc as pb_grpc

__all__ = ["AGENT_TOKEN_METADATA_KEY", "pb", "pb_grpc"]

AGENT_TOKEN_METADATA_KEY = "x-der-agent-token"
"""Call metadata of ``AgentLink.Stream`` carrying the agent's token (``AGENT_TOKEN``); the
headend compares its SHA-256 with the site's ``token_sha256`` entries."""
