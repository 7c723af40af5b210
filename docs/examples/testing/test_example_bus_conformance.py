"""Subclass BusConformance: every test of the suite runs against your bus."""

from der_sdk.testing import BusConformance


class TestMemoryBus(BusConformance):
    url = "memory://example"  # buses with this URL in one process share one broker
    presence_max_age_s = 0.3  # short ages and waits keep the suite quick
    ack_wait_s = 0.3
    expiry_slack_s = 0.5
