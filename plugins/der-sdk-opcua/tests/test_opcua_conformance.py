"""The adapter conformance suite of ``der_sdk.testing`` against the ``opcua`` adapter and the
simulated OPC UA battery: once polling over a signed and encrypted channel, once with a
subscription."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from asyncua import ua
from der_sdk_opcua.adapter import OpcuaAdapter
from der_sdk_opcua.simulator import SIM_POINTS, SIM_PROFILE_NAME, BessSimulator, sim_node_id
from opcua_kit import Pki, SimulatorThread, eventually

from der_sdk.extensions import Adapter
from der_sdk.testing import AdapterConformance


def _fault_status(kind: str) -> int:
    return {
        "error": ua.StatusCodes.BadDeviceFailure,
        "stale": ua.StatusCodes.UncertainLastUsableValue,
    }[kind]


class OpcuaConformance(AdapterConformance):
    """Shared by both variants: the device is the simulator thread; faults are made there."""

    adapter_type = "opcua"
    extra_options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(autouse=True)
    def _use_device(self, device_thread: SimulatorThread, pki: Pki) -> None:
        self.device = device_thread
        self.pki = pki

    @property
    def options(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "endpoint": self.device.endpoint_url,
            "profile": SIM_PROFILE_NAME,
            **self.extra_options,
        }

    async def inject_fault(self, adapter: Adapter, kind: str) -> bool:
        if kind in ("error", "stale"):
            keys = (
                ["ActivePowerMW"]
                if kind == "error"
                else [p.key for p in SIM_POINTS if not p.writable]
            )

            def fail(sim: BessSimulator) -> Any:
                if kind == "stale":
                    sim.hold(True)
                for key in keys:
                    sim.set_point_status(key, _fault_status(kind))
                return sim.publish_now()

            await self.device.run(fail)
            await self.seen_by(adapter, keys[0], lambda code: not code.is_good())
            return True
        if kind == "timeout":
            await self.device.run(lambda sim: sim.stall(True))
            return True
        if kind == "disconnect":
            await self.device.run(lambda sim: sim.stop())
            return True
        return False

    async def clear_fault(self, adapter: Adapter, kind: str) -> None:
        if kind in ("error", "stale"):

            def heal(sim: BessSimulator) -> Any:
                sim.hold(False)
                for point in SIM_POINTS:
                    sim.set_point_status(point.key, None)
                return sim.publish_now()

            await self.device.run(heal)
            await self.seen_by(adapter, "ActivePowerMW", lambda code: code.is_good())
        elif kind == "timeout":
            await self.device.run(lambda sim: sim.stall(False))
        elif kind == "disconnect":
            await self.device.restart()

    async def seen_by(self, adapter: Adapter, key: str, check: Any) -> None:
        """With a subscription a device's change reaches the adapter one publishing interval
        later (without one, at the next read): wait for it so the suite's next read sees it."""
        assert isinstance(adapter, OpcuaAdapter)
        if not adapter.options.subscribe:
            return
        nodeid = ua.NodeId.from_string(sim_node_id(key))

        async def arrived() -> bool:
            value = adapter._cache.get(nodeid)
            return value is None or check(value.StatusCode)

        await eventually(arrived, within=10, what=f"the subscription to report {key}")


class TestOpcuaAdapterPollingSecure(OpcuaConformance):
    fault_timeout_s = 2.0

    @property
    def extra_options(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "subscribe": False,
            "certificate": str(self.pki.agent_cert),
            "private_key": str(self.pki.agent_key),
            "timeout_s": 2.0,
        }


class TestOpcuaAdapterSubscription(OpcuaConformance):
    fault_timeout_s = 2.0
    extra_options: ClassVar[dict[str, Any]] = {
        "security_policy": "None",
        "allow_insecure": True,
        "subscribe": True,
        "publishing_interval_ms": 50,
        "timeout_s": 2.0,
    }
