"""sim-bess against the adapter conformance suite of der_sdk.testing.

sim-bess simulates a healthy battery and has no fault injection, so the fault tests skip
with their reason; everything else (lifecycle, samples, limits, blocking, cancellation)
runs.
"""

from __future__ import annotations

from der_sdk.testing import AdapterConformance


class TestSimBessConformance(AdapterConformance):
    adapter_type = "sim-bess"
    options = {"initial_soc_pct": 50.0, "seed": 7}
