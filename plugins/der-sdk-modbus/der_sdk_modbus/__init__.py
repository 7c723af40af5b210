"""der-sdk-modbus: the ``modbus`` adapter (Modbus TCP), the SunSpec device pack
and the ``der sim modbus`` device simulator.

Registered through the ``der_sdk`` entry point group. Choose it per asset in the agent
config with ``adapter: modbus`` and a profile (see :class:`ModbusOptions`); the profile
format and its Modbus settings are described in ``docs/modbus.md``.
"""

from __future__ import annotations

from der_sdk import hookimpl
from der_sdk.extensions import AdapterType, DeviceProfile, DeviceSimulatorType
from der_sdk_modbus.adapter import ModbusAdapter
from der_sdk_modbus.options import ModbusOptions
from der_sdk_modbus.pack import builtin_profiles

__all__ = [
    "ModbusAdapter",
    "ModbusOptions",
    "der_adapter_types",
    "der_device_profiles",
    "der_device_simulators",
]
__version__ = "0.1.0"


@hookimpl
def der_adapter_types() -> list[AdapterType]:
    return [
        AdapterType(
            name="modbus",
            factory=ModbusAdapter,
            options=ModbusOptions,
            description=(
                "Modbus TCP device described by a device profile (register map), with "
                "read coalescing and optional SunSpec discovery"
            ),
        )
    ]


@hookimpl
def der_device_profiles() -> list[DeviceProfile]:
    return builtin_profiles()


@hookimpl
def der_device_simulators() -> list[DeviceSimulatorType]:
    from der_sdk_modbus.simulator.cli import MODBUS_SIMULATOR

    return [MODBUS_SIMULATOR]
