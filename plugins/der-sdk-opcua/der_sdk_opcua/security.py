"""Server-side OPC UA security: the trust list, who may log in, and who may write.

asyncua's defaults are permissive: without a certificate validator any client certificate
is accepted, and its default user manager lets anyone (anonymous included) read and write.
The edge server replaces all three:

* :func:`build_certificate_validator` validates every client application certificate with
  ``CertificateValidatorOptions.TRUSTED_VALIDATION`` (time range, application URI, key
  usage, extended key usage, trusted directly or by a CA in the trust list, not revoked),
  and logs each refusal as one WARNING naming the certificate and the reason;
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
import contextvars
import hashlib
import hmac
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
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
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from der_sdk.errors import DerSdkError
from der_sdk_opcua._ua import ObjectIds, StatusCodes, node_id, status

__all__ = [
    "CLIENT_CERTIFICATE_CHECKS",
    "AnonymousReadOnlyRuleset",
    "EdgeInternalServer",
    "EdgeUserManager",
    "TrustList",
    "build_certificate_validator",
    "load_trust_list",
    "thumbprint",
]

log = logging.getLogger("der.opcua.security")

CLIENT_CERTIFICATE_CHECKS = (
    CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
)
"""What every client certificate must pass. ``TRUSTED`` is the part asyncua leaves out by
default: without it an unknown certificate with a matching URI gets in."""

_ANONYMOUS = User(role=UserRole.Anonymous)
_ASYNCUA_CERT_NAME = re.compile(".*(der|pem)")


def thumbprint(certificate: x509.Certificate) -> str:
    """The certificate's thumbprint as OPC UA tools show it: the SHA-1 of its DER bytes, in
    upper-case hex."""
    return (
        hashlib.sha1(certificate.public_bytes(Encoding.DER), usedforsecurity=False)
        .hexdigest()
        .upper()
    )


def _describe(certificate: x509.Certificate) -> str:
    return f"{certificate.subject.rfc4514_string()} (SHA-1 thumbprint {thumbprint(certificate)})"


class TrustList:
    """The folder of trusted client certificates (and an optional folder of CRLs).

    Loaded once at server start. An empty or missing trust folder trusts nobody: every
    secure connection is refused until certificates are added (and the agent restarted).

    :attr:`store` is the ``TrustStore`` asyncua's validator asks; its answers come from
    :meth:`untrusted_reason` and :meth:`revoked_by`, which say why, where asyncua's own
    store logs a traceback at ERROR whose message names a check on some certificate of the
    list (such as "basicConstraints.cA must be asserted") rather than the reason.
    """

    def __init__(
        self,
        certificates: Sequence[x509.Certificate],
        folder: Path | None,
        revoked: Mapping[int, str] | None = None,
    ) -> None:
        self.certificates = tuple(certificates)
        self.folder = folder
        self._revoked = dict(revoked or {})
        self.store: TrustStore = _TrustListStore(self)
        self._anchors = x509.verification.Store(list(certificates)) if certificates else None

    @property
    def count(self) -> int:
        return len(self.certificates)

    def is_trusted(self, certificate: x509.Certificate) -> bool:
        return self.untrusted_reason(certificate) is None

    def untrusted_reason(self, certificate: x509.Certificate) -> str | None:
        """``None`` when the certificate is in the list or issued by a CA there, else why not."""
        if self._anchors is None:
            return f"the trust list ({self.folder or 'no trusted_certificates folder'}) is empty"
        verifier = self.store.policy_builder.store(self._anchors).build_client_verifier()
        try:
            verifier.verify(certificate, [])
        except x509.verification.VerificationError as exc:
            error = str(exc).removeprefix("validation failed: ")
        else:
            return None
        listed = {thumbprint(c) for c in self.certificates}
        if thumbprint(certificate) in listed:
            return f"it is in the trust list but does not verify: {error}"
        if certificate.issuer == certificate.subject:
            namesakes = [c for c in self.certificates if c.subject == certificate.subject]
            if namesakes:
                return (
                    f"self-signed and not in the trust list ({self.folder}), which holds "
                    f"another certificate with the same subject, SHA-1 thumbprint "
                    f"{thumbprint(namesakes[0])}: if the client made a new certificate, "
                    "put the new one in the trust folder"
                )
            return f"self-signed and not in the trust list ({self.folder})"
        issuer = certificate.issuer.rfc4514_string()
        issuers = [c for c in self.certificates if c.subject == certificate.issuer]
        if not issuers:
            return f"issued by {issuer}, which is not in the trust list ({self.folder})"
        if not _is_ca(issuers[0]):
            return (
                f"issued by {issuer}, whose certificate in the trust list is not a CA "
                "certificate (basicConstraints CA:FALSE) and so cannot vouch for others"
            )
        return f"issued by {issuer} (in the trust list), but its chain does not verify: {error}"

    def revoked_by(self, certificate: x509.Certificate) -> str | None:
        """The CRL file that revokes the certificate's serial number, if any (as asyncua
        does, by serial number alone)."""
        return self._revoked.get(certificate.serial_number)


class _TrustListStore(TrustStore):
    """The ``TrustStore`` asyncua's validator calls, answering from a :class:`TrustList`
    without logging."""

    def __init__(self, trust: TrustList) -> None:
        super().__init__([], [])
        self._trust = trust

    def is_trusted(self, certificate: x509.Certificate) -> bool:
        return self._trust.is_trusted(certificate)

    def is_revoked(self, certificate: x509.Certificate) -> bool:
        return self._trust.revoked_by(certificate) is not None


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _certificate_files(folder: Path) -> list[Path]:
    # the files asyncua's trust store would load (names matching ".*(der|pem)"), so that
    # a private key kept there is named at start rather than read as a certificate
    return sorted(
        p for p in folder.iterdir() if p.is_file() and _ASYNCUA_CERT_NAME.match(p.name.lower())
    )


def _check_folder(folder: Path, what: str) -> list[x509.Certificate]:
    if not folder.is_dir():
        raise DerSdkError(f"{what} {folder}: not a folder")
    certificates: list[x509.Certificate] = []
    for path in _certificate_files(folder):
        data = path.read_bytes()
        try:
            if b"-----BEGIN" in data:
                certificates.append(x509.load_pem_x509_certificate(data))
            else:
                certificates.append(x509.load_der_x509_certificate(data))
        except ValueError:
            raise DerSdkError(
                f"{what} {folder}: {path.name} is not a certificate; keep only trusted "
                f"certificates (PEM or DER) in this folder, private keys elsewhere"
            ) from None
    return certificates


def _load_revoked(folder: Path) -> dict[int, str]:
    """Revoked serial numbers of the CRLs in ``folder``, each with its CRL's file name."""
    if not folder.is_dir():
        raise DerSdkError(f"revoked_certificates {folder}: not a folder")
    revoked: dict[int, str] = {}
    for path in _certificate_files(folder):
        data = path.read_bytes()
        try:
            if b"-----BEGIN" in data:
                crl = x509.load_pem_x509_crl(data)
            else:
                crl = x509.load_der_x509_crl(data)
        except ValueError:
            raise DerSdkError(
                f"revoked_certificates {folder}: {path.name} is not a certificate "
                "revocation list (PEM or DER)"
            ) from None
        revoked.update((entry.serial_number, path.name) for entry in crl)
    return revoked


def _load(folder: str | None, crl_folder: str | None) -> TrustList:
    revoked = _load_revoked(Path(crl_folder)) if crl_folder else {}
    if not folder:
        return TrustList([], None, revoked)
    return TrustList(_check_folder(Path(folder), "trusted_certificates"), Path(folder), revoked)


async def load_trust_list(folder: str | None, crl_folder: str | None = None) -> TrustList:
    """The trust list from ``folder`` (certificates, PEM or DER) and ``crl_folder`` (CRLs).

    :raises DerSdkError: a folder is missing or holds a file that is not a certificate
        (or, in ``crl_folder``, not a CRL).
    """
    return await asyncio.to_thread(_load, folder, crl_folder)


# asyncua's message processor logs every refused CreateSession at ERROR ("sending service
# fault response"); the validator has logged the refusal already, as one WARNING with the
# reason. It marks the request's context, and this filter drops that one ERROR record.
_REFUSAL_LOGGED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "der_opcua_certificate_refusal_logged", default=None
)
_UAPROCESSOR_LOGGER = "asyncua.server.uaprocessor"
_SERVICE_FAULT_MESSAGE = "sending service fault response: %s (%s)"


class _RefusalLoggedFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        status = _REFUSAL_LOGGED.get()
        if status is None or record.msg != _SERVICE_FAULT_MESSAGE:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if args[-1:] != (status,):
            return True
        _REFUSAL_LOGGED.set(None)
        return False


_REFUSAL_LOGGED_FILTER = _RefusalLoggedFilter()


class EdgeCertificateValidator(CertificateValidator):
    """asyncua's validator with :data:`CLIENT_CERTIFICATE_CHECKS` against a
    :class:`TrustList`; a refused certificate is logged once, at WARNING, with its subject,
    SHA-1 thumbprint, the client's application URI and the reason."""

    def __init__(self, trust: TrustList) -> None:
        super().__init__(CLIENT_CERTIFICATE_CHECKS, trust.store)
        self._trust = trust
        logging.getLogger(_UAPROCESSOR_LOGGER).addFilter(_REFUSAL_LOGGED_FILTER)

    async def validate(
        self, cert: x509.Certificate, app_description: ua.ApplicationDescription
    ) -> None:
        try:
            await super().validate(cert, app_description)
        except ServiceError as exc:
            name = status(exc.code).name
            log.warning(
                "OPC UA client certificate refused (%s): %s; certificate %s, application %s",
                name,
                self.refusal_reason(exc.code, cert, app_description),
                _describe(cert),
                app_description.ApplicationUri or "(none given)",
            )
            _REFUSAL_LOGGED.set(name)
            raise

    def refusal_reason(
        self, code: int, cert: x509.Certificate, app_description: ua.ApplicationDescription
    ) -> str:
        """Why asyncua's checks refused ``cert`` with status ``code``, in words."""
        if code == StatusCodes.BadCertificateTimeInvalid:
            now = datetime.now(UTC)
            if cert.not_valid_after_utc < now:
                return f"it expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
            return f"it is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z"
        if code == StatusCodes.BadCertificateUntrusted:
            return self._trust.untrusted_reason(cert) or "not trusted"
        if code == StatusCodes.BadCertificateRevoked:
            crl = self._trust.revoked_by(cert)
            return f"its serial number {cert.serial_number:#x} is revoked by the CRL {crl}"
        if code == StatusCodes.BadCertificateUriInvalid:
            uris = _extension_values(
                cert, x509.SubjectAlternativeName, x509.UniformResourceIdentifier
            )
            return (
                f"the client says its application URI is {app_description.ApplicationUri!r}, "
                f"the certificate names {', '.join(uris) or 'none'}"
            )
        if code == StatusCodes.BadCertificateUseNotAllowed:
            return _use_not_allowed(cert, app_description)
        if code == StatusCodes.BadCertificateInvalid:
            return (
                "it lacks an extension OPC UA requires (subject alternative name, key usage "
                "or extended key usage)"
            )
        return status(code).doc or status(code).name


def _extension_values(cert: x509.Certificate, extension: Any, kind: Any) -> list[str]:
    try:
        return [
            str(v)
            for v in cert.extensions.get_extension_for_class(extension).value.get_values_for_type(
                kind
            )
        ]
    except x509.ExtensionNotFound:
        return []


def _use_not_allowed(cert: x509.Certificate, app_description: ua.ApplicationDescription) -> str:
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    missing = [
        name
        for name in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
        )
        if not getattr(usage, name)
    ]
    if missing:
        return f"its key usage lacks {', '.join(missing)}"
    if (
        ExtendedKeyUsageOID.CLIENT_AUTH
        not in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ):
        return "its extended key usage lacks clientAuth"
    return (
        f"the client describes itself as application type {app_description.ApplicationType.name}, "
        "not a client"
    )


def build_certificate_validator(trust: TrustList) -> CertificateValidator:
    """The validator the server must use for client application certificates."""
    return EdgeCertificateValidator(trust)


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
            reason = "no trust list" if self._trust is None else self._trust.untrusted_reason(cert)
            if reason is not None:
                log.warning(
                    "OPC UA login refused: user certificate %s is not trusted: %s",
                    _describe(cert),
                    reason,
                )
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
