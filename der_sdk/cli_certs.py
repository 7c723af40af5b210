"""``der certs``: a development CA, agent and headend certificates, agent tokens, and the
names the headend binds agents by.

A development aid (:mod:`der_sdk.certs`): production certificates come from the
operator's PKI; ``der certs show`` prints the fingerprint and subject of those too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import uuid
from typing import Any

from cryptography import x509

from der_sdk import certs
from der_sdk.errors import DerSdkError

__all__ = ["add_certs_arguments", "cmd_certs"]


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 day, got {days}")
    return days


def _site_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise DerSdkError(
            f"SITE_ID {text!r} is not a UUID; use the site_id from the inventory"
        ) from None


def _binding_snippet(site_id: str, issued: certs.IssuedCert, label: str) -> str:
    return (
        f"  - site_id: {site_id}\n"
        "    agents:\n"
        f"      - fingerprint: {issued.fingerprint}\n"
        f"        name: {label} (expires {issued.not_after:%Y-%m-%d})\n"
        f'      # or, with AGENT_IDENTITY=subject: - subject: "{issued.subject}"'
    )


def _validity(cert: x509.Certificate) -> str:
    return (
        f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )


def _init(ns: argparse.Namespace) -> int:
    issued = certs.init_ca(ns.dir, force=ns.force)
    print(f"development CA:  {issued.cert_path}")
    print(f"its private key: {issued.key_path} (mode 0600; keep it off agents and headends)")
    print(f"subject:         {issued.subject}")
    print(f"valid:           {_validity(issued.certificate)}")
    print()
    print("next:")
    print(f"  der certs issue-headend localhost 127.0.0.1 --dir {ns.dir}")
    print(f"  der certs issue-agent SITE_ID --dir {ns.dir}")
    print("A development aid: in production your PKI issues these certificates.")
    return 0


def _issue_agent(ns: argparse.Namespace) -> int:
    issued = certs.issue_agent(
        ns.dir, ns.site_id, agent_id=ns.agent_id, days=ns.days, force=ns.force
    )
    site_id = _site_id(ns.site_id)
    label = ns.agent_id or f"agent-{site_id}"
    print(f"agent certificate: {issued.cert_path}")
    print(f"its private key:   {issued.key_path} (mode 0600)")
    print(f"subject:           {issued.subject}")
    print(f"fingerprint:       {issued.fingerprint}")
    print(f"valid:             {_validity(issued.certificate)}")
    print()
    print(f"To bind it to site {site_id}, add to that site in the inventory (ASSETS_PATH):")
    print(_binding_snippet(site_id, issued, label))
    print()
    print("Agent settings:")
    print(f"  AGENT_TLS_CA={ns.dir}/{certs.CA_CERT_FILE}")
    print(f"  AGENT_TLS_CERT={issued.cert_path}")
    print(f"  AGENT_TLS_KEY={issued.key_path}")
    return 0


def _issue_headend(ns: argparse.Namespace) -> int:
    issued = certs.issue_headend(ns.dir, ns.hosts, days=ns.days, force=ns.force)
    sans = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    names = [str(v) for v in sans.value.get_values_for_type(x509.DNSName)]
    names += [str(v) for v in sans.value.get_values_for_type(x509.IPAddress)]
    print(f"headend certificate: {issued.cert_path}")
    print(f"its private key:     {issued.key_path} (mode 0600)")
    print(f"names:               {', '.join(names)}")
    print(f"fingerprint:         {issued.fingerprint}")
    print(f"valid:               {_validity(issued.certificate)}")
    print()
    print("Headend settings (add HEADEND_CLIENT_CA for mutual TLS):")
    print(f"  HEADEND_TLS_CERT={issued.cert_path}")
    print(f"  HEADEND_TLS_KEY={issued.key_path}")
    print(f"  HEADEND_CLIENT_CA={ns.dir}/{certs.CA_CERT_FILE}")
    print("Agents dial one of the names above, or set AGENT_TLS_SERVER_NAME to one.")
    return 0


def _agent_token(ns: argparse.Namespace) -> int:
    site_id = _site_id(ns.site_id)
    token, digest = certs.new_agent_token()
    print(f"agent token (shown once; give it to the agent as AGENT_TOKEN): {token}")
    print()
    print(f"In the inventory (ASSETS_PATH), under site {site_id}:")
    print(f"  - site_id: {site_id}")
    print("    agents:")
    print(f"      - token_sha256: {digest}")
    if ns.name:
        print(f"        name: {ns.name}")
    print("The headend stores only the hash. Send tokens over TLS (AGENT_TLS_CA).")
    return 0


def _show(ns: argparse.Namespace) -> int:
    _, chain = certs.read_certificates(ns.cert, ns.cert)
    cert = chain[0]
    print(f"subject:     {certs.subject(cert)}")
    print(f"issuer:      {cert.issuer.rfc4514_string()}")
    print(f"fingerprint: {certs.fingerprint(cert)}")
    print(f"valid:       {_validity(cert)}")
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        print("             EXPIRED")
    elif cert.not_valid_before_utc > now:
        print("             NOT YET VALID")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        print(f"names:       {', '.join(str(n.value) for n in sans)}")
    except x509.ExtensionNotFound:
        pass
    return 0


_COMMANDS: dict[str, Any] = {
    "init": _init,
    "issue-agent": _issue_agent,
    "issue-headend": _issue_headend,
    "agent-token": _agent_token,
    "show": _show,
}


def cmd_certs(ns: argparse.Namespace) -> int:
    if ns.certs_command is None:
        ns.certs_parser.print_help()
        return 2
    result: int = _COMMANDS[ns.certs_command](ns)
    return result


def add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands of ``der certs`` to its ``parser``."""
    parser.set_defaults(func=cmd_certs, certs_parser=parser)
    commands = parser.add_subparsers(dest="certs_command", metavar="COMMAND")

    def with_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            default=certs.DEFAULT_CERTS_DIR,
            help=f"the certificate folder (default {certs.DEFAULT_CERTS_DIR})",
        )

    def with_issue_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--days",
            type=_days,
            default=certs.DEFAULT_AGENT_DAYS,
            help=f"validity in days (default {certs.DEFAULT_AGENT_DAYS})",
        )
        p.add_argument("--force", action="store_true", help="replace existing files")
        with_dir(p)

    p = commands.add_parser(
        "init",
        help="create the development CA (EC P-256, 10 years)",
        description="Create ca.pem and ca.key (mode 0600) in --dir.",
    )
    with_dir(p)
    p.add_argument(
        "--force", action="store_true", help="replace an existing CA (its certificates die)"
    )

    p = commands.add_parser(
        "issue-agent",
        help="issue an agent's client certificate for a site",
        description="Issue agent-<id>.pem and agent-<id>.key: CN = the agent id, SAN "
        "URI urn:der:site:SITE_ID, extended key usage clientAuth; print its fingerprint, "
        "subject and the inventory entry that binds it to the site.",
    )
    p.add_argument("site_id", metavar="SITE_ID", help="the site's id in the inventory")
    p.add_argument("--agent-id", help="the certificate's CN (default agent-SITE_ID)")
    with_issue_options(p)

    p = commands.add_parser(
        "issue-headend",
        help="issue the headend's server certificate",
        description="Issue headend.pem and headend.key for the DNS names and IP "
        "addresses given (e.g. localhost 127.0.0.1 headend.example), extended key usage "
        "serverAuth.",
    )
    p.add_argument("hosts", metavar="HOST", nargs="+", help="DNS names and IP addresses")
    with_issue_options(p)

    p = commands.add_parser(
        "agent-token",
        help="make a per-agent token and the hash the inventory stores",
        description="Print a new random agent token (for AGENT_TOKEN) once, and the "
        "token_sha256 entry that binds it to the site.",
    )
    p.add_argument("site_id", metavar="SITE_ID", help="the site's id in the inventory")
    p.add_argument("--name", help="a label for the inventory entry")

    p = commands.add_parser(
        "show",
        help="print a certificate's fingerprint, subject, names and dates",
        description="Print what the inventory binds an agent by (fingerprint, subject) for "
        "any PEM certificate, e.g. one from your PKI.",
    )
    p.add_argument("cert", metavar="CERT", help="a PEM certificate file")
