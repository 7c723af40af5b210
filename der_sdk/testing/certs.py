"""Certificates that must be refused, for testing a headend's mutual TLS.

Each helper writes a client certificate and key to ``directory`` and returns the
:class:`~der_sdk.certs.IssuedCert`. The good ones come from :func:`der_sdk.certs.issue_agent`;
these are the bad ones:

* :func:`self_signed_agent` — signed by its own key, no CA at all;
* :func:`agent_from_other_ca` — a perfectly formed agent certificate from a CA the headend
  does not trust;
* :func:`expired_agent` — from the right CA, but its validity ended yesterday;
* :func:`not_yet_valid_agent` — from the right CA, valid only from tomorrow.

The certificate subject, SAN and key usage are those of a real agent certificate, so the
one thing wrong is the thing under test.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from der_sdk.certs import (
    SITE_URN_PREFIX,
    IssuedCert,
    agent_files,
    init_ca,
    issue_agent,
    new_private_key,
    write_pair,
)

__all__ = ["agent_from_other_ca", "expired_agent", "not_yet_valid_agent", "self_signed_agent"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def self_signed_agent(
    directory: str | os.PathLike[str], site_id: str, *, agent_id: str = "agent-self-signed"
) -> IssuedCert:
    """A client certificate that is its own issuer (CN = ``agent_id``, the agent SAN and
    key usage), valid now."""
    key = new_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(SITE_URN_PREFIX + site_id)]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return write_pair(directory, agent_files(agent_id), cert, key, force=True)


def agent_from_other_ca(
    directory: str | os.PathLike[str], site_id: str, *, agent_id: str = "agent-other-ca"
) -> IssuedCert:
    """An agent certificate from a second development CA made in ``directory/other-ca``."""
    other = Path(directory) / "other-ca"
    init_ca(other, force=True)
    return issue_agent(other, site_id, agent_id=agent_id, force=True)


def expired_agent(
    ca_directory: str | os.PathLike[str], site_id: str, *, agent_id: str = "agent-expired"
) -> IssuedCert:
    """An agent certificate from the CA in ``ca_directory`` that expired a day ago."""
    return _agent_valid_for(ca_directory, site_id, agent_id, from_days=-30, to_days=-1)


def not_yet_valid_agent(
    ca_directory: str | os.PathLike[str], site_id: str, *, agent_id: str = "agent-future"
) -> IssuedCert:
    """An agent certificate from the CA in ``ca_directory`` valid only from tomorrow."""
    return _agent_valid_for(ca_directory, site_id, agent_id, from_days=1, to_days=30)


def _agent_valid_for(
    ca_directory: str | os.PathLike[str],
    site_id: str,
    agent_id: str,
    *,
    from_days: int,
    to_days: int,
) -> IssuedCert:
    """An agent certificate valid from ``from_days`` to ``to_days`` days from now."""
    now = _now()
    return issue_agent(
        ca_directory,
        site_id,
        agent_id=agent_id,
        force=True,
        not_before=now + dt.timedelta(days=from_days),
        not_after=now + dt.timedelta(days=to_days),
    )
