"""Dispatch: validate, split and clamp, route to the serving stream or keep submitted,
and follow each command's lifecycle from the agent's acknowledgements."""

from der_sdk_headend.dispatch.dispatcher import (
    Dispatcher,
    DispatchError,
    IdempotencyConflictError,
    InvalidDispatchError,
    UnknownTargetError,
    derive_state,
)

__all__ = [
    "DispatchError",
    "Dispatcher",
    "IdempotencyConflictError",
    "InvalidDispatchError",
    "UnknownTargetError",
    "derive_state",
]
