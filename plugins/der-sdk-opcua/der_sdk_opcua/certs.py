"""OPC UA application certificates: make self-signed ones, and load PEM or DER files.

OPC UA authenticates applications with X.509 certificates whose subject alternative name
carries the application URI. :func:`make_application_certificate` makes one through
asyncua's own :mod:`asyncua.crypto.cert_gen`, the way the OPC UA specification (Part 6,
6.2.2) asks for: RSA 2048, SHA-256, the URI and host names in the SAN, key usages for
signing and encryption, client and server auth. It is self-signed with ``CA:TRUE``, so it
can itself be placed in a peer's trust list.

Run ``python -m der_sdk_opcua.certs --out DIR --name NAME --uri URI`` to write
``NAME.der`` and ``NAME.key.pem`` (keep the key out of any trust folder).
"""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from der_sdk.errors import DerSdkError

__all__ = [
    "ApplicationCertificate",
    "application_uri_of",
    "load_certificate_der",
    "load_private_key_der",
    "make_application_certificate",
    "write_application_certificate",
]


@dataclass(frozen=True)
class ApplicationCertificate:
    """A certificate and its private key, both DER encoded (what asyncua accepts as bytes)."""

    certificate_der: bytes
    private_key_der: bytes

    @property
    def private_key_pem(self) -> bytes:
        key = serialization.load_der_private_key(self.private_key_der, password=None)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def make_application_certificate(
    *,
    common_name: str,
    application_uri: str,
    hostnames: tuple[str, ...] | None = None,
    days: int = 365,
) -> ApplicationCertificate:
    """A new self-signed application instance certificate and its key, made by asyncua's
    :mod:`asyncua.crypto.cert_gen`. Valid from the moment it is made.

    :param hostnames: DNS names for the SAN (default: ``localhost`` and this host's name).
    """
    if hostnames is None:
        hostnames = tuple(dict.fromkeys(("localhost", socket.gethostname())))
    key = cert_gen.generate_private_key()
    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    alt_names += [x509.DNSName(h) for h in hostnames]
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        common_name,
        {},
        alt_names,
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        days=days,
    )
    return ApplicationCertificate(
        certificate_der=cert.public_bytes(serialization.Encoding.DER),
        private_key_der=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write_application_certificate(
    out: Path, name: str, *, application_uri: str, hostnames: tuple[str, ...] | None = None
) -> tuple[Path, Path]:
    """Make a certificate and write ``out/NAME.der`` and ``out/NAME.key.pem``.

    :return: the certificate path and the key path.
    """
    made = make_application_certificate(
        common_name=name, application_uri=application_uri, hostnames=hostnames
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.der", out / f"{name}.key.pem"
    cert_path.write_bytes(made.certificate_der)
    key_path.write_bytes(made.private_key_pem)
    key_path.chmod(0o600)
    return cert_path, key_path


# --------------------------------------------------------------------------- loading


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DerSdkError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None


def load_certificate_der(path: str | Path, what: str = "certificate") -> bytes:
    """The DER bytes of the certificate in ``path`` (PEM or DER).

    Blocking file I/O: call it at start-up.

    :raises DerSdkError: the file is missing or not a certificate; names the file.
    """
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise DerSdkError(f"{what} {path}: not a PEM or DER certificate ({exc})") from None
    return cert.public_bytes(serialization.Encoding.DER)


def load_private_key_der(path: str | Path, what: str = "private key") -> bytes:
    """The PKCS#8 DER bytes of the unencrypted private key in ``path`` (PEM or DER).

    :raises DerSdkError: the file is missing, encrypted or not a private key.
    """
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DerSdkError(
            f"{what} {path}: not an unencrypted PEM or DER private key ({exc})"
        ) from None
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def application_uri_of(certificate_der: bytes) -> str | None:
    """The first URI in the certificate's subject alternative name, if any."""
    cert = x509.load_der_x509_certificate(certificate_der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m der_sdk_opcua.certs",
        description="Write a self-signed OPC UA application certificate (NAME.der) and its "
        "key (NAME.key.pem).",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--name", required=True, help="common name and file name")
    parser.add_argument("--uri", required=True, help="application URI, e.g. urn:site-a:scada")
    parser.add_argument(
        "--host", action="append", default=None, help="host name for the SAN (repeatable)"
    )
    ns = parser.parse_args(argv)
    cert, key = write_application_certificate(
        ns.out, ns.name, application_uri=ns.uri, hostnames=tuple(ns.host) if ns.host else None
    )
    print(f"certificate: {cert}\nprivate key: {key} (keep it out of trust folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
