from der_sdk import hookimpl
from der_sdk.bus.memory import MemoryBus
from der_sdk.extensions import BusBackendType


@hookimpl
def der_bus_backends():
    # a second name for the in-process bus, as an example of the shape
    return [BusBackendType(name="loopback", schemes=("loopback",), factory=MemoryBus.from_url)]
