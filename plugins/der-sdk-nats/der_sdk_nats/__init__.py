"""der-sdk-nats: the message bus of multi-replica headends on NATS JetStream (``nats://``).

Registered through the ``der_sdk`` entry point group; :func:`der_sdk.bus.open_bus` picks it
for a URL that starts with ``nats://``. See ``docs/bus.md`` for the URL, the names it
creates on the server and their limits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from der_sdk import hookimpl
from der_sdk.bus import BusOptions, MessageBus
from der_sdk.extensions import BusBackendType
from der_sdk.lazy_exports import lazy_getattr
from der_sdk_nats.settings import PARAMETERS, SCHEMES, NatsSettings

if TYPE_CHECKING:
    from der_sdk_nats.bus import (
        CONSUMER,
        ERROR_HEADER,
        MINIMUM_SERVER,
        NatsBus,
        check_server_version,
    )

__all__ = [
    "CONSUMER",
    "ERROR_HEADER",
    "MINIMUM_SERVER",
    "PARAMETERS",
    "SCHEMES",
    "NatsBus",
    "NatsSettings",
    "check_server_version",
    "der_bus_backends",
]
__version__ = "0.1.0"

# Imported on first use: every ``der`` process loads this plugin, and the NATS client
# (with aiohttp) costs it a third of a second that only a replica on the bus needs.
_EXPORTS = dict.fromkeys(
    ("CONSUMER", "ERROR_HEADER", "MINIMUM_SERVER", "NatsBus", "check_server_version"), "bus"
)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def _open_bus(url: str, options: BusOptions) -> MessageBus:
    from der_sdk_nats.bus import NatsBus

    return NatsBus.from_url(url, options)


@hookimpl
def der_bus_backends() -> list[BusBackendType]:
    return [
        BusBackendType(
            name="nats",
            schemes=SCHEMES,
            factory=_open_bus,
            description="NATS 2.9+ with JetStream (nats://HOST:4222): commands and fan-out "
            "on core NATS, the telemetry stream and presence on JetStream file storage.",
        )
    ]
