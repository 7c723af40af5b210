"""How the agent's link to the headend is secured: TLS with a pinned CA, an optional
client certificate (mutual TLS), and an optional per-agent token.

============================  ===============  ==========================================
environment variable          agent config     meaning
============================  ===============  ==========================================
``AGENT_TLS_CA``              ``tls.ca``       PEM of the CA that signed the headend's
                                               certificate; turns TLS on. Pinned: only
                                               this CA is trusted, never the system roots
``AGENT_TLS_CERT``            ``tls.cert``     PEM client certificate (mutual TLS) ...
``AGENT_TLS_KEY``             ``tls.key``      ... and its unencrypted private key
``AGENT_TLS_SERVER_NAME``     ``tls.server_name``  the name checked in the headend's
                                               certificate, when it differs from the host
                                               in ``HEADEND_GRPC`` (an IP address, a
                                               tunnel)
``AGENT_TOKEN``               (none)           sent as ``x-der-agent-token`` metadata on
                                               the stream; for sites bound by
                                               ``token_sha256``. Never logged
============================  ===============  ==========================================

Each environment variable wins over its agent config field. The files are read and
checked once, at start (:meth:`LinkSecurity.load`): an unreadable or malformed file, a key
that is not the certificate's, or a certificate or server name without a CA stops the
start with an error naming the variable (or config line) and the path. A client
certificate outside its dates, or a key file others can read, is a warning.

A TLS failure while connecting is an ordinary failed attempt: it is logged with gRPC's
reason and, where it can be told, what to check (:meth:`LinkSecurity.explain`), and the
link retries with its backoff. Renewed certificate files are read at the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509

from der_sdk.agent_config import AgentConfig
from der_sdk.certs import (
    check_key_pair,
    fingerprint,
    key_file_too_open,
    read_certificates,
    read_private_key,
    validity_problem,
)
from der_sdk.errors import DerSdkError
from der_sdk.wire import AGENT_TOKEN_METADATA_KEY
from der_sdk_agent.settings import AgentSettings

__all__ = ["LinkSecurity"]

log = logging.getLogger("der.agent.tls")

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, kw_only=True)
class LinkSecurity:
    """The channel credentials and call metadata of the agent's link.

    The default is a plaintext link with no token. Build one from files with
    :meth:`load`, or from settings and the agent config with :meth:`from_settings`.
    ``sources`` names where each file came from (``AGENT_TLS_CA=/etc/der/ca.pem``), for
    messages.
    """

    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = field(default=None, repr=False)
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    client_certificate: x509.Certificate | None = field(default=None, repr=False)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.ca_pem is not None

    @property
    def mtls(self) -> bool:
        return self.cert_pem is not None

    # ------------------------------------------------------------------ building

    @classmethod
    def from_settings(cls, settings: AgentSettings, config: AgentConfig) -> LinkSecurity:
        """Each setting from the environment, else from the agent config's ``tls``.

        Reads files with blocking I/O: call it at start-up.

        :raises DerSdkError: see :meth:`load`.
        """
        chosen: dict[str, tuple[str | None, str]] = {}
        for key, variable, env_value in (
            ("ca", "AGENT_TLS_CA", settings.tls_ca),
            ("cert", "AGENT_TLS_CERT", settings.tls_cert),
            ("key", "AGENT_TLS_KEY", settings.tls_key),
            ("server_name", "AGENT_TLS_SERVER_NAME", settings.tls_server_name),
        ):
            if env_value is not None:
                chosen[key] = (env_value, variable)
            else:
                where = config.source_path or "agent config"
                line = config.line_of(f"tls.{key}")
                label = f"{where}:{line}: tls.{key}" if line else f"{where}: tls.{key}"
                chosen[key] = (getattr(config.tls, key), label)
        return cls.load(
            ca=chosen["ca"][0],
            cert=chosen["cert"][0],
            key=chosen["key"][0],
            server_name=chosen["server_name"][0],
            token=settings.token,
            labels={k: label for k, (_, label) in chosen.items()},
        )

    @classmethod
    def load(
        cls,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
        token: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> LinkSecurity:
        """Read and check the files.

        :param labels: how to name each of ``ca``, ``cert``, ``key``, ``server_name`` in
            messages (default: the ``AGENT_TLS_*`` variable).
        :raises DerSdkError: a file is unreadable or malformed, the key is not the
            certificate's, ``cert`` and ``key`` are not given together, or a certificate
            or server name is given without ``ca``.
        """
        names = {
            "ca": "AGENT_TLS_CA",
            "cert": "AGENT_TLS_CERT",
            "key": "AGENT_TLS_KEY",
            "server_name": "AGENT_TLS_SERVER_NAME",
            **(labels or {}),
        }
        if (cert is None) != (key is None):
            raise DerSdkError(
                f"{names['cert']} and {names['key']} go together: set both for mutual TLS, "
                "or neither"
            )
        if ca is None and (cert is not None or server_name is not None):
            given = names["cert"] if cert is not None else names["server_name"]
            raise DerSdkError(
                f"{given} is set but {names['ca']} is not: set {names['ca']} to the CA that "
                "signed the headend's certificate (TLS is on only with a pinned CA)"
            )
        if token is not None and not token.strip():
            token = None
        sources: dict[str, str] = {}
        if server_name is not None:
            sources["server_name"] = names["server_name"]
        ca_pem = cert_pem = key_pem = None
        client: x509.Certificate | None = None
        if ca is not None:
            sources["ca"] = f"{names['ca']}={ca}"
            ca_pem, _ = read_certificates(ca, sources["ca"])
        if cert is not None and key is not None:
            sources["cert"] = f"{names['cert']}={cert}"
            sources["key"] = f"{names['key']}={key}"
            cert_pem, chain = read_certificates(cert, sources["cert"])
            key_pem, private_key = read_private_key(key, sources["key"])
            check_key_pair(chain[0], private_key, sources["cert"], sources["key"])
            client = chain[0]
            _warn_about_client(client, sources["cert"])
            if key_file_too_open(key):
                log.warning(
                    "%s can be read by other users of this machine; chmod 600 it", sources["key"]
                )
        return cls(
            ca_pem=ca_pem,
            cert_pem=cert_pem,
            key_pem=key_pem,
            server_name=server_name,
            token=token,
            client_certificate=client,
            sources=sources,
        )

    # ------------------------------------------------------------------ using

    def open_channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """A channel to ``target``: ``secure_channel`` with the pinned CA (and client
        certificate) when TLS is on, else ``insecure_channel``."""
        if self.ca_pem is None:
            return grpc.aio.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )
        all_options = list(options)
        if self.server_name is not None:
            all_options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(target, credentials, options=all_options)

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The stream's metadata: the token, when there is one."""
        return ((AGENT_TOKEN_METADATA_KEY, self.token),) if self.token is not None else None

    def describe(self) -> str:
        """One phrase for the start line: ``TLS (CA ...), client certificate sha256:...``."""
        if not self.tls:
            parts = ["plaintext (no TLS)"]
        else:
            parts = [f"TLS with CA {self.sources.get('ca', '?')}"]
            if self.server_name:
                parts.append(f"server name {self.server_name}")
            if self.client_certificate is not None:
                parts.append(
                    f"client certificate {fingerprint(self.client_certificate)} "
                    f"({self.client_certificate.subject.rfc4514_string()})"
                )
        if self.token is not None:
            parts.append("agent token")
        return ", ".join(parts)

    def warn_if_exposed(self, headend: str) -> None:
        """Warn when a token would cross a non-loopback network in clear text."""
        if self.token is None or self.tls:
            return
        host = headend.rpartition(":")[0].strip("[]") or headend
        if host.lower() not in _LOOPBACK_HOSTS:
            log.warning(
                "AGENT_TOKEN is sent to headend %s in clear text: the link has no TLS; set "
                "AGENT_TLS_CA so that the token cannot be read on the way",
                headend,
            )

    def explain(self, exc: BaseException) -> str | None:
        """What to check, for a connection that failed in a way TLS can explain; ``None``
        when it cannot tell."""
        if not isinstance(exc, grpc.aio.AioRpcError):
            return None
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        details = exc.details() or ""
        ca = self.sources.get("ca", "AGENT_TLS_CA")
        if "Hostname Verification" in details:
            if self.server_name:
                return (
                    f"the headend's certificate does not name {self.server_name} "
                    f"({self.sources.get('server_name', 'AGENT_TLS_SERVER_NAME')}); set it "
                    "to a name in its certificate"
                )
            return (
                "the headend's certificate does not name the host dialled; set "
                "AGENT_TLS_SERVER_NAME to a name in its certificate, or dial that name"
            )
        if "WRONG_VERSION_NUMBER" in details:
            return "the headend does not speak TLS on this port: is HEADEND_TLS_CERT set there?"
        if "CERTIFICATE_VERIFY_FAILED" in details:
            why = details.rsplit("CERTIFICATE_VERIFY_FAILED:", 1)[-1].split(":")[0].strip()
            return (
                f"the headend's certificate was not accepted ({why}): it must be signed by "
                f"the CA in {ca} and valid now"
            )
        if "Socket closed" not in details and "handshake" not in details.lower():
            return None
        if not self.tls:
            return (
                "the headend closed the connection at once: it may require TLS "
                "(set AGENT_TLS_CA, and for mutual TLS AGENT_TLS_CERT and AGENT_TLS_KEY)"
            )
        cert = self.client_certificate
        if cert is None:
            return (
                "the headend closed the connection during the TLS handshake: it may "
                "require a client certificate (AGENT_TLS_CERT and AGENT_TLS_KEY)"
            )
        source = self.sources.get("cert", "AGENT_TLS_CERT")
        problem = validity_problem(cert)
        if problem is not None:
            return f"the client certificate {source} {problem}; renew it"
        return (
            "the headend closed the connection during the TLS handshake: it probably does "
            f"not trust the client certificate {source} (issuer "
            f"{cert.issuer.rfc4514_string()}); it must be signed by the headend's "
            "HEADEND_CLIENT_CA"
        )


def _warn_about_client(cert: x509.Certificate, what: str) -> None:
    problem = validity_problem(cert)
    if problem is not None:
        log.warning("%s %s: the headend will refuse it until it is renewed or valid", what, problem)
