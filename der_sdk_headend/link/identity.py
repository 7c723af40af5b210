"""Who an agent is, and which site it may serve: the check between ``Register`` and
the sessions.

The inventory binds agents to sites (a site's ``agents`` list, see
:class:`der_sdk.inventory.AgentBinding`). :class:`AgentAuthorizer` applies it to one
stream's ``Register``:

**Mutual TLS** (``HEADEND_CLIENT_CA`` set). The TLS front
(:mod:`der_sdk_headend.link.tls_front`) has already verified the client certificate
against the CA, refusing and auditing no certificate, a bad chain or a certificate outside
its dates; it hands the connection to the internal gRPC server and records which
certificate came in on which internal connection (:class:`FrontPeers`), and
:func:`connection_identity` reads it back from ``context.peer()``. (Without the front, as
in unit tests, the identity comes from gRPC's ``auth_context()``.) The agent's identity is
the certificate's SHA-256 fingerprint or its subject (``AGENT_IDENTITY``). The
``Register``'s site must list that identity (``fingerprint:`` or ``subject:`` entries,
whichever ``AGENT_IDENTITY`` names); a site with no ``agents`` list cannot be served at
all. Token entries are not used.

**Without mutual TLS.** A site whose ``agents`` list has ``token_sha256`` entries needs
the metadata ``x-der-agent-token``, whose SHA-256 must be one of them: no token is
``UNAUTHENTICATED``, a wrong one ``PERMISSION_DENIED``. A site that lists only
certificate entries cannot be served without mutual TLS (fail closed). A site with no
``agents`` list accepts any agent, as in development.

In both modes, once the site is bound, a ``Register`` naming an asset of another site is
refused whole: an agent proves who it is for one site and may not reach into another.
Assets that are in no site at all are left to the usual per-asset refusal.

Nothing here does I/O: the servicer logs, records and aborts (see
:meth:`der_sdk_headend.link.servicer.AgentLinkService._refuse_stream`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
from cryptography import x509

from der_sdk.certs import fingerprint, subject, token_sha256
from der_sdk.errors import UnknownNameError
from der_sdk.inventory import AgentBinding, Inventory
from der_sdk.wire import AGENT_TOKEN_METADATA_KEY, pb
from der_sdk_headend.config import AgentIdentityMode

__all__ = [
    "AgentAuthorizer",
    "Authorized",
    "FrontPeer",
    "FrontPeers",
    "Refusal",
    "certificate_not_after",
    "connection_identity",
    "front_peer",
    "peer_identity",
]

log = logging.getLogger("der.headend.link")


@dataclass(frozen=True)
class Authorized:
    """The stream may go on. ``identity`` names the agent as it was proved (a
    fingerprint or subject, ``token <label>``), ``None`` for an unbound site."""

    identity: str | None
    binding: AgentBinding | None = None


@dataclass(frozen=True)
class Refusal:
    """The stream is refused whole.

    :param identity: the agent's identity as proved, else what it claimed (its agent id).
    :param details: facts for the audit record (never a secret).
    """

    code: grpc.StatusCode
    reason: str
    identity: str
    details: dict[str, Any] = field(default_factory=dict)


def peer_identity(
    auth_context: Mapping[str, Sequence[bytes]], mode: AgentIdentityMode
) -> str | None:
    """The identity of the client certificate in ``auth_context`` (``fingerprint``:
    ``sha256:<hex>``; ``subject``: RFC 4514), or ``None`` when there is no certificate."""
    pems = auth_context.get("x509_pem_cert") or ()
    if not pems:
        return None
    pem = pems[0]
    try:
        return fingerprint(pem) if mode == "fingerprint" else subject(pem)
    except ValueError:  # gRPC verified it, so this is not expected; refuse, do not crash
        log.exception("the verified client certificate could not be read")
        return None


@dataclass(frozen=True)
class FrontPeer:
    """A connection the TLS front accepted: the agent's own address (as gRPC writes
    peers, ``ipv4:203.0.113.7:51234``) and its verified client certificate."""

    peer: str
    fingerprint: str
    subject: str
    not_after: datetime | None = None
    """When the certificate expires (feeds ``der_agent_certificate_expiry_timestamp_seconds``)."""

    def identity(self, mode: AgentIdentityMode) -> str:
        return self.fingerprint if mode == "fingerprint" else self.subject


FrontPeers = dict[int, FrontPeer]
"""The TLS front's live connections: local port of the front's connection to the internal
gRPC server → the agent on the other side. Written by the front, read by the servicer."""


def front_peer(grpc_peer: str, peers: Mapping[int, FrontPeer]) -> FrontPeer | None:
    """The agent behind ``grpc_peer`` (``context.peer()`` of the internal server:
    ``ipv4:127.0.0.1:PORT``), ``None`` when it did not come through the front."""
    kind, _, rest = grpc_peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "ipv4" or host != "127.0.0.1" or not port.isdigit():
        return None
    return peers.get(int(port))


def certificate_not_after(
    context: Any, front_peer_found: FrontPeer | None, front: Mapping[int, FrontPeer] | None
) -> datetime | None:
    """When the stream's client certificate expires, ``None`` without one: from the TLS
    front's record when the stream came through it, else from gRPC's ``auth_context()``
    (``HEADEND_MTLS_MODE=native``)."""
    if front is not None:
        return front_peer_found.not_after if front_peer_found is not None else None
    pems = context.auth_context().get("x509_pem_cert") or ()
    if not pems:
        return None
    try:
        return x509.load_pem_x509_certificate(pems[0]).not_valid_after_utc
    except ValueError:  # gRPC verified it; peer_identity logs an unreadable one
        return None


def connection_identity(
    context: Any, mode: AgentIdentityMode, front: Mapping[int, FrontPeer] | None
) -> str | None:
    """The identity of the stream's client certificate, ``None`` without one: from the
    TLS front's record when ``front`` is given, else from gRPC's ``auth_context()``."""
    if front is None:
        return peer_identity(context.auth_context(), mode)
    found = front_peer(str(context.peer()), front)
    return found.identity(mode) if found is not None else None


def _metadata_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == AGENT_TOKEN_METADATA_KEY:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def _bind_hint(site_id: str, kind: str, value: str) -> str:
    return f"add '- {kind}: {value}' under 'agents:' of site {site_id} in the inventory"


class AgentAuthorizer:
    """Checks one stream's identity against the inventory's bindings.

    :param mtls: whether the headend requires client certificates (``HEADEND_CLIENT_CA``).
    :param identity_mode: how a certificate names an agent (``AGENT_IDENTITY``).
    :param front: the TLS front's connections, when agents come in through it.
    """

    def __init__(
        self,
        inventory: Inventory,
        *,
        mtls: bool,
        identity_mode: AgentIdentityMode,
        front: Mapping[int, FrontPeer] | None = None,
    ) -> None:
        self._inventory = inventory
        self.front = front
        self.mtls = mtls
        self.identity_mode: AgentIdentityMode = identity_mode

    def startup_warnings(self) -> list[str]:
        """Bindings that cannot work with this configuration, one sentence each."""
        notes: list[str] = []
        inventory = self._inventory
        for site_id, site in inventory.sites.items():
            bindings = inventory.site_agents(site_id)
            if self.mtls:
                if bindings is None:
                    notes.append(
                        f"site {site_id} ({site.name}) lists no agents: with mutual TLS no "
                        f"agent may serve it; bind one with an 'agents:' entry "
                        f"({self.identity_mode}: ...)"
                    )
                elif not any(b.kind == self.identity_mode for b in bindings):
                    notes.append(
                        f"site {site_id} ({site.name}) lists no {self.identity_mode} "
                        f"entry (AGENT_IDENTITY={self.identity_mode}): no agent may serve it"
                    )
            elif bindings is not None and not any(b.kind == "token_sha256" for b in bindings):
                notes.append(
                    f"site {site_id} ({site.name}) binds its agents by certificate, but "
                    "HEADEND_CLIENT_CA is not set (no mutual TLS): no agent may serve it"
                )
        return notes

    def log_startup_warnings(self, limit: int = 5) -> None:
        """Log :meth:`startup_warnings`, at most ``limit`` of them and a count of the rest."""
        notes = self.startup_warnings()
        for note in notes[:limit]:
            log.warning("agent bindings: %s", note)
        if len(notes) > limit:
            log.warning("agent bindings: ... and %d more site(s) like these", len(notes) - limit)

    def canonical_site_id(self, site_id: str) -> str | None:
        """``site_id`` as the inventory spells it; as sent when unknown; ``None`` if empty."""
        if not site_id:
            return None
        try:
            return self._inventory.site(site_id).site_id
        except UnknownNameError:
            return site_id

    def check(self, register: pb.Register, context: Any) -> Authorized | Refusal:
        """Whether the stream that sent ``register`` may serve its site."""
        site_id = register.site_id
        try:
            site_id = self._inventory.site(register.site_id).site_id
            known = True
        except UnknownNameError:
            known = False
        if self.mtls:
            return self._check_certificate(register, context, site_id, known)
        return self._check_token(register, context, site_id, known)

    # ------------------------------------------------------------------ mutual TLS

    def _check_certificate(
        self, register: pb.Register, context: Any, site_id: str, known: bool
    ) -> Authorized | Refusal:
        mode = self.identity_mode
        identity = connection_identity(context, mode, self.front)
        base = {"auth": "mtls", "identity_mode": mode, "agent_id": register.agent_id}
        if identity is None:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client certificate on the connection",
                register.agent_id or "unknown",
                base,
            )
        if not known:
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"site {site_id or '<empty>'} is not in the inventory",
                identity,
                base,
            )
        bindings = self._inventory.site_agents(site_id)
        if bindings is None:
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"site {site_id} lists no agents, and with mutual TLS only bound agents are "
                f"served: {_bind_hint(site_id, mode, identity)}",
                identity,
                base,
            )
        match = next((b for b in bindings if b.kind == mode and b.value == identity), None)
        if match is None:
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate {mode} {identity} is not bound to site {site_id}: "
                f"{_bind_hint(site_id, mode, identity)}",
                identity,
                base,
            )
        return self._same_site(register, site_id, identity, match, base)

    # ------------------------------------------------------------------ tokens

    def _check_token(
        self, register: pb.Register, context: Any, site_id: str, known: bool
    ) -> Authorized | Refusal:
        bindings = self._inventory.site_agents(site_id) if known else None
        if bindings is None:
            return Authorized(identity=None)  # an unbound (or unknown) site: as before
        claimed = register.agent_id or "unknown"
        base: dict[str, Any] = {"auth": "token", "agent_id": register.agent_id}
        hashes = [b for b in bindings if b.kind == "token_sha256"]
        if not hashes:
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"site {site_id} binds its agents by certificate, and this headend does "
                "not require client certificates (HEADEND_CLIENT_CA is not set); enable "
                "mutual TLS or add a token_sha256 entry for the agent",
                claimed,
                base,
            )
        token = _metadata_token(context.invocation_metadata())
        if token is None:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"site {site_id} requires an agent token (metadata {AGENT_TOKEN_METADATA_KEY}; "
                "set AGENT_TOKEN on the agent)",
                claimed,
                {**base, "token": "missing"},
            )
        digest = token_sha256(token)
        # Compare with every entry, in constant time each: the time taken says nothing
        # about which entry came close.
        match = None
        for binding in hashes:
            if hmac.compare_digest(binding.value, digest):
                match = binding
        if match is None:
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the agent token is not one of site {site_id}'s",
                claimed,
                {**base, "token": "wrong"},
            )
        identity = f"token {match.name or match.value[:12]}"
        return self._same_site(register, site_id, identity, match, base)

    # ------------------------------------------------------------------ both

    def _same_site(
        self,
        register: pb.Register,
        site_id: str,
        identity: str,
        binding: AgentBinding,
        base: dict[str, Any],
    ) -> Authorized | Refusal:
        strangers: list[str] = []
        for served in register.assets:
            try:
                asset = self._inventory.asset(served.asset_id)
            except UnknownNameError:
                continue  # in no site: refused per asset later, as before
            if asset.site_id != site_id:
                strangers.append(asset.asset_id)
        if strangers:
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity} is bound to site {site_id}, but asset(s) "
                f"{', '.join(strangers)} are not assets of that site",
                identity,
                {**base, "foreign_assets": strangers},
            )
        return Authorized(identity=identity, binding=binding)
