"""Subclass AdapterConformance: every test of the suite runs against your adapter."""

from der_sdk.extensions import Adapter
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing import AdapterConformance, FaultyAdapter, SimulatedDevicePlugin


class TestSimBess(AdapterConformance):
    adapter_type = "sim-bess"  # an installed adapter type
    options = {"initial_soc_pct": 50.0}


class TestDevice(AdapterConformance):
    """With fault injection the timeout, error, disconnect and stale tests run too."""

    adapter_type = "test-device"
    options = {"timeout_s": 0.2}

    def load_plugins(self) -> Plugins:  # "test-device" is not installed: add it
        return load_plugins(extra=[("test-device", SimulatedDevicePlugin())])

    async def inject_fault(self, adapter: Adapter, kind: str) -> bool:
        assert isinstance(adapter, FaultyAdapter)
        adapter.device.inject(kind)
        return True

    async def clear_fault(self, adapter: Adapter, kind: str) -> None:
        assert isinstance(adapter, FaultyAdapter)
        adapter.device.clear()
