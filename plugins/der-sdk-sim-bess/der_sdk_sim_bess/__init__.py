"""der-sdk-sim-bess: a simulated battery adapter (``sim-bess``) for der-sdk.

Registered through the ``der_sdk`` entry point group; choose it per asset in the agent
config with ``adapter: sim-bess`` (see :class:`SimBessOptions` for its options).
"""

from __future__ import annotations

from der_sdk import hookimpl
from der_sdk.extensions import AdapterType
from der_sdk_sim_bess.adapter import SimBessAdapter, SimBessOptions
from der_sdk_sim_bess.model import SimBattery

__all__ = ["SimBattery", "SimBessAdapter", "SimBessOptions", "der_adapter_types"]
__version__ = "0.1.0"


@hookimpl
def der_adapter_types() -> list[AdapterType]:
    return [
        AdapterType(
            name="sim-bess",
            factory=SimBessAdapter,
            options=SimBessOptions,
            description=(
                "simulated battery: SOC, ramp limit and round-trip efficiency from the "
                "inventory; no hardware needed"
            ),
        )
    ]
