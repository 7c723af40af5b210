"""The device identifiers of IEEE 2030.5 (section 6.3.4): the LFDI and SFDI of a
certificate.

Both come from the SHA-256 fingerprint of the certificate (its DER encoding): the LFDI is
the fingerprint's first 160 bits as 40 hex digits; the SFDI is its first 36 bits as a
decimal number followed by a check digit that makes the digits sum to a multiple of 10.
The arithmetic is a few lines over ``cryptography``; the one PyPI package that has it
(sep2tools) pulls a CLI framework and a database layer with it.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes

from der_sdk.certs import read_certificates

__all__ = ["certificate_lfdi", "lfdi_of_fingerprint", "sfdi_of_lfdi"]


def lfdi_of_fingerprint(fingerprint: bytes) -> str:
    """The LFDI (40 upper-case hex digits) of a SHA-256 certificate fingerprint."""
    return fingerprint[:20].hex().upper()


def sfdi_of_lfdi(lfdi: str) -> int:
    """The SFDI of an LFDI: its first 36 bits in decimal, then a check digit."""
    value = int(lfdi[:9], 16)
    digits = sum(int(d) for d in str(value))
    check = (10 - digits % 10) % 10
    return value * 10 + check


def certificate_lfdi(path: Path) -> str:
    """The LFDI of the (first) certificate in the PEM file ``path``. Blocking file I/O:
    call it off the event loop.

    :raises DerSdkError: unreadable or no PEM certificate in it (names the file).
    """
    _, certs = read_certificates(path, f"cert {path}")
    return lfdi_of_fingerprint(certs[0].fingerprint(hashes.SHA256()))
