"""sim-pv, sim-wind and sim-ev-charger against the adapter conformance suite of
der_sdk.testing, each on an asset of its own type.

The simulators model healthy devices reached without a link, so the link-fault tests
(timeout, error, disconnect, stale) skip with their reason; everything else (lifecycle,
samples and their details, limits, blocking, cancellation) runs.
"""

from __future__ import annotations

from plant_kit import EV, PV, WIND

from der_sdk.testing import AdapterConformance


class TestSimPvConformance(AdapterConformance):
    adapter_type = "sim-pv"
    asset = PV
    options = {"seed": 7, "latitude": 48.1}


class TestSimWindConformance(AdapterConformance):
    adapter_type = "sim-wind"
    asset = WIND
    options = {"seed": 7}


class TestSimEvChargerConformance(AdapterConformance):
    adapter_type = "sim-ev-charger"
    asset = EV
    options = {"seed": 7, "initial_sessions": 2}
