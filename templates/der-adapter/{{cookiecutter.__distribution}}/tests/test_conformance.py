"""der-sdk's adapter conformance suite, run against the ``{{ cookiecutter.name }}`` adapter.

:class:`der_sdk.testing.AdapterConformance` checks what the agent relies on: connect, read
and setpoint behaviour, timestamps, clamping, cancellation, and what the adapter reports
while the device fails. It injects faults through the two methods below; keep them working
when you replace the simulated device (for a real device, inject faults in a test double
or a device simulator).
"""

from __future__ import annotations

from der_sdk.extensions import Adapter
from der_sdk.testing import AdapterConformance

from {{ cookiecutter.__package }} import {{ cookiecutter.__class }}Adapter


class Test{{ cookiecutter.__class }}Conformance(AdapterConformance):
    adapter_type = "{{ cookiecutter.name }}"
    options = {"initial_mw": 0.0, "timeout_s": 0.2}  # a short timeout keeps fault tests fast

    async def inject_fault(self, adapter: Adapter, kind: str) -> bool:
        assert isinstance(adapter, {{ cookiecutter.__class }}Adapter)
        return adapter.device.inject_fault(kind)

    async def clear_fault(self, adapter: Adapter, kind: str) -> None:
        assert isinstance(adapter, {{ cookiecutter.__class }}Adapter)
        adapter.device.clear_fault(kind)
