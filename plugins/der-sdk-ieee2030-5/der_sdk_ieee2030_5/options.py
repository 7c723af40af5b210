"""The ``options:`` of an ``ieee2030.5`` program (``docs/programs.md``, "IEEE 2030.5")."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

__all__ = ["EndDeviceOptions", "Ieee20305Options", "is_loopback_url"]

_LFDI = re.compile(r"^[0-9A-Fa-f]{40}$")

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]


class EndDeviceOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One EndDevice on the utility server and what it stands for here.

    ``site_id`` or ``asset_id`` (one of them): the DERControls of this EndDevice become
    dispatches of that site or asset. ``lfdi``: the EndDevice's LFDI (40 hex digits); left
    out, the LFDI of the client certificate (a device, not an aggregator: at most one end
    device may leave it out). ``sfdi``: left out, derived from the LFDI. ``register``: POST
    the EndDevice to the server's EndDeviceList when the server does not list it yet.
    """

    site_id: str | None = None
    asset_id: str | None = None
    lfdi: str | None = None
    sfdi: int | None = None
    register: bool = True

    def __post_init__(self) -> None:
        if (self.site_id is None) == (self.asset_id is None):
            raise ValueError("an end device needs site_id or asset_id (one of them)")
        if self.lfdi is not None:
            if not _LFDI.match(self.lfdi):
                raise ValueError(f"lfdi must be 40 hex digits, got {self.lfdi!r}")
            self.lfdi = self.lfdi.upper()

    @property
    def target(self) -> str:
        """``site <id>`` or ``asset <id>``, for messages."""
        return f"asset {self.asset_id}" if self.asset_id else f"site {self.site_id}"


class Ieee20305Options(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where the utility server is, how to authenticate, and which end devices to run.

    ``server_url``: the DeviceCapability URL the utility gives (``https://.../dcap``).
    ``cert``/``key``: the client certificate and its private key (PEM); ``ca``: the CA
    bundle that signed the server's certificate (left out: the system's). IEEE 2030.5
    requires mutual TLS, so ``https`` needs ``cert`` and ``key``; ``http`` is refused
    unless ``allow_plain_http`` is set *and* the server is on a loopback address (tests).

    ``poll_interval_s``: how often to read the server's programs and controls; a longer
    ``pollRate`` from the server wins. ``mirror_interval_s``: how often to post real power
    and check that the server answers (set it to the ``postRate`` the utility asks for).
    ``timeout_s``: per request.
    """

    server_url: str
    end_devices: list[EndDeviceOptions]
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    poll_interval_s: Seconds = 60.0
    mirror_interval_s: Seconds = 60.0
    timeout_s: Seconds = 10.0
    allow_plain_http: bool = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.server_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(
                f"server_url must be an https URL of the DeviceCapability, got {self.server_url!r}"
            )
        if parts.scheme == "http":
            if not self.allow_plain_http:
                raise ValueError(
                    "server_url is plain http: IEEE 2030.5 needs TLS with a client certificate"
                    " (allow_plain_http: true is for tests against a loopback server)"
                )
            if not is_loopback_url(self.server_url):
                raise ValueError(
                    f"allow_plain_http is only for a loopback server, not {parts.hostname!r}"
                )
        elif self.cert is None or self.key is None:
            raise ValueError("an https server_url needs cert and key (the client certificate)")
        if (self.cert is None) != (self.key is None):
            raise ValueError("give cert and key together")
        if not self.end_devices:
            raise ValueError("end_devices: list at least one end device (site_id or asset_id)")
        without_lfdi = [d.target for d in self.end_devices if d.lfdi is None]
        if len(without_lfdi) > 1:
            raise ValueError(
                "end_devices: only one end device may take the certificate's LFDI; give lfdi"
                f" for the others ({', '.join(without_lfdi)})"
            )
        if without_lfdi and self.cert is None:
            raise ValueError(f"end_devices: {without_lfdi[0]} has no lfdi and there is no cert")
        lfdis = [d.lfdi for d in self.end_devices if d.lfdi is not None]
        if len(set(lfdis)) != len(lfdis):
            raise ValueError("end_devices: each lfdi may appear once")


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is ``localhost`` or a loopback address."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
