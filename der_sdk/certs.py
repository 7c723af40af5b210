"""Certificates for the agent link: a development CA, agent and headend certificates, and
the names the headend binds agents by (fingerprint, subject).

**A development aid.** :func:`init_ca` makes a small CA on disk so that TLS and mutual
TLS can be tried and tested without an existing PKI; in production the operator's PKI
issues the headend's server certificate and each agent's client certificate, and this
module is only used to read them (:func:`read_certificates`, :func:`read_private_key`)
and to name them (:func:`fingerprint`, :func:`subject`).

Files in a certificate folder (``der certs --dir``, default ``der-certs``):

==============================  =====================================================
file                            what
==============================  =====================================================
``ca.pem``, ``ca.key``          the development CA (EC P-256, 10 years)
``agent-<id>.pem``, ``.key``    an agent's client certificate: CN = agent id, SAN URI
                                ``urn:der:site:<site_id>``, extended key usage clientAuth
``headend.pem``, ``.key``       the headend's server certificate: SANs = the DNS names
                                and IP addresses given, extended key usage serverAuth
==============================  =====================================================

Private keys are written with mode 0600 and never overwritten unless asked (``force``).

An agent is named by its certificate in one of two ways (``AGENT_IDENTITY``):

* ``fingerprint``: ``sha256:<64 lower-case hex digits>``, the SHA-256 of the certificate
  (DER). Pins one certificate: a renewed certificate needs a new inventory entry.
* ``subject``: the subject as an RFC 4514 string (``CN=agent-north,O=Acme``). Any
  certificate the CA issues with that subject matches, so renewal needs no inventory
  edit; the CA must then never issue that subject to anyone else.

Everything here is synchronous file and CPU work: the CLI and start-up use it before an
event loop runs, and the headend derives a connected agent's identity with
:func:`fingerprint` / :func:`subject` (microseconds, no I/O).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
import stat
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from der_sdk.errors import DerSdkError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CA_NAME",
    "DEFAULT_AGENT_DAYS",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CERTS_DIR",
    "HEADEND_CERT_FILE",
    "HEADEND_KEY_FILE",
    "SITE_URN_PREFIX",
    "CertificateAuthority",
    "IssuedCert",
    "agent_files",
    "canonical_fingerprint",
    "canonical_subject",
    "canonical_token_sha256",
    "check_key_pair",
    "fingerprint",
    "init_ca",
    "issue_agent",
    "issue_headend",
    "key_file_too_open",
    "new_agent_token",
    "new_private_key",
    "read_certificates",
    "read_private_key",
    "self_signed_ca",
    "subject",
    "token_sha256",
    "validity_problem",
    "write_pair",
]

DEFAULT_CERTS_DIR = "der-certs"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
HEADEND_CERT_FILE = "headend.pem"
HEADEND_KEY_FILE = "headend.key"
CA_NAME = "der-sdk development CA"
DEFAULT_CA_DAYS = 3650
DEFAULT_AGENT_DAYS = 825
"""The longest validity browsers ever accepted for a leaf; a sane ceiling for a dev cert."""
SITE_URN_PREFIX = "urn:der:site:"
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before now, so a peer whose clock is a little behind
does not see them as not yet valid."""

PemInput: TypeAlias = bytes | str
PrivateKey: TypeAlias = CertificateIssuerPrivateKeyTypes

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEPARATOR_SPACES = re.compile(r"\s*(?<!\\)([,+=])\s*")


# ----------------------------------------------------------------------------- names


def _first_certificate(cert_pem: PemInput) -> x509.Certificate:
    data = cert_pem.encode("ascii") if isinstance(cert_pem, str) else cert_pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate: {exc}") from None


def fingerprint(cert_pem: PemInput | x509.Certificate) -> str:
    """``sha256:<hex>`` of the (first) certificate in ``cert_pem``, over its DER form.

    The same value as ``openssl x509 -noout -fingerprint -sha256`` without the colons,
    in lower case.

    :raises ValueError: ``cert_pem`` holds no PEM certificate.
    """
    cert = cert_pem if isinstance(cert_pem, x509.Certificate) else _first_certificate(cert_pem)
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def subject(cert_pem: PemInput | x509.Certificate) -> str:
    """The subject of the (first) certificate in ``cert_pem`` as an RFC 4514 string.

    :raises ValueError: ``cert_pem`` holds no PEM certificate.
    """
    cert = cert_pem if isinstance(cert_pem, x509.Certificate) else _first_certificate(cert_pem)
    return cert.subject.rfc4514_string()


def canonical_fingerprint(text: str) -> str:
    """``text`` as ``sha256:<64 lower-case hex digits>``.

    Accepts the form :func:`fingerprint` prints, upper case, and OpenSSL's colon-separated
    hex (``sha256:AB:CD:...``).

    :raises ValueError: not a SHA-256 fingerprint; the message says what is expected.
    """
    raw = text.strip()
    algorithm, sep, digits = raw.partition(":")
    if not sep or algorithm.lower() != "sha256":
        raise ValueError(
            f"{text!r} is not a certificate fingerprint; expected sha256:<64 hex digits> "
            "(`der certs issue-agent` prints it)"
        )
    digits = digits.replace(":", "").lower()
    if not _HEX64.fullmatch(digits):
        raise ValueError(
            f"{text!r}: a SHA-256 fingerprint has 64 hex digits after 'sha256:', "
            f"got {len(digits)} characters"
        )
    return f"sha256:{digits}"


def canonical_subject(text: str) -> str:
    """An RFC 4514 subject (``CN=agent-1,O=Acme``) in the form :func:`subject` gives.

    :raises ValueError: not an RFC 4514 distinguished name.
    """
    if not text.strip():
        raise ValueError("an empty subject names no certificate")
    # OpenSSL prints "CN = gw-north, O = Acme": spaces around separators are not part of
    # RFC 4514 but are what people paste.
    compact = _SEPARATOR_SPACES.sub(r"\1", text.strip())
    try:
        name = x509.Name.from_rfc4514_string(compact)
    except ValueError as exc:
        detail = f": {exc}" if str(exc) else ""
        raise ValueError(
            f"{text!r} is not an RFC 4514 subject like 'CN=agent-north,O=Acme'{detail}"
        ) from None
    return name.rfc4514_string()


def canonical_token_sha256(text: str) -> str:
    """The SHA-256 of an agent token as 64 lower-case hex digits.

    :raises ValueError: not 64 hex digits.
    """
    digits = text.strip().lower()
    if not _HEX64.fullmatch(digits):
        raise ValueError(
            f"expected the SHA-256 of the agent's token as 64 hex digits, got "
            f"{len(digits)} characters (`der certs agent-token` makes a token and its hash)"
        )
    return digits


def token_sha256(token: str) -> str:
    """The SHA-256 of ``token`` (UTF-8) as 64 lower-case hex digits: what the inventory
    stores instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_agent_token() -> tuple[str, str]:
    """A fresh random agent token (256 bits, URL-safe text) and its :func:`token_sha256`."""
    token = "dera_" + secrets.token_urlsafe(32)
    return token, token_sha256(token)


# ----------------------------------------------------------------------------- reading


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DerSdkError(f"{what}: file not found (working directory: {os.getcwd()})") from None
    except IsADirectoryError:
        raise DerSdkError(f"{what}: is a directory, expected a PEM file") from None
    except PermissionError:
        raise DerSdkError(f"{what}: permission denied; check the file's permissions") from None
    except OSError as exc:
        raise DerSdkError(f"{what}: cannot be read: {exc.strerror or exc}") from None


def read_certificates(
    path: str | os.PathLike[str], what: str
) -> tuple[bytes, list[x509.Certificate]]:
    """The PEM bytes at ``path`` and the certificates in them (a chain or a CA bundle).

    :param what: how to name the file in errors, e.g. ``"HEADEND_TLS_CERT=/etc/der/h.pem"``.
    :raises DerSdkError: unreadable, or no valid PEM certificate in it.
    """
    data = _read_bytes(Path(path), what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        certs, problem = [], f" ({exc})"
    else:
        problem = ""
    if not certs:
        raise DerSdkError(
            f"{what}: no valid PEM certificate in it{problem}; expected '-----BEGIN "
            "CERTIFICATE-----' blocks"
        )
    return data, certs


def read_private_key(path: str | os.PathLike[str], what: str) -> tuple[bytes, PrivateKeyTypes]:
    """The PEM bytes at ``path`` and the (unencrypted) private key in them.

    :raises DerSdkError: unreadable, not a PEM private key, or encrypted (gRPC needs the
        key in clear; protect the file with its permissions).
    """
    data = _read_bytes(Path(path), what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DerSdkError(
            f"{what}: the private key is encrypted; gRPC needs an unencrypted PEM key "
            "(protect it with file permissions, mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DerSdkError(
            f"{what}: not a valid PEM private key ({exc}); expected '-----BEGIN PRIVATE "
            "KEY-----' (or EC/RSA PRIVATE KEY)"
        ) from None
    return data, key


def check_key_pair(
    cert: x509.Certificate, key: PrivateKeyTypes, cert_what: str, key_what: str
) -> None:
    """:raises DerSdkError: ``key`` is not the private key of ``cert``."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise DerSdkError(
            f"{key_what} is not the private key of the certificate in {cert_what}; "
            "use the key file issued with that certificate"
        )


def key_file_too_open(path: str | os.PathLike[str]) -> bool:
    """Whether the private key file at ``path`` can be read by its group or others."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


# ----------------------------------------------------------------------------- writing


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # the umask may have taken bits off; set exactly
        handle.write(data)


@dataclass(frozen=True)
class IssuedCert:
    """A certificate written to disk, with the names the headend knows it by."""

    cert_path: Path
    key_path: Path
    cert_pem: bytes
    certificate: x509.Certificate

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` (:func:`fingerprint`)."""
        return fingerprint(self.certificate)

    @property
    def subject(self) -> str:
        """The RFC 4514 subject (:func:`subject`)."""
        return subject(self.certificate)

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


def write_pair(
    directory: str | os.PathLike[str],
    stem: str,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    force: bool = False,
) -> IssuedCert:
    """Write ``<stem>.pem`` (mode 0644) and ``<stem>.key`` (mode 0600) in ``directory``.

    :raises DerSdkError: either file exists and ``force`` is false.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    cert_path = folder / f"{stem}.pem"
    key_path = folder / f"{stem}.key"
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise DerSdkError(
            f"{' and '.join(existing)} already exist; pass --force to replace them "
            "(a replaced agent certificate has a new fingerprint: update the inventory)"
        )
    _write(key_path, _key_pem(key), 0o600)
    pem = _cert_pem(cert)
    _write(cert_path, pem, 0o644)
    return IssuedCert(cert_path=cert_path, key_path=key_path, cert_pem=pem, certificate=cert)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def validity_problem(cert: x509.Certificate, now: dt.datetime | None = None) -> str | None:
    """Why ``cert`` is outside its validity period at ``now`` (default: this moment), as the
    end of a sentence about it ("expired on ...", "is not valid before ..."), else ``None``."""
    now = now or _now()
    if cert.not_valid_after_utc <= now:
        return f"expired on {cert.not_valid_after_utc.isoformat()}"
    if cert.not_valid_before_utc > now:
        return (
            f"is not valid before {cert.not_valid_before_utc.isoformat()} "
            "(is this machine's clock right?)"
        )
    return None


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA that signs certificates: its certificate and private key."""

    certificate: x509.Certificate
    key: PrivateKey
    directory: Path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """The CA :func:`init_ca` wrote in ``directory``.

        :raises DerSdkError: there is none, or its files are unreadable or do not match.
        """
        folder = Path(directory)
        cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
        if not cert_path.exists() or not key_path.exists():
            raise DerSdkError(
                f"no development CA in {folder} ({CA_CERT_FILE} and {CA_KEY_FILE}); "
                f"create one with: der certs init --dir {folder}"
            )
        _, certs = read_certificates(cert_path, str(cert_path))
        _, key = read_private_key(key_path, str(key_path))
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise DerSdkError(f"{key_path}: a CA key must be EC or RSA")
        check_key_pair(certs[0], key, str(cert_path), str(key_path))
        return cls(certificate=certs[0], key=key, directory=folder)

    def sign(
        self,
        *,
        subject_name: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        not_before: dt.datetime,
        not_after: dt.datetime,
        sans: Sequence[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> x509.Certificate:
        """A leaf certificate (not a CA) for ``public_key``, signed by this CA.

        The dates are taken as given (tests make expired and not-yet-valid certificates).
        """
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject_name)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.certificate.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())


def self_signed_ca(
    name: str = CA_NAME, *, days: int = DEFAULT_CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA certificate (EC P-256, ``days`` long) and its key, not written."""
    key = new_private_key()
    subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(subject_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def init_ca(
    directory: str | os.PathLike[str] = DEFAULT_CERTS_DIR,
    *,
    force: bool = False,
    days: int = DEFAULT_CA_DAYS,
) -> IssuedCert:
    """Create the development CA in ``directory``: ``ca.pem`` and ``ca.key`` (0600).

    :raises DerSdkError: a CA is already there and ``force`` is false (replacing it
        invalidates every certificate it issued).
    """
    folder = Path(directory)
    existing = [p for p in (folder / CA_CERT_FILE, folder / CA_KEY_FILE) if p.exists()]
    if existing and not force:
        raise DerSdkError(
            f"a CA already exists in {folder} ({', '.join(p.name for p in existing)}); "
            "pass --force to replace it: every certificate it issued stops being trusted"
        )
    cert, key = self_signed_ca(days=days)
    return write_pair(folder, "ca", cert, key, force=True)


def _positive_days(days: int) -> int:
    if days < 1:
        raise DerSdkError(f"--days must be at least 1, got {days}")
    return days


def agent_files(agent_id: str) -> str:
    """The file stem of an agent's certificate: ``agent-<agent_id>`` made safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", agent_id)
    return safe if safe.startswith("agent-") else f"agent-{safe}"


def issue_agent(
    directory: str | os.PathLike[str],
    site_id: str,
    *,
    agent_id: str | None = None,
    days: int = DEFAULT_AGENT_DAYS,
    force: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCert:
    """An agent's client certificate signed by the CA in ``directory``.

    Subject CN = ``agent_id`` (default ``agent-<site_id>``), SAN URI
    ``urn:der:site:<site_id>``, extended key usage clientAuth, EC P-256 key. Written as
    ``agent-<id>.pem`` and ``agent-<id>.key``.

    :param not_before, not_after: override the validity (tests); default now - 5 min to
        now + ``days``.
    :raises DerSdkError: no CA in ``directory``, ``site_id`` is not a UUID, or the files
        exist and ``force`` is false.
    """
    try:
        site = str(uuid.UUID(site_id))
    except ValueError:
        raise DerSdkError(
            f"SITE_ID {site_id!r} is not a UUID; use the site_id from the inventory"
        ) from None
    name = agent_id if agent_id is not None else f"agent-{site}"
    if not name.strip():
        raise DerSdkError("--agent-id must not be empty")
    ca = CertificateAuthority.load(directory)
    key = new_private_key()
    now = _now()
    cert = ca.sign(
        subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
        public_key=key.public_key(),
        not_before=not_before or now - CLOCK_SKEW,
        not_after=not_after or now + dt.timedelta(days=_positive_days(days)),
        sans=[x509.UniformResourceIdentifier(SITE_URN_PREFIX + site)],
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return write_pair(directory, agent_files(name), cert, key, force=force)


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip().strip("[]")
        if not host:
            raise DerSdkError("an empty HOST names nothing; give DNS names or IP addresses")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            try:
                names.append(x509.DNSName(host.encode("idna").decode("ascii")))
            except UnicodeError:
                raise DerSdkError(
                    f"HOST {host!r} is neither an IP address nor a DNS name"
                ) from None
    return names


def issue_headend(
    directory: str | os.PathLike[str],
    hosts: Sequence[str],
    *,
    days: int = DEFAULT_AGENT_DAYS,
    force: bool = False,
) -> IssuedCert:
    """The headend's server certificate signed by the CA in ``directory``.

    Subject CN = the first host; SANs: every host, as an IP address when it is one, else
    a DNS name; extended key usage serverAuth. Written as ``headend.pem`` and
    ``headend.key``.

    :raises DerSdkError: no CA, no host, or the files exist and ``force`` is false.
    """
    if not hosts:
        raise DerSdkError("give at least one HOST (e.g. localhost 127.0.0.1)")
    sans = _host_names(hosts)
    ca = CertificateAuthority.load(directory)
    key = new_private_key()
    now = _now()
    cert = ca.sign(
        subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0].strip("[]"))]),
        public_key=key.public_key(),
        not_before=now - CLOCK_SKEW,
        not_after=now + dt.timedelta(days=_positive_days(days)),
        sans=sans,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    return write_pair(directory, "headend", cert, key, force=force)
