"""``der tokens``: create, list and revoke the headend's REST bearer tokens.

The token file is :mod:`der_sdk_headend.tokens`; it is imported only when a ``der tokens``
command runs, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from der_sdk.errors import DerSdkError

if TYPE_CHECKING:
    from der_sdk_headend.tokens import StoredToken, TokenFileStore

__all__ = ["DEFAULT_TOKENS_FILE", "add_tokens_arguments", "cmd_tokens"]

DEFAULT_TOKENS_FILE = "der-data/tokens.json"
"""The headend's default ``HEADEND_TOKENS_FILE`` (``der_sdk_headend.config``; a test
keeps the two equal without importing the headend here)."""
ROLES = ("viewer", "operator", "admin")


def _store(ns: argparse.Namespace) -> TokenFileStore:
    from der_sdk_headend.tokens import TokenFileStore

    return TokenFileStore(ns.file)


def cmd_tokens_create(ns: argparse.Namespace) -> int:
    from der_sdk_headend.tokens import cli_user

    store = _store(ns)
    token, secret, _, _ = store.create(role=ns.role, name=ns.name, by_cli=cli_user())
    if ns.json:
        print(json.dumps({**_token_row(token), "token": secret}, indent=2))
    else:
        print(secret)  # alone on stdout: TOKEN=$(der tokens create ...)
    name = f", name {token.name!r}" if token.name else ""
    print(
        f"created token {token.id} (role {token.role}{name}) in {store.path}. The token is "
        "shown only this once: store it now, then send it as `Authorization: Bearer <token>`. "
        "A running headend accepts it within a second.",
        file=sys.stderr,
    )
    return 0


def cmd_tokens_list(ns: argparse.Namespace) -> int:
    store = _store(ns)
    content = store.read()
    rows = [_token_row(t) for t in content.tokens]
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no tokens in {store.path}; create one with: der tokens create --role admin")
        return 0
    print(f"{'ID':<12}  {'ROLE':<8}  {'CREATED':<20}  {'REVOKED':<20}  NAME")
    for row in rows:
        print(
            f"{row['id']:<12}  {row['role']:<8}  {_short_time(row['created_at']):<20}  "
            f"{_short_time(row['revoked_at']):<20}  {row['name'] or '-'}"
        )
    if content.unaudited:
        print(
            f"{len(content.unaudited)} change(s) made with `der tokens` are not in the "
            "headend's audit trail yet: the headend records them when it next reads the file",
            file=sys.stderr,
        )
    return 0


def cmd_tokens_revoke(ns: argparse.Namespace) -> int:
    from der_sdk_headend.tokens import cli_user

    token, changed, _, _ = _store(ns).revoke(ns.token_id, by_cli=cli_user())
    if changed:
        print(
            f"revoked token {token.label()} ({token.role}); a running headend refuses it "
            "within a second"
        )
    else:
        when = token.revoked_at.isoformat() if token.revoked_at else "?"
        print(f"token {token.label()} was already revoked at {when}")
    return 0


def _token_row(token: StoredToken) -> dict[str, Any]:
    """A token as ``der tokens`` shows it: never the hash."""
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "created_at": token.created_at.isoformat(),
        "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
        "active": token.active,
    }


def _short_time(iso: str | None) -> str:
    return iso[:19].replace("T", " ") + "Z" if iso else "-"


def cmd_tokens(ns: argparse.Namespace) -> int:
    """``der tokens`` itself: the parser of each ACTION sets its own ``func`` (and argparse
    requires an ACTION), so this runs only when called without one."""
    raise DerSdkError("choose an action: der tokens create|list|revoke")


def add_tokens_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``create|list|revoke`` to the parser of ``der tokens``."""
    actions = p.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    file_default = os.environ.get("HEADEND_TOKENS_FILE") or DEFAULT_TOKENS_FILE
    file_help = f"the token file (env HEADEND_TOKENS_FILE, default {DEFAULT_TOKENS_FILE})"

    t = actions.add_parser(
        "create",
        help="create a token and print it (once)",
        description="Create a token; its secret is printed on stdout this once and only its "
        "hash is stored.",
    )
    t.add_argument("--role", required=True, choices=ROLES)
    t.add_argument("--name", default="", help="a name for people (who or what uses it)")
    t.add_argument("--file", default=file_default, help=file_help)
    t.add_argument("--json", action="store_true", help="print id, role... and token as JSON")
    t.set_defaults(func=cmd_tokens_create)

    t = actions.add_parser("list", help="list tokens (never their secrets or hashes)")
    t.add_argument("--file", default=file_default, help=file_help)
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.set_defaults(func=cmd_tokens_list)

    t = actions.add_parser("revoke", help="revoke a token by its id")
    t.add_argument("token_id", metavar="ID", help="the token's id (tok_...), see `der tokens list`")
    t.add_argument("--file", default=file_default, help=file_help)
    t.set_defaults(func=cmd_tokens_revoke)
