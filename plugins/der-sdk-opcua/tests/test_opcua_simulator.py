"""The plugin's registration, ``der sim opcua`` (the hook and the command), the simulated
battery's behaviour, and the certificate helper."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto.uacrypto import check_certificate
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from der_sdk_opcua.certs import (
    application_uri_of,
    load_certificate_der,
    make_application_certificate,
)
from der_sdk_opcua.simulator import (
    OPCUA_SIMULATOR,
    SIM_PROFILE_NAME,
    BessSimulator,
    add_simulator_arguments,
    sim_node_id,
)
from opcua_kit import eventually

from der_sdk import load_plugins


def test_the_plugin_registers_its_adapter_service_simulator_and_profile() -> None:
    plugins = load_plugins()
    assert plugins.adapter_types.provider("opcua") == "der-sdk-opcua"
    assert plugins.edge_services.provider("opcua-server") == "der-sdk-opcua"
    assert plugins.device_simulators.provider("opcua") == "der-sdk-opcua"
    profile = plugins.device_profiles.get(SIM_PROFILE_NAME)
    assert profile.protocol == "opcua"
    assert profile.points["SetpointMW"].access == "rw"
    assert profile.points["ActivePowerMW"].field == "mw"
    row = next(i for i in plugins.info() if i.package == "der-sdk-opcua")
    assert set(row.hooks) == {
        "der_adapter_types",
        "der_device_profiles",
        "der_device_simulators",
        "der_edge_services",
    }


async def test_the_simulated_battery_follows_its_setpoint_and_its_soc_moves() -> None:
    sim = BessSimulator(
        endpoint="opc.tcp://127.0.0.1:0/der-sim/",
        step_s=3600,  # stepped by hand below
        capacity_mwh=1.0,
        max_mw=1.0,
        min_mw=-1.0,
        ramp_rate_mw_per_min=60.0,
        efficiency=1.0,
    )
    async with sim:
        client = Client(sim.endpoint_url, timeout=5)
        await client.connect()
        try:
            await client.get_node(sim_node_id("SetpointMW")).write_value(
                ua.DataValue(ua.Variant(2.0, ua.VariantType.Double))  # beyond its limit
            )
            await sim.step(0.5)  # ramps at 1 MW/s toward the clamped 1 MW
            assert sim.read_point("ActivePowerMW") == pytest.approx(0.5)
            await sim.step(35.5)  # 36 s at ~1 MW: 1 % of 1 MWh per 36 s
            assert sim.read_point("ActivePowerMW") == pytest.approx(1.0)
            # 0.5 s ramping to 0.5 MW, 0.5 s more to 1 MW, then 35 s at 1 MW: ~0.0098 MWh
            assert sim.read_point("SocPct") == pytest.approx(49.01, abs=0.01)
            assert sim.read_point("Status") == "discharging"
            assert sim.setpoints_applied == [1.0]
            assert sim.read_point("InverterTempC") > 25.0
        finally:
            await client.disconnect()


async def test_the_simulator_hook_serves_until_cancelled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser()
    add_simulator_arguments(parser)
    args = parser.parse_args(["--endpoint", "opc.tcp://127.0.0.1:0/der-sim/", "--secure-only"])
    task = asyncio.create_task(OPCUA_SIMULATOR.run(args))
    printed: list[str] = []
    try:

        async def serving() -> bool:
            printed.append(capsys.readouterr().out)
            return "der sim opcua: simulated BESS on" in "".join(printed)

        await eventually(serving, what="the simulator to announce itself")
        assert "security Basic256Sha256)" in "".join(printed)  # --secure-only: no None
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


async def test_der_sim_opcua_runs_a_device_an_agent_can_read() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "der_sdk.cli",
        "sim",
        "opcua",
        "--endpoint",
        "opc.tcp://127.0.0.1:0/der-sim/",
        "--duration",
        "60",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert line.startswith("der sim opcua: simulated BESS on opc.tcp://127.0.0.1:"), line
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        client = Client(url, timeout=5)
        await client.connect()
        try:
            power = client.get_node(sim_node_id("ActivePowerMW"))
            await client.get_node(sim_node_id("SetpointMW")).write_value(
                ua.DataValue(ua.Variant(-1.5, ua.VariantType.Double))
            )

            async def charging() -> bool:
                return bool(await power.read_value() == pytest.approx(-1.5))

            await eventually(charging, what="the simulator to follow -1.5 MW")
        finally:
            await client.disconnect()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


def test_the_certificate_command_writes_a_usable_pair(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "der_sdk_opcua.certs",
            "--out",
            str(tmp_path),
            "--name",
            "scada",
            "--uri",
            "urn:site-a:scada",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    der = load_certificate_der(tmp_path / "scada.der")
    assert application_uri_of(der) == "urn:site-a:scada"
    cert = x509.load_der_x509_certificate(der)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and usage.data_encipherment
    assert (tmp_path / "scada.key.pem").stat().st_mode & 0o077 == 0


def test_application_certificates_are_made_by_asyncuas_cert_gen() -> None:
    made = make_application_certificate(
        common_name="edge", application_uri="urn:site-a:edge", hostnames=("edge-1", "localhost")
    )
    cert = x509.load_der_x509_certificate(made.certificate_der)
    assert not check_certificate(cert, "urn:site-a:edge", "edge-1"), "asyncua accepts it"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge"
    assert cert.subject == cert.issuer
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # cert_gen names the certificate its own authority, as OPC UA stacks expect of a
    # self-signed application certificate
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 365
