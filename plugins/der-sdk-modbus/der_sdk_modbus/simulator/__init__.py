"""A Modbus TCP device simulator seeded from device profiles, with fault injection.

Run it with ``der sim modbus --profile NAME`` or embed it in tests::

    device = SimulatedDevice([profile], unit_id=1)
    async with ModbusSimServer(device) as server:
        ...                                   # connect to 127.0.0.1:server.port
        device.inject_fault("delay", delay_s=0.5)
        device.clear_faults()
"""

from __future__ import annotations

from der_sdk_modbus.simulator.device import Fault, FaultKind, RequestRecord, SimulatedDevice
from der_sdk_modbus.simulator.server import ModbusSimServer

__all__ = ["Fault", "FaultKind", "ModbusSimServer", "RequestRecord", "SimulatedDevice"]
