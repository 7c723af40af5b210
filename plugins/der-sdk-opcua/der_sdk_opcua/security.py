"""Server-side OPC UA security: the trust list, who may log in, and who may write.

asyncua's defaults are permissive: without a certificate validator any client certificate
is accepted, and its default user manager lets anyone (anonymous included) read and write.
The edge server replaces all three:

* :func:`build_certificate_validator` validates every client application certificate with
  ``CertificateValidatorOptions.TRUSTED_VALIDATION`` (time range, application URI, key
  usage, extended key usage, trusted directly or by a CA in the trust list, not revoked);
* :class:`EdgeUserManager` admits anonymous sessions only when allowed, configured
  username/password users, and X.509 user certificates that are in the trust list;
* :class:`AnonymousReadOnlyRuleset` lets anonymous sessions browse, read and subscribe but
  refuses their ``Write`` requests (``BadUserAccessDenied``);
* :class:`EdgeInternalServer` refuses to activate a session on a channel with security
  policy None unless that is allowed: asyncua accepts such a channel for discovery even
  when no None endpoint is configured, and would let a session run on it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager
from cryptography import x509

from der_sdk.errors import DerSdkError
from der_sdk_opcua._ua import ObjectIds, StatusCodes, node_id

__all__ = [
    "CLIENT_CERTIFICATE_CHECKS",
    "AnonymousReadOnlyRuleset",
    "EdgeInternalServer",
    "EdgeUserManager",
    "TrustList",
    "build_certificate_validator",
    "load_trust_list",
]

log = logging.getLogger("der.opcua.security")

CLIENT_CERTIFICATE_CHECKS = (
    CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
)
"""What every client certificate must pass. ``TRUSTED`` is the part asyncua leaves out by
default: without it an unknown certificate with a matching URI gets in."""

_ANONYMOUS = User(role=UserRole.Anonymous)
_ASYNCUA_CERT_NAME = re.compile(".*(der|pem)")


class TrustList:
    """The folder of trusted client certificates (and an optional folder of CRLs).

    Loaded once at server start. An empty or missing trust folder trusts nobody: every
    secure connection is refused until certificates are added (and the agent restarted).
    """

    def __init__(self, store: TrustStore, count: int, folder: Path | None) -> None:
        self.store = store
        self.count = count
        self.folder = folder

    def is_trusted(self, certificate: x509.Certificate) -> bool:
        return self.count > 0 and self.store.is_trusted(certificate)


def _check_folder(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DerSdkError(f"{what} {folder}: not a folder")
    # asyncua loads every file whose name matches ".*(der|pem)" as a certificate; a private
    # key kept there would crash it at start with an unhelpful message.
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and _ASYNCUA_CERT_NAME.match(p.name.lower())
    )
    for path in files:
        data = path.read_bytes()
        try:
            if b"-----BEGIN" in data:
                x509.load_pem_x509_certificate(data)
            else:
                x509.load_der_x509_certificate(data)
        except ValueError:
            raise DerSdkError(
                f"{what} {folder}: {path.name} is not a certificate; keep only trusted "
                f"certificates (PEM or DER) in this folder, private keys elsewhere"
            ) from None
    return files


def _scan(folder: str | None, crl_folder: str | None) -> list[Path]:
    if crl_folder and not Path(crl_folder).is_dir():
        raise DerSdkError(f"revoked_certificates {crl_folder}: not a folder")
    return _check_folder(Path(folder), "trusted_certificates") if folder else []


async def load_trust_list(folder: str | None, crl_folder: str | None = None) -> TrustList:
    """The trust list from ``folder`` (certificates, PEM or DER) and ``crl_folder`` (CRLs).

    :raises DerSdkError: a folder is missing or holds a file that is not a certificate.
    """
    certs = await asyncio.to_thread(_scan, folder, crl_folder)
    trusted = Path(folder) if folder else None
    crls = [Path(crl_folder)] if crl_folder else []
    store = TrustStore([trusted] if trusted and certs else [], crls)
    if certs:
        await store.load_trust()
    if crls:
        await store.load_crl()
    return TrustList(store, len(certs), trusted)


def build_certificate_validator(trust: TrustList) -> CertificateValidator:
    """The validator the server must use for client application certificates."""
    return CertificateValidator(CLIENT_CERTIFICATE_CHECKS, trust.store)


class AnonymousReadOnlyRuleset(SimpleRoleRuleset):
    """asyncua's role rules, except that anonymous sessions may do everything a user may
    do but write (asyncua's own rules let them do nothing at all)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        write = node_id(ObjectIds.WriteRequest_Encoding_DefaultBinary, 0)
        users: set[ua.NodeId] = self._permission_dict[UserRole.User]
        self._permission_dict[UserRole.Anonymous] = {t for t in users if t != write}


class EdgeUserManager(UserManager):
    """Who may open a session, and as whom.

    * username and password: one of ``users`` → role ``User`` (may write);
    * an X.509 user certificate (identity token) in the trust list → role ``User``;
    * anonymous: role ``Anonymous`` (read-only) when ``allow_anonymous``, else refused.

    asyncua passes the secure channel's certificate for an anonymous token as well, so the
    server tells the manager which certificate came from a user token
    (:class:`EdgeInternalServer`).
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str],
        allow_anonymous: bool,
        trust: TrustList | None,
    ) -> None:
        self._users = dict(users)
        self._allow_anonymous = allow_anonymous
        self._trust = trust
        self._user_token_certificate: bytes | None = None

    def user_token_certificate_verified(self, certificate_der: bytes) -> None:
        """The certificate of an X.509 user token whose signature was just verified."""
        self._user_token_certificate = certificate_der

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        token_certificate, self._user_token_certificate = self._user_token_certificate, None
        if username is not None:
            expected = self._users.get(username)
            if expected is None or password is None:
                log.warning("OPC UA login refused: unknown user %r", username)
                return None
            if not hmac.compare_digest(expected.encode(), password.encode()):
                log.warning("OPC UA login refused: wrong password for user %r", username)
                return None
            return User(role=UserRole.User, name=username)
        if token_certificate is not None and certificate == token_certificate:
            cert = x509.load_der_x509_certificate(token_certificate)
            subject = cert.subject.rfc4514_string()
            if self._trust is None or not self._trust.is_trusted(cert):
                log.warning("OPC UA login refused: user certificate %s is not trusted", subject)
                return None
            return User(role=UserRole.User, name=f"certificate {subject}")
        if self._allow_anonymous:
            return User(role=UserRole.Anonymous)
        log.warning("OPC UA login refused: anonymous sessions are not allowed")
        return None


class _EdgeSession(InternalSession):
    """A session that activates only on a secure channel, unless insecure is allowed."""

    def activate_session(
        self, params: ua.ActivateSessionParameters, peer_certificate: bytes | None
    ) -> ua.ActivateSessionResult:
        # asyncua keeps a SecurityPolicy None channel open for discovery (GetEndpoints) even
        # when no None endpoint is configured, and lets a client create and activate a
        # session on it: the unsigned, unencrypted access that disabling None should forbid.
        # Only a secure channel carries the client's certificate.
        if not peer_certificate and not getattr(self.iserver, "allow_insecure", False):
            log.warning("OPC UA session refused: security policy None is disabled (allow_insecure)")
            raise ServiceError(StatusCodes.BadSecurityModeRejected)
        return super().activate_session(params, peer_certificate)


class EdgeInternalServer(InternalServer):
    """asyncua's internal server, with two changes:

    * a session activates only on a signed (or signed and encrypted) channel unless
      ``allow_insecure``;
    * the :class:`EdgeUserManager` learns which certificate came from an X.509 user
      identity token (rather than from the secure channel).
    """

    def __init__(self, user_manager: UserManager | None = None, *, allow_insecure: bool) -> None:
        super().__init__(user_manager=user_manager)
        self.allow_insecure = allow_insecure

    def create_session(
        self, name: str, user: User = _ANONYMOUS, external: bool = False
    ) -> InternalSession:
        return _EdgeSession(
            self, self.aspace, self.subscription_service, name, user=user, external=external
        )

    def verify_x509_token(
        self, isession: Any, token: ua.X509IdentityToken, signature: ua.SignatureData
    ) -> bytes:
        certificate = super().verify_x509_token(isession, token, signature)
        if isinstance(self.user_manager, EdgeUserManager):
            self.user_manager.user_token_certificate_verified(certificate)
        return certificate
