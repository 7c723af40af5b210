"""The bus contract's conformance suite (``der_sdk.testing.BusConformance``) on the real
NATS server, through the installed plugin's entry point."""

from __future__ import annotations

from der_sdk_nats.testing import require_nats

from der_sdk.bus import BusOptions, MessageBus, open_bus
from der_sdk.testing import BusConformance


class TestNatsBusConformance(BusConformance):
    expected_name = "nats"

    def make_bus(self, options: BusOptions) -> MessageBus:
        return open_bus(require_nats(), self.load_plugins(), options)
