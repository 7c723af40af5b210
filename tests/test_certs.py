"""``der_sdk.certs`` and ``der certs``: what the certificates contain, how files are
written, how identities are spelled, and that the CLI's fingerprint is the one the headend
computes from a live connection."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from der_sdk import certs
from der_sdk.errors import DerSdkError
from der_sdk.plugins import load_plugins
from der_sdk.testing import certs as bad_certs
from der_sdk.wire import codec, pb_grpc
from der_sdk_headend import Headend, HeadendConfig
from der_sdk_headend.link.identity import peer_identity

SITE = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
ASSET = "00000000-0000-4000-8000-000000000001"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# ----------------------------------------------------------------------------- the library


def test_init_ca_makes_a_ten_year_p256_ca_with_a_private_key_file(tmp_path: Path) -> None:
    ca = certs.init_ca(tmp_path)
    cert = ca.certificate
    assert ca.cert_path == tmp_path / "ca.pem" and ca.key_path == tmp_path / "ca.key"
    assert mode(ca.key_path) == 0o600
    assert cert.subject.rfc4514_string() == "CN=der-sdk development CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= life <= dt.timedelta(days=3651)


def test_init_ca_refuses_to_replace_a_ca_unless_forced(tmp_path: Path) -> None:
    first = certs.init_ca(tmp_path)
    with pytest.raises(DerSdkError, match=r"already exists.*--force"):
        certs.init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == first.cert_pem
    second = certs.init_ca(tmp_path, force=True)
    assert second.fingerprint != first.fingerprint


def test_key_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        certs.init_ca(tmp_path)
        agent = certs.issue_agent(tmp_path, SITE)
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(agent.key_path) == 0o600
    assert mode(agent.cert_path) == 0o644


def test_an_agent_certificate_names_the_agent_and_its_site(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    agent = certs.issue_agent(tmp_path, SITE.upper(), days=30)
    cert = agent.certificate
    assert agent.subject == f"CN=agent-{SITE}"
    assert agent.cert_path.name == f"agent-{SITE}.pem"
    assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:der:site:{SITE}"
    ]
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer.rfc4514_string() == "CN=der-sdk development CA"
    life = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < life <= dt.timedelta(days=30)
    named = certs.issue_agent(tmp_path, SITE, agent_id="gw-north")
    assert named.subject == "CN=gw-north" and named.cert_path.name == "agent-gw-north.pem"


def test_issuing_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    certs.issue_agent(tmp_path, SITE)
    with pytest.raises(DerSdkError, match=r"already exist.*--force.*new fingerprint"):
        certs.issue_agent(tmp_path, SITE)
    certs.issue_agent(tmp_path, SITE, force=True)


def test_a_headend_certificate_has_dns_and_ip_names(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    headend = certs.issue_headend(tmp_path, ["localhost", "127.0.0.1", "[::1]", "h.example"])
    names = sans(headend.certificate)
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "h.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert eku(headend.certificate) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert headend.subject == "CN=localhost"


def test_issuing_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(DerSdkError, match=r"no development CA .* der certs init --dir"):
        certs.issue_agent(tmp_path, SITE)
    with pytest.raises(DerSdkError, match="is not a UUID"):
        certs.issue_agent(tmp_path, "north-yard")


def test_fingerprint_is_the_sha256_of_the_der_certificate(tmp_path: Path) -> None:
    ca = certs.init_ca(tmp_path)
    der = ca.certificate.public_bytes(serialization.Encoding.DER)
    expected = "sha256:" + hashlib.sha256(der).hexdigest()
    assert certs.fingerprint(ca.cert_pem) == expected
    assert certs.fingerprint(ca.cert_pem.decode()) == expected
    assert ca.fingerprint == expected
    with pytest.raises(ValueError, match="not a PEM certificate"):
        certs.fingerprint(b"junk")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("sha256:" + "AB" * 32, "sha256:" + "ab" * 32),
        ("SHA256:" + ":".join(["ab"] * 32), "sha256:" + "ab" * 32),
    ],
)
def test_fingerprints_are_read_in_the_forms_people_paste(text: str, canonical: str) -> None:
    assert certs.canonical_fingerprint(text) == canonical


@pytest.mark.parametrize(
    "text", ["ab" * 32, "sha1:" + "ab" * 20, "sha256:abc", "sha256:" + "zz" * 32]
)
def test_malformed_fingerprints_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"sha256:<64 hex digits>|64 hex digits"):
        certs.canonical_fingerprint(text)


def test_subjects_compare_in_rfc4514_form(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    agent = certs.issue_agent(tmp_path, SITE, agent_id="gw north, east")
    assert agent.subject == "CN=gw north\\, east"
    assert certs.canonical_subject("CN = gw north\\, east") == agent.subject
    with pytest.raises(ValueError, match="RFC 4514"):
        certs.canonical_subject("gw-north")


def test_agent_tokens_are_random_and_stored_as_their_sha256() -> None:
    token, digest = certs.new_agent_token()
    other, _ = certs.new_agent_token()
    assert token != other and len(token) > 40
    assert digest == hashlib.sha256(token.encode()).hexdigest() == certs.token_sha256(token)
    assert certs.canonical_token_sha256(digest.upper()) == digest


def test_reading_names_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    ca = certs.init_ca(tmp_path)
    with pytest.raises(DerSdkError, match=r"^X=missing.pem: file not found"):
        certs.read_certificates(tmp_path / "missing.pem", "X=missing.pem")
    with pytest.raises(DerSdkError, match="no valid PEM certificate"):
        certs.read_certificates(ca.key_path, "X")
    with pytest.raises(DerSdkError, match="not a valid PEM private key"):
        certs.read_private_key(ca.cert_path, "K")
    encrypted = tmp_path / "encrypted.pem"
    _, key = certs.read_private_key(ca.key_path, "K")
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(DerSdkError, match="encrypted; gRPC needs an unencrypted"):
        certs.read_private_key(encrypted, "K")


def test_the_bad_certificates_are_bad_in_one_way_each(tmp_path: Path) -> None:
    ca = certs.init_ca(tmp_path)
    now = dt.datetime.now(dt.UTC)
    self_signed = bad_certs.self_signed_agent(tmp_path / "self", SITE).certificate
    assert self_signed.issuer == self_signed.subject
    assert eku(self_signed) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    other = bad_certs.agent_from_other_ca(tmp_path / "other", SITE).certificate
    assert other.issuer == ca.certificate.subject  # the same name, another key
    assert certs.fingerprint(tmp_path.joinpath("other", "other-ca", "ca.pem").read_bytes()) != (
        ca.fingerprint
    )
    expired = bad_certs.expired_agent(tmp_path, SITE).certificate
    assert expired.not_valid_after_utc < now and expired.issuer == ca.certificate.subject
    future = bad_certs.not_yet_valid_agent(tmp_path, SITE).certificate
    assert future.not_valid_before_utc > now


# ----------------------------------------------------------------------------- the CLI


def der(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "der_sdk.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_der_certs_end_to_end_and_the_headend_computes_the_same_fingerprint(
    tmp_path: Path,
) -> None:
    assert der("certs", "init", cwd=tmp_path).returncode == 0
    again = der("certs", "init", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    headend = der("certs", "issue-headend", "localhost", "127.0.0.1", cwd=tmp_path)
    assert headend.returncode == 0, headend.stderr
    assert "names:               localhost, 127.0.0.1" in headend.stdout
    agent = der(
        "certs", "issue-agent", SITE, "--agent-id", "gw-north", "--days", "90", cwd=tmp_path
    )
    assert agent.returncode == 0, agent.stderr
    folder = tmp_path / "der-certs"
    assert mode(folder / "ca.key") == mode(folder / "agent-gw-north.key") == 0o600

    printed = re.search(r"^fingerprint:\s+(sha256:[0-9a-f]{64})$", agent.stdout, re.M)
    assert printed, agent.stdout
    pem = (folder / "agent-gw-north.pem").read_bytes()
    assert printed.group(1) == certs.fingerprint(pem)
    assert "subject:           CN=gw-north" in agent.stdout
    assert printed.group(1) == peer_identity({"x509_pem_cert": [pem]}, "fingerprint")
    openssl = shutil.which("openssl")
    if openssl:
        pem_path = str(folder / "agent-gw-north.pem")
        out = subprocess.run(
            [openssl, "x509", "-noout", "-fingerprint", "-sha256", "-in", pem_path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert certs.canonical_fingerprint("sha256:" + out.split("=", 1)[1]) == printed.group(1)

    show = der("certs", "show", str(folder / "agent-gw-north.pem"), cwd=tmp_path)
    assert show.returncode == 0 and printed.group(1) in show.stdout
    assert f"urn:der:site:{SITE}" in show.stdout

    # The snippet der certs printed, pasted into an inventory, binds the agent: the
    # headend computes the same fingerprint from the live connection and accepts it.
    snippet = agent.stdout.split("(ASSETS_PATH):\n", 1)[1].split("\n\n", 1)[0]
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(
        f"sites:\n{snippet}\n    name: North Yard\n"
        + f"assets:\n  - {{asset_id: {ASSET}, site_id: {SITE}, name: B, max_mw: 1, min_mw: -1}}\n"
    )
    asyncio.run(_register_over_mtls(tmp_path, inventory, folder))


async def _register_over_mtls(tmp_path: Path, inventory: Path, folder: Path) -> None:
    config = HeadendConfig.from_env(
        {
            "ASSETS_PATH": str(inventory),
            "DATABASE_URL": "memory://",
            "HEADEND_GRPC_ADDR": "127.0.0.1:0",
            "HEADEND_HTTP_ADDR": "127.0.0.1:0",
            "HEADEND_AUTH": "off",
            "HEADEND_TOKENS_FILE": str(tmp_path / "tokens.json"),
            "HEADEND_TLS_CERT": str(folder / "headend.pem"),
            "HEADEND_TLS_KEY": str(folder / "headend.key"),
            "HEADEND_CLIENT_CA": str(folder / "ca.pem"),
        }
    )
    headend = Headend(config, plugins=load_plugins(entry_points=False, env={}))
    await headend.start()
    try:
        credentials = grpc.ssl_channel_credentials(
            (folder / "ca.pem").read_bytes(),
            (folder / "agent-gw-north.key").read_bytes(),
            (folder / "agent-gw-north.pem").read_bytes(),
        )
        async with grpc.aio.secure_channel(f"localhost:{headend.grpc_port}", credentials) as ch:
            call = pb_grpc.AgentLinkStub(ch).Stream()
            await call.write(
                codec.agent_register(
                    agent_id="gw-north", site_id=SITE, assets={ASSET: "sim-bess"},
                    sdk_version="test", plugins={},
                )
            )  # fmt: skip
            ack = (await asyncio.wait_for(call.read(), 5)).register_ack
            assert ack.accepted, ack.message
            call.cancel()
    finally:
        await headend.stop()
