"""The agent↔headend wire: generated protobuf code plus the one module that converts it
to and from the domain model (:mod:`der_sdk.wire.codec`)."""

from der_sdk.wire._generated import agent_link_pb2 as pb
from der_sdk.wire._generated import agent_link_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
