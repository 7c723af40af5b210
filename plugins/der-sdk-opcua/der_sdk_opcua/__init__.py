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

from typing import TYPE_CHECKING

from der_sdk import hookimpl
from der_sdk.extensions import (
    Adapter,
    AdapterContext,
    AdapterType,
    DeviceProfile,
    DeviceSimulatorType,
    EdgeService,
    EdgeServiceContext,
    EdgeServiceType,
)
from der_sdk.lazy_exports import lazy_getattr
from der_sdk_opcua.options import OpcuaAdapterOptions, OpcuaServerOptions
from der_sdk_opcua.profile import OPCUA_SIMULATOR, sim_device_profile

if TYPE_CHECKING:
    from der_sdk_opcua.adapter import OpcuaAdapter
    from der_sdk_opcua.server import OpcuaEdgeServer
    from der_sdk_opcua.simulator import BessSimulator

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

# Imported on first use: every ``der`` process loads this plugin, and asyncua costs it
# about half a second of CPU that only an agent with an OPC UA asset or server needs.
__getattr__ = lazy_getattr(
    __name__,
    {"OpcuaAdapter": "adapter", "OpcuaEdgeServer": "server", "BessSimulator": "simulator"},
)


def _adapter(context: AdapterContext) -> Adapter:
    from der_sdk_opcua.adapter import OpcuaAdapter

    return OpcuaAdapter(context)


def _edge_server(context: EdgeServiceContext) -> EdgeService:
    from der_sdk_opcua.server import OpcuaEdgeServer

    return OpcuaEdgeServer(context)


@hookimpl
def der_adapter_types() -> list[AdapterType]:
    return [
        AdapterType(
            name="opcua",
            factory=_adapter,
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
            factory=_edge_server,
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
