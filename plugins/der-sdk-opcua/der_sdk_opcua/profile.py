"""The simulated OPC UA battery's node map as a device profile, and ``der sim opcua``'s
command line: what registering the plugin needs, without importing asyncua (every
``der`` process loads the plugin; the server is imported when the simulator runs).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from der_sdk.extensions import DevicePoint, DeviceProfile, DeviceSimulatorType

if TYPE_CHECKING:
    from asyncua import ua

__all__ = [
    "OPCUA_SIMULATOR",
    "SIM_APPLICATION_URI",
    "SIM_NAMESPACE",
    "SIM_NS",
    "SIM_POINTS",
    "SIM_PROFILE_NAME",
    "SimPoint",
    "add_simulator_arguments",
    "sim_device_profile",
    "sim_node_id",
]

SIM_NAMESPACE = "urn:der-sdk:sim:bess"
SIM_PROFILE_NAME = "der-sim-bess-opcua"
SIM_APPLICATION_URI = "urn:der-sdk:sim:bess:server"
SIM_NS = 2
"""The simulator's namespace index: the first one a fresh asyncua server registers."""


@dataclass(frozen=True)
class SimPoint:
    """One node of the simulated battery."""

    key: str
    field: str
    kind: str
    """Its OPC UA data type: ``Double``, ``String`` or ``Boolean``."""
    unit: str | None = None
    writable: bool = False

    @property
    def vtype(self) -> ua.VariantType:
        """:attr:`kind` as asyncua's variant type (imports asyncua)."""
        from asyncua import ua

        return getattr(ua.VariantType, self.kind)  # type: ignore[no-any-return]


SIM_POINTS: tuple[SimPoint, ...] = (
    SimPoint("ActivePowerMW", "mw", "Double", "MW"),
    SimPoint("SetpointMW", "mw_setpoint", "Double", "MW", writable=True),
    SimPoint("SocPct", "details.soc_pct", "Double", "%"),
    SimPoint("SohPct", "details.soh_pct", "Double", "%"),
    SimPoint("EnergyMWh", "details.energy_mwh", "Double", "MWh"),
    SimPoint("InverterTempC", "details.inverter_temp_c", "Double", "degC"),
    SimPoint("Status", "status", "String"),
    SimPoint("Online", "online", "Boolean"),
    SimPoint("FaultCode", "fault_code", "String"),
)


def sim_node_id(key: str) -> str:
    """The node id of a simulator point, e.g. ``ns=2;s=Bess.SetpointMW``."""
    return f"ns={SIM_NS};s=Bess.{key}"


def sim_device_profile() -> DeviceProfile:
    """The simulator's node map as a device profile (protocol ``opcua``)."""
    return DeviceProfile(
        name=SIM_PROFILE_NAME,
        vendor="der-sdk",
        model="der sim opcua (simulated BESS)",
        version="1",
        protocol="opcua",
        points={
            p.key: DevicePoint(
                address=sim_node_id(p.key),
                unit=p.unit,
                access="rw" if p.writable else "r",
                field=p.field,
            )
            for p in SIM_POINTS
        },
    )


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``der sim opcua``."""
    parser.add_argument(
        "--endpoint",
        default="opc.tcp://127.0.0.1:4841/der-sim/",
        help="endpoint to listen on (default: %(default)s)",
    )
    parser.add_argument("--max-mw", type=float, default=2.0, help="discharge limit, MW")
    parser.add_argument("--min-mw", type=float, default=-2.0, help="charge limit, MW (negative)")
    parser.add_argument("--capacity-mwh", type=float, default=4.0, help="energy capacity, MWh")
    parser.add_argument("--soc", type=float, default=50.0, help="initial state of charge, %%")
    parser.add_argument("--ramp-mw-per-min", type=float, default=None, help="ramp rate limit")
    parser.add_argument("--efficiency", type=float, default=0.9, help="round-trip efficiency")
    parser.add_argument("--step", type=float, default=0.5, help="seconds between updates")
    parser.add_argument("--noise-mw", type=float, default=0.0, help="meter noise (std dev), MW")
    parser.add_argument(
        "--secure-only",
        action="store_true",
        help="offer only Basic256Sha256 endpoints (default: also security policy None)",
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds")


async def _run_simulator(args: argparse.Namespace) -> None:
    from der_sdk_opcua.simulator import run_simulator

    await run_simulator(args)


OPCUA_SIMULATOR = DeviceSimulatorType(
    name="opcua",
    description="a battery (BESS) behind an OPC UA server, for the opcua adapter "
    f"(device profile {SIM_PROFILE_NAME})",
    add_arguments=add_simulator_arguments,
    run=_run_simulator,
)
