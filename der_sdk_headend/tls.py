"""The headend's TLS material, read and checked once at start.

:func:`load_server_tls` reads ``HEADEND_TLS_CERT``, ``HEADEND_TLS_KEY`` and
``HEADEND_CLIENT_CA`` and checks them before any server uses them, so a wrong file is an
error naming the variable and the path, not a handshake failure later:

* every file must be readable PEM (a certificate chain, an unencrypted private key, a
  CA bundle);
* the key must belong to the first certificate of the chain.

A server certificate outside its validity period, or a key file that others can read, is
logged as a warning: agents will refuse the first, and the second is a leak waiting to
happen.

Plain blocking file reads on purpose: this runs once at start-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from der_sdk.certs import (
    check_key_pair,
    key_file_too_open,
    read_certificates,
    read_private_key,
    validity_problem,
)
from der_sdk_headend.config import HeadendConfig

__all__ = ["ServerTls", "load_server_tls"]

log = logging.getLogger("der.headend.tls")


@dataclass(frozen=True)
class ServerTls:
    """The PEM bytes the gRPC server needs, checked."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None
    certificate: x509.Certificate

    @property
    def mtls(self) -> bool:
        """Whether agents must present a client certificate signed by ``client_ca``."""
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials: TLS, and with ``client_ca`` a required, verified client
        certificate (the handshake fails without one)."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def _what(variable: str, path: Path) -> str:
    return f"{variable}={path}"


def load_server_tls(config: HeadendConfig) -> ServerTls | None:
    """The checked TLS material of ``config``; ``None`` when TLS is off.

    :raises DerSdkError: a file is unreadable or not what it should be, or the key is not
        the certificate's; the message names the variable and the path.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert_what = _what("HEADEND_TLS_CERT", config.tls_cert)
    key_what = _what("HEADEND_TLS_KEY", config.tls_key)
    chain, certs = read_certificates(config.tls_cert, cert_what)
    key_pem, key = read_private_key(config.tls_key, key_what)
    check_key_pair(certs[0], key, cert_what, key_what)
    client_ca: bytes | None = None
    if config.client_ca is not None:
        client_ca, _ = read_certificates(
            config.client_ca, _what("HEADEND_CLIENT_CA", config.client_ca)
        )
    _warn_about(certs[0], cert_what, config.tls_key, key_what)
    return ServerTls(cert_chain=chain, key=key_pem, client_ca=client_ca, certificate=certs[0])


def _warn_about(cert: x509.Certificate, cert_what: str, key_path: Path, key_what: str) -> None:
    problem = validity_problem(cert)
    if problem is not None:
        log.warning(
            "%s %s: agents and clients will refuse the headend's certificate until it is "
            "renewed or valid",
            cert_what,
            problem,
        )
    if key_file_too_open(key_path):
        log.warning("%s can be read by other users of this machine; chmod 600 it", key_what)
