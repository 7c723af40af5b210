"""``der tokens``: create (the secret printed once, only its hash stored), list, revoke,
the token file's format and permissions, and clear errors for user mistakes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from der_sdk.cli import main
from der_sdk_headend.tokens import TokenFileStore, hash_secret, match_secret


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "tokens.json"


def create(tokens_file: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["tokens", "create", "--file", str(tokens_file), *args]) == 0
    out = capsys.readouterr().out
    return out.strip()


def test_create_prints_the_secret_once_and_stores_only_its_hash(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["tokens", "create", "--role", "operator", "--name", "scada"]
    assert main([*args, "--file", str(tokens_file)]) == 0
    captured = capsys.readouterr()
    secret = captured.out.strip()
    assert secret.startswith("der_") and len(secret) == 4 + 43, "32 bytes, URL-safe base64"
    assert "\n" not in secret, "stdout is the secret alone: TOKEN=$(der tokens create ...)"
    assert "shown only this once" in captured.err and "tok_" in captured.err

    text = tokens_file.read_text()
    assert secret not in text
    assert hash_secret(secret) in text
    assert stat.S_IMODE(os.stat(tokens_file).st_mode) == 0o600
    content = TokenFileStore(tokens_file).read()
    (token,) = content.tokens
    assert token.id.startswith("tok_") and len(token.id) == 4 + 8
    assert (token.name, token.role, token.revoked_at) == ("scada", "operator", None)
    assert match_secret(content.tokens, secret) == token
    assert match_secret(content.tokens, secret + "x") is None
    (change,) = content.unaudited
    assert (change.action, change.token_id) == ("token.create", token.id)
    assert "@" in change.by


def test_create_json_gives_the_id_and_the_secret(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = json.loads(create(tokens_file, capsys, "--role", "viewer", "--json"))
    assert set(row) == {"id", "name", "role", "created_at", "revoked_at", "active", "token"}
    assert row["role"] == "viewer" and row["active"] is True
    assert hash_secret(row["token"]) == TokenFileStore(tokens_file).read().tokens[0].hash


def test_list_shows_tokens_without_secrets_or_hashes(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create(tokens_file, capsys, "--role", "admin", "--name", "ops")
    create(tokens_file, capsys, "--role", "viewer")

    assert main(["tokens", "list", "--file", str(tokens_file)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["ID", "ROLE", "CREATED", "REVOKED", "NAME"]
    assert "admin" in lines[1] and lines[1].endswith("ops")
    assert "viewer" in lines[2] and lines[2].endswith("-")
    assert "not in the headend's audit trail yet" in captured.err

    assert main(["tokens", "list", "--json", "--file", str(tokens_file)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["role"] for r in rows] == ["admin", "viewer"]
    everything = json.dumps(rows)
    assert "hash" not in everything and hash_secret(secret) not in everything
    assert secret not in everything


def test_list_of_no_file_says_how_to_create_one(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tokens", "list", "--file", str(tokens_file)]) == 0
    assert "der tokens create --role admin" in capsys.readouterr().out
    assert not tokens_file.exists(), "listing creates nothing"


def test_revoke_marks_the_token_and_is_idempotent(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create(tokens_file, capsys, "--role", "operator", "--name", "bot")
    token_id = TokenFileStore(tokens_file).read().tokens[0].id

    assert main(["tokens", "revoke", token_id, "--file", str(tokens_file)]) == 0
    assert f"revoked token {token_id} bot (operator)" in capsys.readouterr().out
    content = TokenFileStore(tokens_file).read()
    assert content.tokens[0].revoked_at is not None
    assert [c.action for c in content.unaudited] == ["token.create", "token.revoke"]

    assert main(["tokens", "revoke", token_id, "--file", str(tokens_file)]) == 0
    assert "already revoked" in capsys.readouterr().out
    assert len(TokenFileStore(tokens_file).read().unaudited) == 2, "nothing new to audit"


def test_the_file_defaults_to_headend_tokens_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "elsewhere.json"
    monkeypatch.setenv("HEADEND_TOKENS_FILE", str(target))
    assert main(["tokens", "create", "--role", "viewer"]) == 0
    capsys.readouterr()
    assert len(TokenFileStore(target).read().tokens) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--role", "root"], "invalid choice: 'root'"),
        (["create"], "--role"),
        (["revoke", "tok_00000000"], "no token 'tok_00000000'"),
        (["create", "--role", "viewer", "--name", "two\nlines"], "control character"),
        (["create", "--role", "viewer", "--name", "x" * 101], "at most 100"),
        ([], "ACTION"),
    ],
)
def test_user_mistakes_exit_2_with_a_clear_message(
    tokens_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    file_args = ["--file", str(tokens_file)] if args else []
    with_exit = 0
    try:
        with_exit = main(["tokens", *args, *file_args])
    except SystemExit as exc:  # argparse
        with_exit = int(exc.code or 0)
    assert with_exit == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err


def test_a_malformed_file_is_named_and_left_alone(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens_file.parent.mkdir(parents=True)
    tokens_file.write_text('{"version": 1, "tokens": [{"id": "tok_1", "role": "root"}]}')
    assert main(["tokens", "create", "--role", "admin", "--file", str(tokens_file)]) == 2
    err = capsys.readouterr().err
    assert f"token file {tokens_file} is not valid" in err and "$.tokens[0]" in err
    assert json.loads(tokens_file.read_text())["tokens"][0]["role"] == "root", "unchanged"


def test_a_file_from_a_newer_der_sdk_is_refused(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens_file.parent.mkdir(parents=True)
    tokens_file.write_text('{"version": 2, "tokens": []}')
    assert main(["tokens", "list", "--file", str(tokens_file)]) == 2
    assert "upgrade der-sdk" in capsys.readouterr().err


def test_writes_are_atomic_and_leave_no_temporary_files(
    tokens_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for role in ("viewer", "operator", "admin"):
        create(tokens_file, capsys, "--role", role)
    names = sorted(p.name for p in tokens_file.parent.iterdir())
    assert names == ["tokens.json", "tokens.json.lock"]
    inode = tokens_file.stat().st_ino
    create(tokens_file, capsys, "--role", "viewer")
    assert tokens_file.stat().st_ino != inode, "replaced, not rewritten in place"


def test_the_cli_default_file_and_roles_are_the_headends() -> None:
    from der_sdk_headend.cli_tokens import DEFAULT_TOKENS_FILE
    from der_sdk_headend.cli_tokens import ROLES as CLI_ROLES
    from der_sdk_headend.config import DEFAULT_TOKENS_FILE as HEADEND_DEFAULT
    from der_sdk_headend.tokens import ROLES

    assert DEFAULT_TOKENS_FILE == HEADEND_DEFAULT
    assert CLI_ROLES == ROLES
