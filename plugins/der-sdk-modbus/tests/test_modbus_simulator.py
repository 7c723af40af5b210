"""``der sim modbus``: listed by ``der sim --help``, runs from the command line with a
start-up fault, its device moves plausibly, and it refuses the functions it does not
serve as the Modbus specification says."""

from __future__ import annotations

import asyncio
import signal
import struct
import sys

import pytest
from der_sdk_modbus.simulator import ModbusSimServer, SimulatedDevice
from modbus_kit import SUNSPEC_BESS, MakeAdapter, eventually, good_sample, profile
from pymodbus.client import AsyncModbusTcpClient

from der_sdk.cli import main


def test_der_sim_help_lists_the_modbus_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["sim", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "installed simulators:" in out
    assert "modbus" in out and "(der-sdk-modbus)" in out


def test_der_sim_modbus_help_shows_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["sim", "modbus", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in ("--profile", "--port", "--unit", "--fault-delay", "--fault-exception"):
        assert option in out


def test_an_unknown_profile_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "modbus", "--profile", "no-such-device", "--duration", "0"]) == 2
    err = capsys.readouterr().err
    assert "no Modbus device profile 'no-such-device' is installed" in err
    assert "Traceback" not in err


async def test_der_sim_modbus_serves_a_sunspec_device_with_a_start_up_fault(
    make_adapter: MakeAdapter,
) -> None:
    command = [sys.executable, "-m", "der_sdk.cli", "sim", "modbus", "--port", "0"]
    for name in SUNSPEC_BESS[1:]:
        command += ["--profile", name]
    process = await asyncio.create_subprocess_exec(
        *command, "--fault-exception", "4", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            line = (await process.stdout.readline()).decode()
        assert "(SunSpec models 1, 701, 704, 802 at 40000)" in line, line
        assert "faults: exception" in line
        port = int(line.split(" on 127.0.0.1:")[1].split()[0])
        server = ModbusSimServer({}, port=port)  # only the port, for make_adapter
        adapter = make_adapter(server, sunspec_scan=True)
        await adapter.connect()

        async def fault_reported() -> bool:
            sample = await adapter.read()
            return "exception response 04 (server device failure)" in (sample.quality_reason or "")

        await eventually(fault_reported, within=10, what="the start-up fault")
        await adapter.close()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            code = await process.wait()
    assert code == 0


async def test_simulated_values_move_plausibly() -> None:
    clock = [0.0]
    device = SimulatedDevice(
        [profile(name) for name in SUNSPEC_BESS],
        rating_mw=1.0,
        capacity_mwh=1.0,
        ramp_s=2.0,
        noise=0.0,
        clock=lambda: clock[0],
    )
    device.target_mw = 1.0
    clock[0] += 1.0
    device.step()
    assert device.value("W", profile="sunspec-701") == pytest.approx(0.5, abs=1e-3)  # ramping
    clock[0] += 10.0
    device.step()
    assert device.value("W", profile="sunspec-701") == pytest.approx(1.0, abs=1e-3)
    soc = device.value("SoC")
    assert isinstance(soc, float) and 46.0 < soc < 50.0  # discharging lowers the SoC
    assert device.value("InvSt") == 3  # running
    assert device.value("ChaSt") == 3  # discharging
    hz = device.value("Hz", profile="sunspec-701")
    assert isinstance(hz, float) and 49.9 < hz < 50.1


async def test_a_device_serves_several_unit_ids_like_a_gateway(
    make_adapter: MakeAdapter,
) -> None:
    acme = profile("acme-bess@1.0.0")
    first = SimulatedDevice([acme], unit_id=1, rating_mw=2.0, ramp_s=0, seed=1)
    second = SimulatedDevice([acme], unit_id=2, rating_mw=2.0, ramp_s=0, seed=2)
    async with ModbusSimServer({1: first, 2: second}) as server:
        one = make_adapter(server, profile="acme-bess@1.0.0", unit_id=1)
        two = make_adapter(server, profile="acme-bess@1.0.0", unit_id=2)
        nobody = make_adapter(server, profile="acme-bess@1.0.0", unit_id=7)
        for adapter in (one, two, nobody):
            await adapter.connect()
        await two.apply_setpoint(0.5)
        await good_sample(one)
        assert second.target_mw == 0.5 and first.target_mw == 0.0
        missing = await nobody.read()
        assert "exception response 0B" in (missing.quality_reason or "")
        for adapter in (one, two, nobody):
            await adapter.close()


async def exchange(port: int, unit: int, pdu: bytes, transaction: int = 0x1234) -> bytes:
    """Send one Modbus TCP frame over a fresh loopback connection; the whole reply frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack(">HHHB", transaction, 0, len(pdu) + 1, unit) + pdu)
        await writer.drain()
        async with asyncio.timeout(5):
            header = await reader.readexactly(6)
            return header + await reader.readexactly(struct.unpack(">H", header[4:6])[0])
    finally:
        writer.close()
        await writer.wait_closed()


def exception_frame(function: int, code: int, unit: int = 1, transaction: int = 0x1234) -> bytes:
    return struct.pack(">HHHBBB", transaction, 0, 3, unit, function | 0x80, code)


UNSERVED_REQUESTS = {
    "0x2B/0x0E read device identification": bytes([0x2B, 0x0E, 0x01, 0x00]),
    "0x07 read exception status": bytes([0x07]),
    "0x08 diagnostics (return query data)": bytes([0x08, 0x00, 0x00, 0x12, 0x34]),
    "0x11 report server id": bytes([0x11]),
    "0x14 read file record": bytes([0x14, 0x07, 0x06, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01]),
    "0x18 read FIFO queue": bytes([0x18, 0x00, 0x00]),
    "0x41 unknown to pymodbus": bytes([0x41]),
    "0x14 read file record, malformed": bytes([0x14, 0x07, 0x06, 0x00]),
}


async def test_an_unserved_function_gets_exception_01_under_its_own_code_plus_0x80() -> None:
    device = SimulatedDevice([profile("acme-bess@1.0.0")], unit_id=1, ramp_s=0, seed=1)
    async with ModbusSimServer(device) as server:
        for what, pdu in UNSERVED_REQUESTS.items():
            reply = await exchange(server.port, 1, pdu)
            assert reply == exception_frame(pdu[0], 0x01), f"{what}: {reply.hex(' ')}"
        assert device.requests == 0, "refused before reaching the device"

        # a function the device serves, with a body that does not parse: 03, under 0x83
        truncated = await exchange(server.port, 1, bytes([0x03, 0x00]))
        assert truncated == exception_frame(0x03, 0x03)
        # and one it serves, whole: answered from its registers
        read = await exchange(server.port, 1, bytes([0x03, 0x00, 0x00, 0x00, 0x01]))
        assert read[7:9] == bytes([0x03, 0x02]), read.hex(" ")

        client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=5, retries=0)
        await client.connect()
        try:
            identity = await client.read_device_information(device_id=1)
            assert identity.isError()
            assert (identity.function_code, identity.exception_code) == (0xAB, 0x01)
        finally:
            client.close()
