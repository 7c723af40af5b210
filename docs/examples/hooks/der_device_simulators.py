import asyncio

from der_sdk import hookimpl
from der_sdk.extensions import DeviceSimulatorType


def add_arguments(parser):
    parser.add_argument("--level-pct", type=float, default=50.0, help="tank level")


async def run(args):
    print(f"water tank at {args.level_pct:g} %; Ctrl-C to stop")
    await asyncio.Event().wait()  # serve until `der sim` cancels the task


@hookimpl
def der_device_simulators():
    return [
        DeviceSimulatorType(
            name="tank",
            description="a water tank that reports its level",
            add_arguments=add_arguments,
            run=run,
        )
    ]
