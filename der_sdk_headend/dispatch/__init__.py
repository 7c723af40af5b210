"""Dispatch: validate, split and clamp, route to the serving stream or keep submitted,
and follow each command's lifecycle from the agent's acknowledgements.

``planning`` checks and shapes a request, ``lifecycle`` is the state machine (pure
functions), ``router`` and ``delivery`` decide how commands reach agents, and the
:class:`Dispatcher` wires them to storage.
"""

from der_sdk_headend.dispatch.dispatcher import Dispatcher
from der_sdk_headend.dispatch.lifecycle import derive_state
from der_sdk_headend.dispatch.planning import (
    CancelConflictError,
    DispatchError,
    IdempotencyConflictError,
    InvalidDispatchError,
    UnknownTargetError,
)
from der_sdk_headend.dispatch.router import AgentPeer, DispatchRouter, PresenceRouter

__all__ = [
    "AgentPeer",
    "CancelConflictError",
    "DispatchError",
    "DispatchRouter",
    "Dispatcher",
    "IdempotencyConflictError",
    "InvalidDispatchError",
    "PresenceRouter",
    "UnknownTargetError",
    "derive_state",
]
