"""The message bus contract for multi-replica headends and its built-in ``memory://`` bus.

Backends come from the ``der_bus_backends`` hook and are chosen by URL scheme
(:func:`open_bus`); ``der-sdk-nats`` provides ``nats://``. See ``docs/bus.md``.
"""

from der_sdk.bus.contract import (
    BusError,
    BusOptions,
    BusState,
    BusUnavailableError,
    CommandFailedError,
    CommandHandler,
    CommandTimeoutError,
    FanoutSubscription,
    MessageBus,
    MessageTooLargeError,
    NoResponderError,
    PresenceChange,
    PresenceConflictError,
    PresenceEntry,
    PresenceTable,
    PresenceWatch,
    PublishAck,
    StreamBacklog,
    StreamConsumer,
    StreamFullError,
    StreamMessage,
    Subscription,
    TelemetryStream,
    open_bus,
)

__all__ = [
    "BusError",
    "BusOptions",
    "BusState",
    "BusUnavailableError",
    "CommandFailedError",
    "CommandHandler",
    "CommandTimeoutError",
    "FanoutSubscription",
    "MessageBus",
    "MessageTooLargeError",
    "NoResponderError",
    "PresenceChange",
    "PresenceConflictError",
    "PresenceEntry",
    "PresenceTable",
    "PresenceWatch",
    "PublishAck",
    "StreamBacklog",
    "StreamConsumer",
    "StreamFullError",
    "StreamMessage",
    "Subscription",
    "TelemetryStream",
    "open_bus",
]
