"""REST authentication and roles: bearer tokens from the token file, one rule per route.

Every route handler declares who may call it with :func:`access` (``open``, ``metrics``,
``viewer``, ``operator`` or ``admin``); :func:`create_auth_middleware` makes the one
app-wide middleware that enforces it. A handler without a rule needs ``admin`` (closed by
default), and :func:`check_access_rules` refuses to build an app with such a handler.

:class:`RestAuth` holds the live token set. It reads the token file at start, re-reads it
when it changes (polled every :data:`RELOAD_INTERVAL_S` with ``stat`` in a thread), puts
changes made by ``der tokens`` into the audit trail, and applies ``POST``/``DELETE
/tokens`` at once: a revoked token is refused from the next request on.

``HEADEND_AUTH``: ``on`` checks tokens; ``off`` lets every request act as an anonymous
admin (refused at start on a non-loopback address unless ``HEADEND_INSECURE``); ``auto``
is on unless the REST address is loopback and the file has no active token. ``auto`` is
re-decided whenever the token set changes: creating the first token turns checking on
without a restart.

Routes marked :data:`TOKEN_ALWAYS` (``/tokens``) check the token in every mode: while
checking is off, a local process must not be able to mint an admin token for itself. The
first token is made with ``der tokens create``, by whoever may write the token file.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypedDict, TypeVar, cast, get_args

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import SecurityRequirement
from litestar.types import ASGIApp, Receive, Scope, Send

from der_sdk.errors import DerSdkError
from der_sdk.tasks import cancel_and_wait
from der_sdk_headend.audit import ANONYMOUS, Actor, Auditor
from der_sdk_headend.config import is_loopback
from der_sdk_headend.tokens import (
    TOKEN_PREFIX,
    FileSignature,
    Role,
    StoredToken,
    TokenFile,
    TokenFileStore,
    UnauditedChange,
    hash_secret,
    role_allows,
)

if TYPE_CHECKING:
    from litestar import Litestar

    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import Headend

__all__ = [
    "ACCESS_LEVELS",
    "BEARER_SCHEME",
    "RELOAD_INTERVAL_S",
    "TOKEN_ALWAYS",
    "Access",
    "DenialLimiter",
    "RestAuth",
    "access",
    "access_of",
    "actor_of",
    "check_access_rules",
    "check_auth_config",
    "client_source",
    "create_auth_middleware",
    "token_actor",
]

log = logging.getLogger("der.headend.auth")

Access = Literal["open", "metrics", "viewer", "operator", "admin"]
"""Who may call a route: anybody; ``/metrics`` (``open`` or ``viewer`` by
``METRICS_AUTH``); or a token with at least that role."""
ACCESS_LEVELS: tuple[Access, ...] = get_args(Access)
ACCESS_KEY = "der_access"
TOKEN_ALWAYS_KEY = "der_token_always"
TOKEN_ALWAYS: dict[str, Any] = {TOKEN_ALWAYS_KEY: True}
"""``opt`` of a controller or route whose token is checked even while authentication is
off (``HEADEND_AUTH=off``, or ``auto`` on loopback with no active token)."""
BEARER_SCHEME = "BearerToken"
RELOAD_INTERVAL_S = 0.5
"""How often the token file's ``stat`` is checked; a change is live within about this."""
REALM = "der-sdk headend"

T = TypeVar("T")


# ----------------------------------------------------------------------------- rules


class AccessRule(TypedDict):
    """Route decorator arguments: the rule for the access check and the OpenAPI
    ``security``."""

    opt: dict[str, Any]
    security: list[SecurityRequirement]


def access(level: Access) -> AccessRule:
    """Who may call a route: ``@get("/assets", **access("viewer"))``.

    The OpenAPI operation lists the ``BearerToken`` scheme with the role needed (for
    ``metrics``, the token is optional: ``METRICS_AUTH=open`` needs none).
    """
    if level == "open":
        security: list[SecurityRequirement] = []
    elif level == "metrics":
        security = [{BEARER_SCHEME: ["viewer"]}, {}]
    else:
        security = [{BEARER_SCHEME: [level]}]
    return {"opt": {ACCESS_KEY: level}, "security": security}


def access_of(handler: BaseRouteHandler) -> Access | None:
    """The rule a route handler declared, ``None`` when it declared none.

    The ``OPTIONS`` handlers Litestar adds to every path are ``open``: they answer only
    ``Allow: <methods>`` (and CORS preflights carry no credentials).
    """
    level = handler.opt.get(ACCESS_KEY)
    if level in ACCESS_LEVELS:
        return cast(Access, level)
    if getattr(handler, "http_methods", None) == {"OPTIONS"} and (
        handler.handler_name == "options_handler"
    ):
        return "open"
    return None


def check_access_rules(app: Litestar) -> None:
    """Refuse an app with a route that has no access rule (it would need ``admin``).

    :raises RuntimeError: naming the routes (a programming error, not a user's).
    """
    missing = sorted(
        f"{'/'.join(sorted(handler.http_methods))} {route.path}"
        for route in app.routes
        for handler in getattr(route, "route_handlers", ())
        if access_of(handler) is None
    )
    if missing:
        raise RuntimeError(
            "REST routes without an access rule (add **access(...) to the route "
            f"decorator): {', '.join(missing)}"
        )


def check_auth_config(config: HeadendConfig) -> None:
    """Refuse ``HEADEND_AUTH=off`` on a non-loopback REST address without
    ``HEADEND_INSECURE``.

    :raises DerSdkError: naming both variables and what to do.
    """
    host, _ = config.http_host_port
    if config.auth == "off" and not is_loopback(host) and not config.insecure:
        raise DerSdkError(
            f"HEADEND_AUTH=off with REST on {config.http_addr} (not loopback) would let anyone "
            "who reaches it act as an admin and dispatch: use HEADEND_AUTH=on (or auto) with "
            "tokens from `der tokens create`, bind HEADEND_HTTP_ADDR to 127.0.0.1, or set "
            "HEADEND_INSECURE=1 to accept the risk"
        )


def token_actor(token: StoredToken) -> Actor:
    return Actor(kind="token", name=token.label(), role=token.role)


def actor_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Actor:
    """Who made the request (set by the access check); :data:`ANONYMOUS` on open routes and
    while authentication is off."""
    actor = connection.scope.get("user")
    return actor if isinstance(actor, Actor) else ANONYMOUS


def client_source(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The client's address as the audit trail names it (the peer of the TCP connection:
    behind a reverse proxy, the proxy's)."""
    client = connection.client
    return client.host if client and client.host else "unknown"


# ----------------------------------------------------------------------------- denials


@dataclass
class _SourceWindow:
    last: float
    suppressed: int = 0


class DenialLimiter:
    """Decides which refused requests get a ``rest.denied`` audit record, so a flood of
    them cannot fill storage: at most one per source per ``window_s`` and ``max_per_s``
    in all. The refusals not recorded are counted and reported (``suppressed``) in the
    next record for their source; :meth:`due` lists the counts of sources gone quiet.
    """

    def __init__(
        self, *, window_s: float = 1.0, max_per_s: int = 20, max_sources: int = 10_000
    ) -> None:
        self.window_s = window_s
        self.max_per_s = max_per_s
        self.max_sources = max_sources
        self._sources: dict[str, _SourceWindow] = {}
        self._recent: collections.deque[float] = collections.deque()
        self._overflow = 0  # refusals from sources beyond max_sources

    def admit(self, source: str, now: float) -> int | None:
        """``None``: do not record this refusal (it was counted). Else record it and report
        the returned number of earlier refusals that were not recorded: from ``source``,
        plus any from sources beyond ``max_sources``."""
        window = self._sources.get(source)
        if window is None:
            window = self._add(source, now - self.window_s)
            if window is None:  # too many sources at once: count it, record nothing
                self._overflow += 1
                return None
        if now - window.last < self.window_s or not self._take_global(now):
            window.suppressed += 1
            return None
        suppressed = window.suppressed + self._take_overflow()
        window.last, window.suppressed = now, 0
        return suppressed

    def due(self, now: float) -> list[tuple[str, int]]:
        """Sources quiet for a window with refusals not yet reported, and their counts
        (reset by this call); forgets quiet sources with nothing to report."""
        out: list[tuple[str, int]] = []
        for source, window in list(self._sources.items()):
            if now - window.last < self.window_s:
                continue
            if window.suppressed and self._take_global(now):
                out.append((source, window.suppressed + self._take_overflow()))
                window.last, window.suppressed = now, 0
            elif not window.suppressed:
                del self._sources[source]
        return out

    def _take_global(self, now: float) -> bool:
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        if len(self._recent) >= self.max_per_s:
            return False
        self._recent.append(now)
        return True

    def _take_overflow(self) -> int:
        count, self._overflow = self._overflow, 0
        return count

    def _add(self, source: str, last: float) -> _SourceWindow | None:
        if len(self._sources) >= self.max_sources:
            return None
        window = _SourceWindow(last)
        self._sources[source] = window
        return window


# ----------------------------------------------------------------------------- live tokens


class RestAuth:
    """The headend's live token set and authentication mode.

    :param config: ``auth``, ``tokens_path``, ``http_addr``, ``insecure``.
    """

    def __init__(self, config: HeadendConfig) -> None:
        self.config = config
        self.store = TokenFileStore(config.tokens_path)
        self._file = TokenFile()
        self._by_hash: dict[str, StoredToken] = {}  # the tokens of _file by secret hash
        self._signature: FileSignature | None = None
        self._bad_signature: FileSignature | None = None
        self._loopback = is_loopback(config.http_host_port[0])
        self._enabled = True
        self._lock = asyncio.Lock()
        self._auditor: Auditor | None = None
        self._denials = DenialLimiter()
        self._audited: set[str] = set()  # change ids recorded, in case dropping them failed
        self._watch_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Check the configuration, read the token file, start watching it.

        :raises DerSdkError: ``HEADEND_AUTH=off`` where it is refused, or a token file
            that cannot be read; the message says what to do.
        """
        check_auth_config(self.config)
        content, signature = await asyncio.to_thread(self.store.read_with_signature)
        self._set_file(content)
        self._signature = signature
        self._enabled = self._decide()
        self._log_mode(at_start=True)
        self._watch_task = asyncio.create_task(self._watch(), name="headend-token-watch")

    async def storage_ready(self, auditor: Auditor) -> None:
        """Storage is open: audit from now on, starting with changes ``der tokens`` made
        while the headend was not running."""
        self._auditor = auditor
        async with self._lock:
            await self._audit_cli_changes()

    async def close(self) -> None:
        task, self._watch_task = self._watch_task, None
        await cancel_and_wait([task])

    # ------------------------------------------------------------------ state

    @property
    def enabled(self) -> bool:
        """Whether requests need a token now (``HEADEND_AUTH`` and, for ``auto``, the
        address and the token set)."""
        return self._enabled

    def tokens(self) -> list[StoredToken]:
        """Every token of the file as last read (revoked ones included), oldest first."""
        return list(self._file.tokens)

    def identify(self, secret: str) -> StoredToken | None:
        """The token (active or revoked) whose secret this is, or ``None``.

        One dictionary lookup by the secret's SHA-256, not a constant-time comparison with
        every stored hash: the time a lookup takes depends only on the hash of what was
        presented, and the hash of a guess says nothing about a random secret.
        """
        if not secret.startswith(TOKEN_PREFIX):
            return None
        return self._by_hash.get(hash_secret(secret))

    # ------------------------------------------------------------------ changes (REST)

    async def create(self, *, role: Role, name: str) -> tuple[StoredToken, str]:
        """Add a token to the file (and to the live set). Returns it and its secret."""

        def create() -> tuple[tuple[StoredToken, str], TokenFile, FileSignature | None]:
            token, secret, content, signature = self.store.create(role=role, name=name)
            return (token, secret), content, signature

        return await self._change(create)

    async def revoke(self, token_id: str) -> tuple[StoredToken, bool]:
        """Revoke a token in the file and the live set: the next request with it is
        refused. Returns it and whether this call revoked it.

        :raises UnknownTokenError: no such token.
        """

        def revoke() -> tuple[tuple[StoredToken, bool], TokenFile, FileSignature | None]:
            token, changed, content, signature = self.store.revoke(token_id)
            return (token, changed), content, signature

        return await self._change(revoke)

    async def _change(self, change: Callable[[], tuple[T, TokenFile, FileSignature | None]]) -> T:
        async def write_and_apply() -> T:
            async with self._lock:
                result, content, signature = await asyncio.to_thread(change)
                self._apply(content, signature)
                return result

        # Shielded: a client that goes away mid-change must not leave the live tokens
        # behind the file (a revoked token accepted until the next reload).
        return await asyncio.shield(asyncio.ensure_future(write_and_apply()))

    # ------------------------------------------------------------------ denials

    async def record_denial(
        self,
        *,
        actor: Actor,
        source: str,
        status: int,
        detail: str,
        method: str,
        path: str,
    ) -> None:
        """Log and audit a refused request, at most once per source per second."""
        suppressed = self._denials.admit(source, time.monotonic())
        if suppressed is None:
            return
        more = (
            f" ({suppressed} more refused from there since the last record)" if suppressed else ""
        )
        log.info("REST %d %s %s from %s: %s%s", status, method, path, source, detail, more)
        if self._auditor is not None:
            await self._auditor.record(
                "rest.denied",
                actor=actor,
                source=source,
                outcome="denied",
                message=f"{status} {method} {path}: {detail}",
                status=status,
                method=method,
                path=path,
                suppressed=suppressed,
            )

    async def _flush_denials(self) -> None:
        for source, count in self._denials.due(time.monotonic()):
            log.info("REST refused %d more request(s) from %s", count, source)
            if self._auditor is not None:
                await self._auditor.record(
                    "rest.denied",
                    actor=ANONYMOUS,
                    source=source,
                    outcome="denied",
                    message=f"{count} more request(s) from {source} refused",
                    suppressed=count,
                )

    # ------------------------------------------------------------------ the file

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_S)
            try:
                await self._reload_if_changed()
                await self._flush_denials()
            except Exception:
                log.exception("checking token file %s failed; trying again", self.store.path)

    async def _reload_if_changed(self) -> None:
        async with self._lock:
            try:
                signature = await asyncio.to_thread(self.store.signature)
            except DerSdkError as exc:
                log.error("%s; keeping the tokens read before", exc)
                return
            if signature == self._signature or (
                signature is not None and signature == self._bad_signature
            ):
                if self._file.unaudited and self._auditor is not None:
                    await self._audit_cli_changes()
                return
            try:
                content, signature = await asyncio.to_thread(self.store.read_with_signature)
            except DerSdkError as exc:
                self._bad_signature = signature
                log.error("%s; keeping the tokens read before", exc)
                return
            before = {t.id: t for t in self._file.tokens}
            self._apply(content, signature)
            self._log_reload(before)
            await self._audit_cli_changes()

    async def _audit_cli_changes(self) -> None:
        """Move ``der tokens`` changes listed in the file into the audit trail (caller
        holds the lock)."""
        auditor = self._auditor
        changes = list(self._file.unaudited)
        if auditor is None or not changes:
            return
        for change in changes:
            if change.change_id in self._audited:
                continue
            self._audited.add(change.change_id)
            await auditor.record(
                change.action,
                actor=Actor(kind="cli", name=change.by),
                source="cli",
                outcome="ok",
                message=_cli_message(change, self.store.path.name),
                token_id=change.token_id,
                token_name=change.name,
                role=change.role,
                changed_at=change.at.isoformat(),
                change_id=change.change_id,
            )
        content, signature = await asyncio.to_thread(
            self.store.drop_unaudited, [c.change_id for c in changes]
        )
        self._apply(content, signature)

    def _apply(self, content: TokenFile, signature: FileSignature | None) -> None:
        self._set_file(content)
        self._signature, self._bad_signature = signature, None
        enabled = self._decide()
        if enabled != self._enabled:
            self._enabled = enabled
            self._log_mode(at_start=False)

    def _set_file(self, content: TokenFile) -> None:
        # The last token listed wins a (never expected) shared hash, as match_secret does.
        self._by_hash = {token.hash: token for token in content.tokens}
        self._file = content

    def _decide(self) -> bool:
        if self.config.auth == "on":
            return True
        if self.config.auth == "off":
            return False
        return not (self._loopback and self._file.active_count() == 0)

    def _log_mode(self, *, at_start: bool) -> None:
        path = self.store.path
        active = self._file.active_count()
        now = "" if at_start else "now "
        if not self._enabled:
            why = (
                "HEADEND_AUTH=off"
                if self.config.auth == "off"
                else f"HEADEND_AUTH=auto, REST on loopback and no active token in {path}"
            )
            log.warning(
                "REST authentication is %sOFF (%s): every request acts as an anonymous admin; "
                "`der tokens create --role admin` turns it on",
                now,
                why,
            )
        elif active == 0:
            log.warning(
                "REST authentication is %sON with no active token in %s: every request but "
                "/healthz and /schema is refused; create one with `der tokens create --role "
                "admin --file %s`",
                now,
                path,
                path,
            )
        else:
            log.info("REST authentication is %sON: %d active token(s) in %s", now, active, path)

    def _log_reload(self, before: dict[str, StoredToken]) -> None:
        after = {t.id: t for t in self._file.tokens}
        added = [i for i in after if i not in before]
        revoked = [i for i, t in after.items() if not t.active and i in before and before[i].active]
        removed = [i for i in before if i not in after]
        log.info(
            "token file %s changed: %d token(s), %d active (added %s; revoked %s; removed %s)",
            self.store.path,
            len(after),
            self._file.active_count(),
            ", ".join(added) or "none",
            ", ".join(revoked) or "none",
            ", ".join(removed) or "none",
        )


def _cli_message(change: UnauditedChange, file_name: str) -> str:
    verb = "created" if change.action == "token.create" else "revoked"
    name = f" {change.name}" if change.name else ""
    return (
        f"token {change.token_id}{name} ({change.role}) {verb} with `der tokens` by "
        f"{change.by} at {change.at.isoformat()} in {file_name}"
    )


# ----------------------------------------------------------------------------- the middleware

AUTHORIZATION = b"authorization"


def create_auth_middleware(headend: Headend) -> Callable[..., ASGIApp]:
    """The app-wide access check, as an ASGI middleware around every route: checks the
    bearer token against the matched route's rule (``scope["route_handler"]``, set by
    routing before the route's middleware runs), sets the request's actor
    (:func:`actor_of`), and audits refusals.

    A middleware rather than a Litestar guard: a guard gets a copy of the route handler
    on every request, which cost about a tenth of the CPU of ``GET /telemetry/{id}``.
    A refusal raises the same exceptions a guard would, so the app's exception handlers
    answer them (the error body of :mod:`der_sdk_headend.rest.errors`); unknown paths
    and methods never reach it (routing answers 404/405 first).
    """

    from der_sdk_headend.console.auth import is_console_route

    def middleware(app: ASGIApp) -> ASGIApp:
        async def check_access(scope: Scope, receive: Receive, send: Send) -> None:
            level: Access = access_of(scope["route_handler"]) or "admin"
            if level == "metrics":
                level = "open" if headend.config.metrics_auth == "open" else "viewer"
            if level != "open":
                auth = headend.rest_auth
                if auth.enabled:
                    scope["user"], receive = await _authenticate(auth, scope, receive, level)
                elif scope["route_handler"].opt.get(TOKEN_ALWAYS_KEY):
                    scope["user"], receive = await _authenticate(
                        auth, scope, receive, level, always=True
                    )
                else:
                    scope["user"] = ANONYMOUS
                    if is_console_route(scope) and scope.get("method") in _UNSAFE:
                        receive = await _console_csrf(auth, scope, receive, None)
            await app(scope, receive, send)

        return check_access

    return middleware


def _authorization(scope: Scope) -> str | None:
    """The first ``Authorization`` header, as ``connection.headers.get`` would give it."""
    for name, value in scope["headers"]:
        if name == AUTHORIZATION or name.lower() == AUTHORIZATION:
            return value.decode("latin-1")
    return None


_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def _console_csrf(
    auth: RestAuth, scope: Scope, receive: Receive, secret: str | None
) -> Receive:
    """The ``receive`` to use after checking the console session's CSRF token; 403 without
    it (:mod:`der_sdk_headend.console.auth`)."""
    from der_sdk_headend.console.auth import CSRF_FIELD, CSRF_HEADER, check_csrf

    checked = await check_csrf(scope, receive, secret)
    if checked is None:
        await _refuse(
            auth,
            ASGIConnection(scope),
            403,
            f"missing or wrong CSRF token: a console request that changes something must "
            f"send the page's token as the {CSRF_HEADER} header or the {CSRF_FIELD} form "
            "field (REST clients send `Authorization: Bearer <token>` instead of the cookie)",
        )
    return checked


async def _authenticate(
    auth: RestAuth, scope: Scope, receive: Receive, level: Role, *, always: bool = False
) -> tuple[Actor, Receive]:
    """The actor of a request to a route that needs ``level`` and the ``receive`` to use
    from now on; raises the 401/403.

    Without an ``Authorization`` header, the console cookie's token is used, with the
    CSRF check for unsafe methods. ``always``: the route checks tokens although
    authentication is off, which the 401 says, with the way to the first token."""
    from der_sdk_headend.console.auth import cookie_secret, is_console_route

    header = _authorization(scope)
    if header is None:
        secret = cookie_secret(scope)
        if secret is not None:
            if scope.get("method") in _UNSAFE:
                receive = await _console_csrf(auth, scope, receive, secret)
            header = f"Bearer {secret}"
        elif is_console_route(scope):
            # A browser not signed in: the console answers with the sign-in page; not
            # a refusal worth a record.
            raise NotAuthorizedException("sign in to the console")
    if header is None:
        await _refuse(
            auth,
            ASGIConnection(scope),
            401,
            "missing bearer token: send `Authorization: Bearer <token>` "
            + (
                "(/tokens needs an admin token even while REST authentication is off: "
                "create the first one with `der tokens create --role admin`)"
                if always
                else "(an admin creates tokens with `der tokens create` or POST /tokens)"
            ),
        )
    scheme, _, secret = header.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        await _refuse(
            auth,
            ASGIConnection(scope),
            401,
            "the Authorization header is not `Bearer <token>`",
            invalid=True,
        )
    token = auth.identify(secret)
    if token is None:
        await _refuse(auth, ASGIConnection(scope), 401, "unknown token", invalid=True)
    actor = token_actor(token)
    if not token.active:
        assert token.revoked_at is not None
        await _refuse(
            auth,
            ASGIConnection(scope),
            401,
            f"token {token.id} was revoked at {token.revoked_at.isoformat()}",
            actor=actor,
            invalid=True,
        )
    if not role_allows(token.role, level):
        connection: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope)
        await _refuse(
            auth,
            connection,
            403,
            f"{_method(connection)} {connection.url.path} needs the {level} role; "
            f"token {token.id} has the {token.role} role",
            actor=actor,
        )
    return actor, receive


async def _refuse(
    auth: RestAuth,
    connection: ASGIConnection[Any, Any, Any, Any],
    status: Literal[401, 403],
    detail: str,
    *,
    actor: Actor = ANONYMOUS,
    invalid: bool = False,
) -> NoReturn:
    await auth.record_denial(
        actor=actor,
        source=client_source(connection),
        status=status,
        detail=detail,
        method=_method(connection),
        path=connection.url.path,
    )
    if status == 403:
        raise PermissionDeniedException(detail)
    challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if invalid else "")
    raise NotAuthorizedException(detail, headers={"WWW-Authenticate": challenge})


def _method(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    return str(connection.scope.get("method", "?"))
