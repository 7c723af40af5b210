"""der-sdk-sim-plant: simulated plants for der-sdk: ``sim-pv`` (a PV plant), ``sim-wind``
(a wind turbine) and ``sim-ev-charger`` (an EV charging station).

Registered through the ``der_sdk`` entry point group; choose one per asset in the agent
config (``adapter: sim-pv``). Each is deterministic under its ``seed`` option and raises
and clears device conditions through its :class:`~der_sdk.extensions.ConditionReporter`.
"""

from __future__ import annotations

from der_sdk import hookimpl
from der_sdk.extensions import AdapterType
from der_sdk_sim_plant.base import PlantModel, PlantReading, SimPlantAdapter
from der_sdk_sim_plant.ev import (
    CHARGER_FAULT,
    SimEvCharger,
    SimEvChargerAdapter,
    SimEvChargerOptions,
    share_import_limit,
)
from der_sdk_sim_plant.pv import INVERTER_TRIP, SimPv, SimPvAdapter, SimPvOptions
from der_sdk_sim_plant.wind import (
    OVERSPEED_STOP,
    SimWind,
    SimWindAdapter,
    SimWindOptions,
    power_curve,
)

__all__ = [
    "CHARGER_FAULT",
    "INVERTER_TRIP",
    "OVERSPEED_STOP",
    "PlantModel",
    "PlantReading",
    "SimEvCharger",
    "SimEvChargerAdapter",
    "SimEvChargerOptions",
    "SimPlantAdapter",
    "SimPv",
    "SimPvAdapter",
    "SimPvOptions",
    "SimWind",
    "SimWindAdapter",
    "SimWindOptions",
    "der_adapter_types",
    "power_curve",
    "share_import_limit",
]
__version__ = "0.1.0"


@hookimpl
def der_adapter_types() -> list[AdapterType]:
    return [
        AdapterType(
            name="sim-pv",
            factory=SimPvAdapter,
            options=SimPvOptions,
            description="simulated PV plant: clear-sky sun by latitude, seeded passing "
            "clouds, module temperature, curtailment to an export limit, inverter trips",
        ),
        AdapterType(
            name="sim-wind",
            factory=SimWindAdapter,
            options=SimWindOptions,
            description="simulated wind turbine: seeded wind walk, power curve with "
            "cut-in/rated/cut-out, over-speed stop, curtailment to an export limit",
        ),
        AdapterType(
            name="sim-ev-charger",
            factory=SimEvChargerAdapter,
            options=SimEvChargerOptions,
            description="simulated EV charging station: seeded sessions with energy needs "
            "and rates, an import limit shared across them, station faults",
        ),
    ]
