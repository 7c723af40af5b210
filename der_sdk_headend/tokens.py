"""The REST token file (``HEADEND_TOKENS_FILE``, default ``der-data/tokens.json``).

One JSON document holds every REST bearer token the headend accepts: its public ``id``
(``tok_`` + 8 hex digits), a ``name`` for people, a ``role`` (``viewer``, ``operator``,
``admin``), ``created_at``, ``revoked_at``, and ``hash``: the SHA-256 (hex) of the secret.
The secret itself (``der_`` + 32 random bytes in URL-safe base64) is returned once by
:meth:`TokenFileStore.create` and never stored. Secrets are high-entropy, so one SHA-256 is
enough (no salt or slow hash is needed to resist guessing), and they are compared in
constant time.

Both ``der tokens`` (the command line) and the headend (``POST``/``DELETE /tokens``)
change the file, so every change is read-modify-write under an advisory lock on
``<file>.lock`` and written atomically: a temporary file in the same folder (mode 0600),
flushed, then ``os.replace``. A reader therefore sees the old or the new file, never half
of one.

The headend's audit trail lives in its storage, which the command line cannot reach. A
change made by ``der tokens`` is therefore also written to the file's ``unaudited`` list;
the headend moves those entries into its audit trail when it next reads the file (within
about a second while it runs, else at its next start) and then removes them from the file.

Everything here blocks on the file system: the headend calls it through
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, get_args

import msgspec

from der_sdk.errors import DerSdkError
from der_sdk.models import utc_now

__all__ = [
    "FILE_VERSION",
    "MAX_NAME_LENGTH",
    "ROLES",
    "TOKEN_PREFIX",
    "FileSignature",
    "Role",
    "StoredToken",
    "TokenFile",
    "TokenFileStore",
    "UnauditedChange",
    "UnknownTokenError",
    "check_token_name",
    "cli_user",
    "hash_secret",
    "match_secret",
    "role_allows",
]

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
"""The roles, weakest first: each one may do everything the ones before it may."""

TOKEN_PREFIX = "der_"
TOKEN_ID_PREFIX = "tok_"
FILE_VERSION = 1
MAX_NAME_LENGTH = 100


def role_allows(role: Role, needed: Role) -> bool:
    """Whether a token with ``role`` may do what needs ``needed``."""
    return ROLES.index(role) >= ROLES.index(needed)


def hash_secret(secret: str) -> str:
    """The SHA-256 (hex) of a token secret, as stored in the file."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class UnknownTokenError(DerSdkError):
    """No token with this id is in the file."""


class StoredToken(msgspec.Struct, frozen=True, kw_only=True):
    """One token as the file keeps it: never the secret, only its hash."""

    id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None = None
    hash: str

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def label(self) -> str:
        """``tok_1a2b3c4d`` or ``tok_1a2b3c4d ops-bot``: how logs and audit name it."""
        return f"{self.id} {self.name}" if self.name else self.id


class UnauditedChange(msgspec.Struct, frozen=True, kw_only=True):
    """A change made by ``der tokens`` that the headend has not yet put in its audit trail."""

    change_id: str
    action: Literal["token.create", "token.revoke"]
    token_id: str
    name: str
    role: Role
    at: datetime
    by: str
    """Who ran the command: ``user@host``."""


class TokenFile(msgspec.Struct, kw_only=True):
    """The whole file."""

    version: int = FILE_VERSION
    tokens: list[StoredToken] = msgspec.field(default_factory=list)
    unaudited: list[UnauditedChange] = msgspec.field(default_factory=list)

    def find(self, token_id: str) -> StoredToken | None:
        return next((t for t in self.tokens if t.id == token_id), None)

    def active_count(self) -> int:
        return sum(1 for t in self.tokens if t.active)


@dataclass(frozen=True)
class FileSignature:
    """What changes when the file is replaced or edited (cheap to read with ``stat``)."""

    mtime_ns: int
    size: int
    inode: int


def match_secret(tokens: Iterable[StoredToken], secret: str) -> StoredToken | None:
    """The token whose hash is that of ``secret`` (revoked ones included), or ``None``.

    Every stored hash is compared, each in constant time, so the time taken says nothing
    about which token (or how much of a hash) matched.
    """
    presented = hash_secret(secret)
    found: StoredToken | None = None
    for token in tokens:
        if hmac.compare_digest(token.hash, presented):
            found = token
    return found


def check_token_name(name: str) -> str:
    """``name`` stripped, or a :class:`DerSdkError` saying what is wrong with it."""
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise DerSdkError(f"token name is {len(name)} characters long; at most {MAX_NAME_LENGTH}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise DerSdkError("token name contains a control character (newline, tab...)")
    return name


def cli_user() -> str:
    """``user@host`` of whoever runs the command line, for the audit trail."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in this environment (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class TokenFileStore:
    """Reads and changes the token file at ``path``. Every method blocks (file I/O).

    :raises DerSdkError: from every method when the file cannot be read, parsed or
        written; the message names the file and says what to do.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    # ------------------------------------------------------------------ reading

    def signature(self) -> FileSignature | None:
        """The file's signature now, or ``None`` when there is no file."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DerSdkError(f"cannot read token file {self.path}: {exc.strerror}") from None
        return FileSignature(st.st_mtime_ns, st.st_size, st.st_ino)

    def read(self) -> TokenFile:
        """The file's contents; an empty :class:`TokenFile` when there is no file."""
        return self._read()[0]

    def read_with_signature(self) -> tuple[TokenFile, FileSignature | None]:
        """The contents and the signature of what was read (``None``: no file)."""
        return self._read()

    def _read(self) -> tuple[TokenFile, FileSignature | None]:
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return TokenFile(), None
        except OSError as exc:
            raise DerSdkError(f"cannot read token file {self.path}: {exc.strerror}") from None
        signature = FileSignature(st.st_mtime_ns, st.st_size, st.st_ino)
        if not raw.strip():
            return TokenFile(), signature
        try:
            content = msgspec.json.decode(raw, type=TokenFile)
        except msgspec.ValidationError as exc:
            raise DerSdkError(
                f"token file {self.path} is not valid: {exc}; restore it from a backup or "
                "move it away and create new tokens with `der tokens create`"
            ) from None
        except msgspec.DecodeError as exc:
            raise DerSdkError(
                f"token file {self.path} is not JSON: {exc}; restore it from a backup or "
                "move it away and create new tokens with `der tokens create`"
            ) from None
        if content.version > FILE_VERSION:
            raise DerSdkError(
                f"token file {self.path} has version {content.version}; this der-sdk reads "
                f"version {FILE_VERSION}: upgrade der-sdk"
            )
        ids = [t.id for t in content.tokens]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise DerSdkError(
                f"token file {self.path} lists token {', '.join(duplicates)} more than once"
            )
        return content, signature

    # ------------------------------------------------------------------ changing

    def create(
        self, *, role: Role, name: str = "", by_cli: str | None = None
    ) -> tuple[StoredToken, str, TokenFile, FileSignature]:
        """Add a token. Returns it, its secret (the only time it exists outside the
        caller), the new file contents and signature.

        :param by_cli: ``user@host`` when the command line makes the change: it is then
            also listed in ``unaudited`` for the headend to audit.
        """
        if role not in ROLES:
            raise DerSdkError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        name = check_token_name(name)
        with self._locked():
            content = self.read()
            taken = {t.id for t in content.tokens}
            token_id = _new_token_id(taken)
            secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
            token = StoredToken(
                id=token_id, name=name, role=role, created_at=utc_now(), hash=hash_secret(secret)
            )
            content.tokens.append(token)
            if by_cli is not None:
                content.unaudited.append(_change("token.create", token, by_cli))
            signature = self._write(content)
        return token, secret, content, signature

    def revoke(
        self, token_id: str, *, by_cli: str | None = None
    ) -> tuple[StoredToken, bool, TokenFile, FileSignature | None]:
        """Revoke a token. Returns it, whether this call revoked it (``False``: it was
        revoked before, nothing changed), the file contents and signature.

        :raises UnknownTokenError: no token ``token_id``.
        """
        with self._locked():
            content, signature = self._read()
            token = content.find(token_id)
            if token is None:
                known = ", ".join(t.id for t in content.tokens) or "none"
                raise UnknownTokenError(
                    f"no token {token_id!r} in {self.path} (tokens: {known}); "
                    "`der tokens list` shows them"
                )
            if not token.active:
                return token, False, content, signature
            revoked = msgspec.structs.replace(token, revoked_at=utc_now())
            content.tokens = [revoked if t.id == token_id else t for t in content.tokens]
            if by_cli is not None:
                content.unaudited.append(_change("token.revoke", revoked, by_cli))
            signature = self._write(content)
        return revoked, True, content, signature

    def drop_unaudited(self, change_ids: Iterable[str]) -> tuple[TokenFile, FileSignature | None]:
        """Remove entries the headend has put in its audit trail. Returns the contents and
        signature of the file afterwards."""
        done = set(change_ids)
        with self._locked():
            content, signature = self._read()
            kept = [c for c in content.unaudited if c.change_id not in done]
            if len(kept) != len(content.unaudited):
                content.unaudited = kept
                signature = self._write(content)
        return content, signature

    # ------------------------------------------------------------------ file system

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the advisory lock on ``<file>.lock`` (POSIX ``flock``; on Windows writes
        are still atomic, but two writers at the same moment could lose one change)."""
        self._make_folder()
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DerSdkError(
                f"cannot lock token file {self.path} ({self._lock_path}: {exc.strerror})"
            ) from None
        try:
            if sys.platform != "win32":
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _make_folder(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise DerSdkError(
                f"cannot create the folder of token file {self.path}: {exc.strerror}"
            ) from None

    def _write(self, content: TokenFile) -> FileSignature:
        data = msgspec.json.format(msgspec.json.encode(content), indent=2) + b"\n"
        try:
            fd, tmp = tempfile.mkstemp(
                dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
            )
        except OSError as exc:
            raise DerSdkError(f"cannot write token file {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp made it 0600: only the owner reads it
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                st = os.fstat(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise DerSdkError(f"cannot write token file {self.path}: {exc.strerror}") from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _sync_folder(self.path.parent)
        return FileSignature(st.st_mtime_ns, st.st_size, st.st_ino)


def _new_token_id(taken: set[str]) -> str:
    while True:
        token_id = TOKEN_ID_PREFIX + secrets.token_hex(4)
        if token_id not in taken:
            return token_id


def _change(
    action: Literal["token.create", "token.revoke"], token: StoredToken, by: str
) -> UnauditedChange:
    return UnauditedChange(
        change_id=secrets.token_hex(8),
        action=action,
        token_id=token.id,
        name=token.name,
        role=token.role,
        at=utc_now(),
        by=by,
    )


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX); a failure only weakens durability, so it is ignored."""
    if sys.platform == "win32":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
