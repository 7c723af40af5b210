"""The ``opcua-server`` edge service on its own (the agent's dispatch path faked): security
by default, who may write, the address space and how telemetry shows in it.

The real dispatch path, the headend record and the authority rule are in
``test_opcua_e2e.py``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.utils import create_nonce
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from der_sdk_opcua.certs import ApplicationCertificate, make_application_certificate
from der_sdk_opcua.security import TrustList
from der_sdk_opcua.server import OpcuaEdgeServer, OpcuaServerOptions
from opcua_kit import CLIENT_URI, ROGUE_URI, LoopThread, Pki, eventually, secure_client

from der_sdk.errors import DerSdkError
from der_sdk.extensions import EdgeServiceContext
from der_sdk.models import Asset, TelemetrySample
from der_sdk.wire.codec import Allocation
from der_sdk_agent.dispatch import DispatchOutcome

SITE = "11111111-1111-4111-8111-111111111111"
A1 = "aaaaaaaa-0000-4000-8000-000000000001"
A2 = "aaaaaaaa-0000-4000-8000-000000000002"
ASSETS = [
    Asset(asset_id=A1, site_id=SITE, name="A1", capacity_mwh=2, max_mw=0.5, min_mw=-0.5),
    Asset(asset_id=A2, site_id=SITE, name="A2", capacity_mwh=4, max_mw=2, min_mw=-2),
]
USER = ("operator", "correct horse")


class FakeDispatch:
    """Stands in for the agent's dispatch path: clamps per asset, splits a site equally."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str | None, float, float | None]] = []
        self.status = "applied"

    def reset(self) -> None:
        self.calls.clear()
        self.status = "applied"

    async def __call__(
        self, asset_id: str | None, site_id: str | None, mw: float, duration_s: float | None
    ) -> DispatchOutcome:
        self.calls.append((asset_id, site_id, mw, duration_s))
        targets = [a for a in ASSETS if a.asset_id == asset_id] if asset_id else ASSETS
        share = mw if asset_id else mw / len(targets)
        status = self.status
        return DispatchOutcome(
            command_id=f"local-{len(self.calls)}",
            status=status,  # type: ignore[arg-type]
            allocations=tuple(
                Allocation(asset_id=a.asset_id, mw=a.clamp(share), status=status) for a in targets
            ),
            reason=None if status == "applied" else f"the test said {status}",
        )


Starter = Callable[..., Any]


@pytest_asyncio.fixture
async def edge(pki: Pki) -> AsyncIterator[Starter]:
    """Start an edge server with the given options (on a free port); stopped after the test."""
    started: list[OpcuaEdgeServer] = []

    async def start(dispatch: FakeDispatch | None = None, **options: Any) -> OpcuaEdgeServer:
        server = make_server(pki, dispatch or FakeDispatch(), **options)
        await server.start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


def make_server(pki: Pki, dispatch: FakeDispatch, **options: Any) -> OpcuaEdgeServer:
    raw: dict[str, Any] = {
        "endpoint": "opc.tcp://127.0.0.1:0/der-sdk/",
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        "trusted_certificates": str(pki.trust),
        "users": dict([USER]),
        **options,
    }
    return OpcuaEdgeServer(
        EdgeServiceContext(
            agent_id="gw-test",
            site_id=SITE,
            assets=ASSETS,
            options=OpcuaServerOptions(**raw),
            dispatch=dispatch,
        )
    )


@dataclass
class Shared:
    """One edge server with the default options (plus a setpoint duration) for the module,
    on a loop of its own; its fake dispatch is reset before each test."""

    loop: LoopThread
    server: OpcuaEdgeServer
    dispatch: FakeDispatch


@pytest.fixture(scope="module")
def shared_server(pki: Pki) -> Iterator[Shared]:
    loop = LoopThread("opcua-edge")
    dispatch = FakeDispatch()

    async def start() -> OpcuaEdgeServer:
        server = make_server(pki, dispatch, setpoint_duration_s=900)
        await server.start()
        return server

    server = loop.wait(start())
    try:
        yield Shared(loop, server, dispatch)
    finally:
        loop.wait(server.stop())
        loop.stop()


@pytest.fixture
def shared(shared_server: Shared) -> Shared:
    shared_server.dispatch.reset()
    return shared_server


def path_node(client: Client, server: OpcuaEdgeServer, path: str) -> Any:
    return client.get_node(ua.NodeId.from_string(f"ns={server.namespace_index};s={path}"))


async def write(node: Any, value: float) -> None:
    await node.write_value(ua.DataValue(ua.Variant(value, ua.VariantType.Double)))


def code_of(exc: BaseException) -> str:
    assert isinstance(exc, UaStatusCodeError), repr(exc)
    return str(ua.StatusCode(exc.code).name)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"certificate": None}, "options.certificate and options.private_key are required"),
        ({"trusted_certificates": None}, "options.trusted_certificates is required"),
        ({"security_modes": []}, "would offer no endpoint"),
        ({"setpoint_duration_s": 0}, "setpoint_duration_s"),
    ],
)
def test_bad_options_are_refused(pki: Pki, options: dict[str, Any], message: str) -> None:
    raw = {
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        "trusted_certificates": str(pki.trust),
        **options,
    }
    with pytest.raises((DerSdkError, TypeError, ValueError), match=message):
        import msgspec

        OpcuaEdgeServer(
            EdgeServiceContext(
                agent_id="gw",
                site_id=SITE,
                assets=ASSETS,
                options=msgspec.convert(raw, OpcuaServerOptions),
                dispatch=FakeDispatch(),
            )
        )


async def test_a_private_key_in_the_trust_folder_is_named(
    edge: Starter, pki: Pki, tmp_path: Path
) -> None:
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(pki.client_cert, trust / "scada.der")
    shutil.copy(pki.client_key, trust / "scada.key.pem")
    with pytest.raises(DerSdkError, match=r"scada.key.pem is not a certificate"):
        await edge(trusted_certificates=str(trust))


def issue(
    common_name: str, *, ca: bool, issuer: tuple[x509.Certificate, Any] | None = None
) -> tuple[x509.Certificate, Any]:
    """A certificate (self-signed, or signed by ``issuer``) and its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .not_valid_before(NOW - timedelta(minutes=5))
        .not_valid_after(NOW + timedelta(days=1))
        .serial_number(x509.random_serial_number())
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer[1] if issuer else key, hashes.SHA256())
    )
    return cert, key


def test_the_trust_list_says_why_a_certificate_issued_by_another_is_not_trusted() -> None:
    """The cases where the X.509 verifier's own message ("basicConstraints.cA must be
    asserted in a CA certificate") names a check rather than the reason."""
    plain = issue("plain", ca=False)  # a self-signed end-entity certificate
    ca = issue("ca", ca=True)
    trust = TrustList([plain[0], ca[0]], Path("pki/trusted"))
    assert trust.is_trusted(plain[0]) and trust.is_trusted(ca[0])
    assert trust.is_trusted(issue("leaf", ca=False, issuer=ca)[0])

    by_plain = issue("by-plain", ca=False, issuer=plain)[0]
    assert trust.untrusted_reason(by_plain) == (
        "issued by CN=plain, whose certificate in the trust list is not a CA certificate "
        "(basicConstraints CA:FALSE) and so cannot vouch for others"
    )
    stranger = issue("other-ca", ca=True)
    by_stranger = issue("by-stranger", ca=False, issuer=stranger)[0]
    assert trust.untrusted_reason(by_stranger) == (
        "issued by CN=other-ca, which is not in the trust list (pki/trusted)"
    )
    assert TrustList([], None).untrusted_reason(plain[0]) == (
        "the trust list (no trusted_certificates folder) is empty"
    )


def write_crl(folder: Path, name: str, serials: list[int], pki: Pki) -> Path:
    """A CRL revoking ``serials``, signed with the server's key (only the serials count)."""
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .last_update(NOW)
        .next_update(NOW + timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
        )
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


async def test_a_revoked_client_certificate_is_refused_naming_the_crl(
    edge: Starter, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    serial = x509.load_der_x509_certificate(pki.client_cert.read_bytes()).serial_number
    write_crl(tmp_path / "crl", "revoked.crl.pem", [serial], pki)
    server = await edge(revoked_certificates=str(tmp_path / "crl"))
    client = await secure_client(server.endpoint_url, pki)
    with pytest.raises(UaStatusCodeError) as refused:
        await client.connect()
    assert code_of(refused.value) == "BadCertificateRevoked"
    (warning,) = [r for r in caplog.records if r.name == "der.opcua.security"]
    assert f"serial number {serial:#x} is revoked by the CRL revoked.crl.pem" in (
        warning.getMessage()
    )

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "notes.pem").write_text("not a CRL")
    with pytest.raises(DerSdkError, match=r"notes.pem is not a certificate revocation list"):
        await edge(revoked_certificates=str(tmp_path / "bad"))


# --------------------------------------------------------------------------- security


async def test_an_untrusted_client_certificate_is_refused(shared: Shared, pki: Pki) -> None:
    server = shared.server
    rogue = await secure_client(server.endpoint_url, pki, rogue=True)
    with pytest.raises(UaStatusCodeError) as refused:
        await rogue.connect()
    assert code_of(refused.value) == "BadCertificateUntrusted"

    trusted = await secure_client(server.endpoint_url, pki)
    await trusted.connect()
    try:
        mw = path_node(trusted, server, f"Assets/{A1}/Telemetry/mw")
        value = await mw.read_data_value(raise_on_bad_status=False)
        assert value.StatusCode.name == "BadWaitingForInitialData"  # no telemetry yet
    finally:
        await trusted.disconnect()


NOW = datetime.now(UTC)
REFUSED_CERTIFICATES: dict[str, tuple[dict[str, Any], str, str]] = {
    # case: (certificate, status, the reason logged)
    "untrusted": (
        {"common_name": "rogue", "application_uri": ROGUE_URI},
        "BadCertificateUntrusted",
        "self-signed and not in the trust list",
    ),
    "made again": (  # the trusted scada certificate's subject and URI, a new key
        {"common_name": "scada", "application_uri": CLIENT_URI},
        "BadCertificateUntrusted",
        "which holds another certificate with the same subject, SHA-1 thumbprint",
    ),
    "expired": (
        {
            "common_name": "stale",
            "application_uri": ROGUE_URI,
            "valid_from": NOW - timedelta(days=400),
        },
        "BadCertificateTimeInvalid",
        f"it expired at {NOW - timedelta(days=35):%Y-%m-%d}",
    ),
    "not yet valid": (
        {
            "common_name": "early",
            "application_uri": ROGUE_URI,
            "valid_from": NOW + timedelta(days=2),
        },
        "BadCertificateTimeInvalid",
        f"it is not valid before {NOW + timedelta(days=2):%Y-%m-%d %H:%M:%S}Z",
    ),
}


def _valid_from(made: ApplicationCertificate, start: datetime) -> ApplicationCertificate:
    """``made`` signed again by its own key, valid for 365 days from ``start`` (asyncua's
    cert_gen always starts a certificate now)."""
    cert = x509.load_der_x509_certificate(made.certificate_der)
    key = serialization.load_der_private_key(made.private_key_der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365))
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    again = builder.sign(key, hashes.SHA256())
    return ApplicationCertificate(
        certificate_der=again.public_bytes(serialization.Encoding.DER),
        private_key_der=made.private_key_der,
    )


@pytest.mark.parametrize("case", REFUSED_CERTIFICATES)
async def test_a_refused_client_certificate_is_one_warning_with_subject_thumbprint_and_reason(
    shared: Shared, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    made_with, status_name, reason = REFUSED_CERTIFICATES[case]
    made_with = dict(made_with)
    valid_from = made_with.pop("valid_from", None)
    made = make_application_certificate(**made_with)
    if valid_from is not None:
        made = _valid_from(made, valid_from)
    client = Client(shared.server.endpoint_url, timeout=5)
    client.application_uri = made_with["application_uri"]
    await client.set_security(
        SecurityPolicyBasic256Sha256, made.certificate_der, made.private_key_der
    )
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # the client's own check of its certificate, on the test's side
    with pytest.raises(UaStatusCodeError) as refused:
        await client.connect()
    assert code_of(refused.value) == status_name

    server_side = [r for r in caplog.records if not r.name.startswith("asyncua.client")]
    warnings = [r for r in server_side if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [f"{r.name} {r.levelname} {r.getMessage()}" for r in warnings]
    (warning,) = warnings
    message = warning.getMessage()
    subject = x509.load_der_x509_certificate(made.certificate_der).subject.rfc4514_string()
    sha1 = hashlib.sha1(made.certificate_der).hexdigest().upper()
    assert warning.levelno == logging.WARNING and warning.name == "der.opcua.security"
    assert message.startswith(f"OPC UA client certificate refused ({status_name}): "), message
    assert reason in message, message
    assert f"certificate {subject} (SHA-1 thumbprint {sha1})" in message, message
    assert f"application {made_with['application_uri']}" in message, message
    assert "\n" not in message
    for record in server_side:
        assert record.exc_info is None and record.exc_text is None, record.getMessage()
        assert "basicConstraints" not in record.getMessage()


async def test_security_policy_none_is_off_by_default(shared: Shared, pki: Pki) -> None:
    server = shared.server
    endpoints = await Client(server.endpoint_url).connect_and_get_server_endpoints()
    policies = {e.SecurityPolicyUri.rsplit("#", 1)[1] for e in endpoints}
    modes = {e.SecurityMode for e in endpoints}
    assert policies == {"Basic256Sha256"} and ua.MessageSecurityMode.None_ not in modes

    # asyncua's client refuses on its own (no matching endpoint)...
    with pytest.raises((UaError, ConnectionError)):
        await Client(server.endpoint_url, timeout=5).connect()
    # ...and the server refuses a client that skips that check: the None channel it keeps
    # for discovery carries no session.
    with pytest.raises(UaStatusCodeError) as refused:
        await session_on_a_discovery_channel(server.endpoint_url)
    assert code_of(refused.value) == "BadSecurityModeRejected"


async def session_on_a_discovery_channel(url: str) -> None:
    """Create and activate an anonymous session on a security policy None channel, and read,
    the way asyncua's client would if it did not check the server's endpoints first."""
    client = Client(url, timeout=5)
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        description = ua.ApplicationDescription()
        description.ApplicationUri = "urn:der-sdk:test:plain"
        description.ApplicationType = ua.ApplicationType.Client
        params = ua.CreateSessionParameters()
        params.ClientDescription = description
        params.EndpointUrl = url
        params.SessionName = "plain"
        params.RequestedSessionTimeout = 60_000
        params.ClientNonce = create_nonce(32)
        await client.uaclient.create_session(params)
        activate = ua.ActivateSessionParameters()
        activate.UserIdentityToken = ua.AnonymousIdentityToken()
        activate.UserIdentityToken.PolicyId = "anonymous"
        await client.uaclient.activate_session(activate)
        await client.nodes.server_state.read_value()
    finally:
        client.disconnect_socket()


async def test_allow_insecure_enables_none_and_says_so(
    edge: Starter, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="der.opcua.server"):
        server = await edge(allow_insecure=True)
    assert "security policy None is enabled (allow_insecure: true)" in caplog.text
    await session_on_a_discovery_channel(server.endpoint_url)
    plain = Client(server.endpoint_url, timeout=5)
    await plain.connect()
    try:
        node = path_node(plain, server, f"Assets/{A1}/Controls/SetpointMW")
        with pytest.raises(UaStatusCodeError) as refused:  # anonymous still may not write
            await write(node, 0.1)
        assert code_of(refused.value) == "BadUserAccessDenied"
    finally:
        await plain.disconnect()


async def test_anonymous_may_read_but_never_write(shared: Shared, pki: Pki) -> None:
    dispatch, server = shared.dispatch, shared.server
    client = await secure_client(server.endpoint_url, pki)
    await client.connect()
    try:
        node = path_node(client, server, f"Assets/{A1}/Controls/SetpointMW")
        await node.read_data_value(raise_on_bad_status=False)
        with pytest.raises(UaStatusCodeError) as refused:
            await write(node, 0.2)
        assert code_of(refused.value) == "BadUserAccessDenied"
        site = path_node(client, server, "Site/Controls/SiteDispatchMW")
        with pytest.raises(UaStatusCodeError):
            await write(site, 1.0)
    finally:
        await client.disconnect()
    assert dispatch.calls == []


async def test_anonymous_sessions_can_be_refused(edge: Starter, pki: Pki) -> None:
    server = await edge(allow_anonymous=False)
    client = await secure_client(server.endpoint_url, pki)
    with pytest.raises(UaStatusCodeError) as refused:
        await client.connect()
    assert code_of(refused.value) == "BadIdentityTokenRejected"


async def test_a_wrong_password_is_refused(shared: Shared, pki: Pki) -> None:
    server = shared.server
    client = await secure_client(server.endpoint_url, pki, user=(USER[0], "wrong"))
    with pytest.raises(UaStatusCodeError) as refused:
        await client.connect()
    assert code_of(refused.value) == "BadUserAccessDenied"


async def test_a_trusted_user_certificate_may_write_an_untrusted_one_may_not_log_in(
    shared: Shared, pki: Pki
) -> None:
    dispatch, server = shared.dispatch, shared.server
    client = await secure_client(server.endpoint_url, pki)
    await client.load_client_certificate(str(pki.client_cert))
    await client.load_private_key(str(pki.client_key))
    await client.connect()
    try:
        await write(path_node(client, server, f"Assets/{A2}/Controls/SetpointMW"), 1.0)
    finally:
        await client.disconnect()
    assert dispatch.calls == [(A2, None, 1.0, 900)]

    stranger = await secure_client(server.endpoint_url, pki)
    await stranger.load_client_certificate(str(pki.rogue_cert))
    await stranger.load_private_key(str(pki.rogue_key))
    with pytest.raises(UaStatusCodeError) as refused:
        await stranger.connect()
    assert code_of(refused.value) == "BadUserAccessDenied"


# --------------------------------------------------------------------------- writes


async def test_a_user_write_dispatches_and_reads_back_what_was_applied(
    shared: Shared, pki: Pki
) -> None:
    dispatch, server = shared.dispatch, shared.server
    client = await secure_client(server.endpoint_url, pki, user=USER)
    await client.connect()
    try:
        setpoint = path_node(client, server, f"Assets/{A1}/Controls/SetpointMW")
        await write(setpoint, 0.8)  # A1 is limited to 0.5 MW
        assert dispatch.calls == [(A1, None, 0.8, 900)]
        assert await setpoint.read_value() == pytest.approx(0.5)

        site = path_node(client, server, "Site/Controls/SiteDispatchMW")
        await write(site, 2.0)
        assert dispatch.calls[-1] == (None, SITE, 2.0, 900)
        alloc = [
            await path_node(client, server, f"Site/Allocations/{a}/MW").read_value()
            for a in (A1, A2)
        ]
        assert alloc == [pytest.approx(0.5), pytest.approx(1.0)]
        assert await site.read_value() == pytest.approx(1.5)  # what the split placed
        assert await setpoint.read_value() == pytest.approx(0.5)
    finally:
        await client.disconnect()


async def test_read_only_nodes_refuse_writes_even_from_users(shared: Shared, pki: Pki) -> None:
    dispatch, server = shared.dispatch, shared.server
    client = await secure_client(server.endpoint_url, pki, user=USER)
    await client.connect()
    try:
        for path in (
            f"Assets/{A1}/Telemetry/mw",
            f"Assets/{A1}/Status/FaultCode",
            f"Site/Allocations/{A1}/MW",
        ):
            node = path_node(client, server, path)
            value: Any = "x" if path.endswith("FaultCode") else 1.0
            with pytest.raises(UaStatusCodeError) as refused:
                await node.write_value(value)
            assert code_of(refused.value) in ("BadUserAccessDenied", "BadNotWritable"), path
    finally:
        await client.disconnect()
    assert dispatch.calls == []


@pytest.mark.parametrize(
    ("status", "code"), [("rejected", "BadOutOfRange"), ("failed", "BadDeviceFailure")]
)
async def test_a_command_the_agent_does_not_apply_fails_the_write(
    shared: Shared, pki: Pki, status: str, code: str
) -> None:
    dispatch, server = shared.dispatch, shared.server
    client = await secure_client(server.endpoint_url, pki, user=USER)
    await client.connect()
    try:
        node = path_node(client, server, f"Assets/{A2}/Controls/SetpointMW")
        await write(node, 1.0)
        dispatch.status = status
        with pytest.raises(UaStatusCodeError) as refused:
            await write(node, 1.5)
        assert code_of(refused.value) == code
        assert await node.read_value() == pytest.approx(1.0)  # still the value in force
    finally:
        await client.disconnect()


async def test_a_value_that_is_not_a_finite_number_is_refused(shared: Shared, pki: Pki) -> None:
    dispatch, server = shared.dispatch, shared.server
    client = await secure_client(server.endpoint_url, pki, user=USER)
    await client.connect()
    try:
        node = path_node(client, server, f"Assets/{A2}/Controls/SetpointMW")
        await write(node, 1.0)
        with pytest.raises(UaStatusCodeError) as refused:
            await write(node, math.nan)
        assert code_of(refused.value) == "BadOutOfRange"
        assert await node.read_value() == pytest.approx(1.0)  # the value in force is back
    finally:
        await client.disconnect()
    assert dispatch.calls == [(A2, None, 1.0, 900)]


# --------------------------------------------------------------------------- telemetry


def sample(asset_id: str, **fields: Any) -> TelemetrySample:
    base: dict[str, Any] = {
        "asset_id": asset_id,
        "site_id": SITE,
        "ts": datetime.now(UTC),
        "mw": 0.25,
        "mw_setpoint": 0.25,
        "status": "discharging",
        "details": {"soc_pct": 48.5, "station_state": "ok", "cells": [1, 2]},
    }
    base.update(fields)
    return TelemetrySample(**base)


async def test_telemetry_shows_in_the_address_space(shared: Shared, pki: Pki) -> None:
    server = shared.server
    client = await secure_client(server.endpoint_url, pki)
    await client.connect()
    try:
        samples = [sample(A1), sample(A2, mw=-1.0, mw_setpoint=-1.0)]
        await shared.loop.call(lambda: server.on_telemetry(samples))
        idx = server.namespace_index
        soc = await eventually(
            lambda: _child(client, idx, ["Assets", A1, "Telemetry", "soc_pct"]),
            what="details.soc_pct to appear",
        )
        assert await soc.read_value() == pytest.approx(48.5)
        read = {
            p: await path_node(client, server, f"Assets/{A1}/{p}").read_value()
            for p in (
                "Telemetry/mw",
                "Telemetry/status",
                "Telemetry/station_state",
                "Telemetry/cells",
                "Status/Online",
                "Status/Quality",
                "Controls/SetpointMW",
            )
        }
        assert read == {
            "Telemetry/mw": 0.25,
            "Telemetry/status": "discharging",
            "Telemetry/station_state": "ok",
            "Telemetry/cells": "[1,2]",
            "Status/Online": True,
            "Status/Quality": "good",
            "Controls/SetpointMW": 0.25,
        }
        assert isinstance(
            await path_node(client, server, f"Assets/{A1}/Status/LastSeen").read_value(), datetime
        )
        site = path_node(client, server, "Site/Controls/SiteDispatchMW")
        assert await eventually(site.read_value, what="the site total") == pytest.approx(-0.75)

        bad = sample(A1, mw=0.0, mw_setpoint=None, online=False, quality="bad")
        bad.quality_reason = "adapter 'opcua' failed to read: timed out"
        bad.details = {}
        await shared.loop.call(lambda: server.on_telemetry([bad]))
        mw = path_node(client, server, f"Assets/{A1}/Telemetry/mw")

        async def bad_status() -> bool:
            value = await mw.read_data_value(raise_on_bad_status=False)
            return bool(value.StatusCode.is_bad())

        await eventually(bad_status, what="mw to go bad")
        stale = await soc.read_data_value(raise_on_bad_status=False)
        assert stale.StatusCode.is_bad()  # details are not shown as fresh either
        assert await path_node(client, server, f"Assets/{A1}/Status/Online").read_value() is False
        reason = path_node(client, server, f"Assets/{A1}/Status/QualityReason")
        assert "timed out" in await reason.read_value()
    finally:
        await client.disconnect()


async def _child(client: Client, idx: int, names: list[str]) -> Any:
    try:
        return await client.nodes.objects.get_child([f"{idx}:{n}" for n in names])
    except UaStatusCodeError:
        return None
