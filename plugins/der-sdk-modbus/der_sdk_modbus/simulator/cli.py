"""``der sim modbus``: serve a simulated Modbus TCP device from installed device profiles."""

from __future__ import annotations

import argparse
import asyncio
import logging

from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.extensions import DeviceProfile, DeviceSimulatorType
from der_sdk_modbus.pack import find_profile
from der_sdk_modbus.simulator.device import SimulatedDevice
from der_sdk_modbus.simulator.server import ModbusSimServer

__all__ = ["MODBUS_SIMULATOR", "add_arguments", "run"]

log = logging.getLogger("der.modbus.sim")

DEFAULT_PORT = 5020


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        action="append",
        required=True,
        metavar="NAME[@VERSION]",
        help="device profile to lay out; repeat for a device of several SunSpec models "
        "(e.g. --profile sunspec-701 --profile sunspec-704 --profile sunspec-802)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any)"
    )
    parser.add_argument("--unit", type=int, default=1, help="unit id to answer as (default 1)")
    parser.add_argument("--rating-mw", type=float, default=1.0, help="power rating (default 1)")
    parser.add_argument(
        "--capacity-mwh", type=float, default=2.0, help="battery capacity (default 2)"
    )
    parser.add_argument(
        "--ramp-s",
        type=float,
        default=2.0,
        help="seconds to ramp across the whole rating (default 2; 0: step at once)",
    )
    parser.add_argument("--seed", type=int, help="seed of the measurement noise")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="answer reads of unmapped registers with exception 02, like many devices",
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    faults = parser.add_argument_group("start-up fault (change it from Python while running)")
    faults.add_argument("--fault-delay", type=float, metavar="S", help="answer S seconds late")
    faults.add_argument(
        "--fault-exception",
        type=lambda text: int(text, 0),
        metavar="CODE",
        help="answer every request with exception CODE (1-11, e.g. 4 or 0x0B)",
    )
    faults.add_argument("--fault-drop", action="store_true", help="never answer")
    faults.add_argument(
        "--fault-disconnect", action="store_true", help="close the connection on each request"
    )


def _profile(name: str) -> DeviceProfile:
    from der_sdk.plugins import load_plugins

    profile_name, _, version = name.partition("@")
    registry = load_plugins().device_profiles
    profiles = {f"{p.name}@{p.version}": p for p in registry}
    try:
        return find_profile(profiles, profile_name, version or None)
    except UnknownNameError as exc:
        raise DerSdkError(str(exc)) from None


def build_device(args: argparse.Namespace) -> SimulatedDevice:
    """The simulated device the command-line ``args`` describe, faults included."""
    profiles = [_profile(name) for name in args.profile]
    common = None
    if any(
        p.points and all("sunspec_model" in pt.extra for pt in p.points.values()) for p in profiles
    ):
        common = _profile("sunspec-1")
    device = SimulatedDevice(
        profiles,
        unit_id=args.unit,
        rating_mw=args.rating_mw,
        capacity_mwh=args.capacity_mwh,
        ramp_s=args.ramp_s,
        seed=args.seed,
        strict=args.strict,
        common_model=common,
    )
    if args.fault_delay:
        device.inject_fault("delay", delay_s=args.fault_delay)
    if args.fault_exception is not None:
        device.inject_fault("exception", code=args.fault_exception)
    if args.fault_drop:
        device.inject_fault("drop")
    if args.fault_disconnect:
        device.inject_fault("disconnect")
    return device


async def run(args: argparse.Namespace) -> None:
    try:
        device = build_device(args)
    except ValueError as exc:
        raise DerSdkError(f"der sim modbus: {exc}") from None
    server = ModbusSimServer(device, host=args.host, port=args.port)
    try:
        await server.start()
    except OSError as exc:
        raise DerSdkError(f"cannot serve on {args.host}:{args.port}: {exc}") from None
    try:
        models = ", ".join(str(m[0]) for m in device.sunspec_models)
        faults = ", ".join(f.kind for f in device.faults) or "none"
        print(
            f"der sim modbus: {', '.join(p.name for p in device.profiles)} on "
            f"{args.host}:{server.port} unit {args.unit}"
            + (f" (SunSpec models {models} at 40000)" if models else "")
            + f"; faults: {faults}; Ctrl-C to stop",
            flush=True,
        )
        if args.duration is not None:
            await asyncio.sleep(args.duration)
        else:
            await asyncio.Event().wait()
    finally:
        await server.stop()


MODBUS_SIMULATOR = DeviceSimulatorType(
    name="modbus",
    description="a Modbus TCP device laid out from device profiles, with fault injection",
    add_arguments=add_arguments,
    run=run,
)
