"""der-sdk-opcua: OPC UA for der-sdk, on asyncua.

Registered through the ``der_sdk`` entry point group:

* adapter ``opcua`` (:class:`OpcuaAdapter`, options :class:`OpcuaAdapterOptions`): read a
  device's telemetry from an OPC UA server and write its setpoint there;
* edge service ``opcua-server`` (:class:`OpcuaEdgeServer`, options
  :class:`OpcuaServerOptions`): the agent's assets as an OPC UA address space for a local
  SCADA, whose writes go down the agent's dispatch path;
* simulator ``opcua`` (``der sim opcua``, :class:`BessSimulator` in Python): a battery
  behind an OPC UA server, and its node map as the device profile ``der-sim-bess-opcua``.

See ``docs/opcua.md``.
"""

from __future__ import annotations

from der_sdk import hookimpl
from der_sdk.extensions import (
    AdapterType,
    DeviceProfile,
    DeviceSimulatorType,
    EdgeServiceType,
)
from der_sdk_opcua.adapter import OpcuaAdapter, OpcuaAdapterOptions
from der_sdk_opcua.server import OpcuaEdgeServer, OpcuaServerOptions
from der_sdk_opcua.simulator import OPCUA_SIMULATOR, BessSimulator, sim_device_profile

__all__ = [
    "BessSimulator",
    "OpcuaAdapter",
    "OpcuaAdapterOptions",
    "OpcuaEdgeServer",
    "OpcuaServerOptions",
    "der_adapter_types",
    "der_device_profiles",
    "der_device_simulators",
    "der_edge_services",
]
__version__ = "0.1.0"


@hookimpl
def der_adapter_types() -> list[AdapterType]:
    return [
        AdapterType(
            name="opcua",
            factory=OpcuaAdapter,
            options=OpcuaAdapterOptions,
            description="a device behind an OPC UA server: node map from options or a "
            "device profile, subscriptions with polling fallback, Basic256Sha256 by default",
        )
    ]


@hookimpl
def der_edge_services() -> list[EdgeServiceType]:
    return [
        EdgeServiceType(
            name="opcua-server",
            factory=OpcuaEdgeServer,
            options=OpcuaServerOptions,
            description="the agent's assets as an OPC UA server for a local SCADA; writes to "
            "its controls take the agent's dispatch path and are reported to the headend",
        )
    ]


@hookimpl
def der_device_profiles() -> list[DeviceProfile]:
    return [sim_device_profile()]


@hookimpl
def der_device_simulators() -> list[DeviceSimulatorType]:
    return [OPCUA_SIMULATOR]
