"""The ``modbus`` adapter against der-sdk's adapter conformance suite, on a simulated
SunSpec battery inverter (found by scan) with the simulator's fault injection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest_asyncio
from der_sdk_modbus.simulator import ModbusSimServer, SimulatedDevice
from modbus_kit import SUNSPEC_BESS, profile

from der_sdk.extensions import Adapter
from der_sdk.testing import AdapterConformance


class TestModbusConformance(AdapterConformance):
    adapter_type = "modbus"
    options: ClassVar[dict[str, Any]] = {}  # set per test: the simulator's port
    fault_timeout_s = 3.0
    # the simulated device answers in the same event loop; on a loaded 2-core machine a
    # time slice lost to another process would otherwise read as the adapter blocking
    blocking_threshold_s = 0.15

    @pytest_asyncio.fixture(autouse=True)
    async def simulated_device(self) -> AsyncIterator[None]:
        self.device = SimulatedDevice(
            [profile(name) for name in SUNSPEC_BESS], rating_mw=2.0, ramp_s=0, seed=5
        )
        async with ModbusSimServer(self.device) as server:
            self.server = server
            self.options = {
                "host": "127.0.0.1",
                "port": server.port,
                "sunspec_scan": True,
                "poll_interval_s": 0.5,
                "timeout_s": 1.0,
                "retries": 0,
            }
            yield

    async def inject_fault(self, adapter: Adapter, kind: str) -> bool:
        if kind == "timeout":
            self.device.inject_fault("drop")
        elif kind == "error":
            self.device.inject_fault("exception", code=0x04)
        elif kind == "disconnect":
            self.server.inject_fault("disconnect")
        else:
            # "stale": a register that stops changing cannot be told from a steady value
            return False
        return True

    async def clear_fault(self, adapter: Adapter, kind: str) -> None:
        self.server.clear_faults()
