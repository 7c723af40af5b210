"""Console sign-in: the REST bearer token kept in a cookie, a CSRF token per session, and
the role each page needs.

The console signs in with the same tokens and roles as REST (:mod:`der_sdk_headend.rest.auth`).
The token's secret is kept in the :data:`COOKIE` cookie (HttpOnly, SameSite=Strict, Secure
under TLS); the REST access middleware accepts it in place of an ``Authorization`` header.
A request that sends the cookie with an unsafe method (POST, PUT, PATCH, DELETE) must also
carry the session's CSRF token (:func:`csrf_token`), as header :data:`CSRF_HEADER` (htmx
sends it from ``hx-headers`` on ``<body>``; ``fetch`` from ``consoleFetch`` in console.js)
or as the form field :data:`CSRF_FIELD`; otherwise it is refused with 403. A request with
an ``Authorization`` header is a REST call and is checked exactly as before.

The CSRF token is an HMAC of the session's secret, so it needs no server-side state and
changes with the token; with authentication off it is an HMAC of a per-process key (console
forms are still checked: a cross-site form post must not act as the anonymous admin).

A page declares its role with :func:`page`: ``@get("/console/audit", **page("admin"))``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from litestar import Request, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.params import FromQuery
from litestar.response import Redirect, Template

from der_sdk_headend.audit import Actor
from der_sdk_headend.rest.auth import (
    Access,
    access,
    actor_of,
    client_source,
    token_actor,
)

if TYPE_CHECKING:
    from litestar.types import Receive, Scope

    from der_sdk_headend.service import Headend

__all__ = [
    "CONSOLE_KEY",
    "COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "SIGN_IN_PATH",
    "check_csrf",
    "cookie_secret",
    "csrf_token",
    "is_console_route",
    "page",
    "session_cookie",
    "sign_in",
    "sign_in_form",
    "sign_out",
]

COOKIE = "der_console"
"""The cookie holding the signed-in token's secret."""
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
CONSOLE_KEY = "der_console"
"""``opt`` key of every console route (pages, sign-in, static files)."""
SIGN_IN_PATH = "/console/sign-in"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ANONYMOUS_KEY = secrets.token_bytes(32)
_COOKIE_HEADER = b"cookie"
_CSRF_HEADER = CSRF_HEADER.lower().encode()
_FORM = b"application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024


def page(level: Access) -> dict[str, Any]:
    """Route decorator arguments of a console page or form: who may use it (as
    :func:`~der_sdk_headend.rest.auth.access`), marked as console (no sign-in: redirect to
    the sign-in page; HTML errors), and left out of the OpenAPI schema."""
    rule = access(level)
    return {
        "opt": {**rule["opt"], CONSOLE_KEY: True},
        "include_in_schema": False,
    }


def is_console_route(scope: Scope) -> bool:
    return bool(scope["route_handler"].opt.get(CONSOLE_KEY))


# ----------------------------------------------------------------------------- cookie and CSRF


def cookie_secret(scope: Scope) -> str | None:
    """The token secret in the console cookie, ``None`` without one."""
    for name, value in scope["headers"]:
        if name.lower() != _COOKIE_HEADER:
            continue
        for part in value.decode("latin-1").split(";"):
            key, _, secret = part.strip().partition("=")
            if key == COOKIE and secret:
                return secret.strip().strip('"')
    return None


def csrf_for(secret: str | None) -> str:
    """The CSRF token of the session signed in with ``secret`` (``None``: no session,
    authentication off)."""
    if secret is None:
        return hmac.new(_ANONYMOUS_KEY, b"der-console-csrf", hashlib.sha256).hexdigest()
    return hmac.new(secret.encode(), b"der-console-csrf", hashlib.sha256).hexdigest()


def csrf_token(request: Request[Any, Any, Any]) -> str:
    """The CSRF token for the page being rendered: put it in forms as the hidden field
    ``csrf_token`` (base.html provides it as ``{{ csrf_token }}`` and in the
    ``<meta name="csrf-token">`` tag)."""
    return csrf_for(cookie_secret(request.scope))


async def check_csrf(scope: Scope, receive: Receive, secret: str | None) -> Receive | None:
    """Whether an unsafe request carries the CSRF token of ``secret``'s session.

    Looks at the :data:`CSRF_HEADER` header, then at the :data:`CSRF_FIELD` field of a
    url-encoded form body (read here, bounded, and replayed to the handler). Returns the
    ``receive`` the app must use from now on, or ``None`` when the token is missing or
    wrong.
    """
    expected = csrf_for(secret)
    content_type = b""
    for name, value in scope["headers"]:
        low = name.lower()
        if low == _CSRF_HEADER:
            return receive if hmac.compare_digest(value.decode("latin-1"), expected) else None
        if low == b"content-type":
            content_type = value
    if not content_type.lower().startswith(_FORM):
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        size += len(body)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(body)
        if not message.get("more_body", False):
            break
    whole = b"".join(chunks)
    fields = parse_qs(whole.decode("latin-1"), keep_blank_values=True)
    presented = fields.get(CSRF_FIELD, [""])[0]
    if not hmac.compare_digest(presented, expected):
        return None
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": whole, "more_body": False}
        return await receive()

    return replay


# ----------------------------------------------------------------------------- sign in / out


def _local_next(target: str | None) -> str:
    """Where to go after signing in: a path on this headend, never another site."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _same_origin(request: Request[Any, Any, Any]) -> bool:
    """Whether the browser says the request comes from a page of this headend (a request
    without an ``Origin`` header, from a client that is no browser, passes)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower()


def session_cookie(headend: Headend, value: str, *, max_age: int | None = None) -> Cookie:
    """The console cookie holding ``value`` (``max_age=0`` with ``""``: forget it)."""
    return Cookie(
        key=COOKIE,
        value=value,
        path="/",
        httponly=True,
        samesite="strict",
        secure=headend.config.tls,
        max_age=max_age,
    )


@get(SIGN_IN_PATH, **page("open"))
async def sign_in_form(
    request: Request[Any, Any, Any],
    headend: NamedDependency[Headend],
    next: FromQuery[str | None] = None,
) -> Template | Redirect:
    """The sign-in page; with authentication off, straight to the fleet."""
    if not headend.rest_auth.enabled:
        return Redirect(_local_next(next))
    return Template(
        "sign_in.html",
        context={"next": _local_next(next), "error": None, "auth_enabled": True},
    )


@post(SIGN_IN_PATH, **page("open"), status_code=303)
async def sign_in(
    request: Request[Any, Any, Any], headend: NamedDependency[Headend]
) -> Template | Redirect:
    """Check the token from the form and keep it in the cookie; a wrong one is refused
    (401, the page again with the reason) and audited like a refused REST call."""
    if not _same_origin(request):
        # Login CSRF: a page elsewhere must not sign this browser in with its own token.
        return Template(
            "sign_in.html",
            context={
                "next": "/",
                "error": "Sign-in refused: the form was sent from another site.",
                "auth_enabled": True,
            },
            status_code=403,
        )
    form = await request.form()
    secret = str(form.get("token", "")).strip()
    target = _local_next(str(form.get("next", "/")))
    auth = headend.rest_auth
    if not auth.enabled:
        return Redirect(target)
    token = auth.identify(secret) if secret else None
    error: str | None = None
    if token is None:
        error = "Unknown token: paste a REST token (der_...) from `der tokens create`."
    elif not token.active:
        error = f"Token {token.id} was revoked; ask an admin for a new one."
    source = client_source(request)
    if error is not None or token is None:
        await auth.record_denial(
            actor=token_actor(token) if token is not None else actor_of(request),
            source=source,
            status=401,
            detail=f"console sign-in refused: {error}",
            method="POST",
            path=SIGN_IN_PATH,
        )
        return Template(
            "sign_in.html",
            context={"next": target, "error": error, "auth_enabled": True},
            status_code=401,
        )
    actor = token_actor(token)
    await headend.auditor.record(
        "console.sign_in",
        actor=actor,
        source=source,
        outcome="ok",
        message=f"{actor.name} ({actor.role}) signed in to the console",
    )
    return Redirect(target, status_code=303, cookies=[session_cookie(headend, secret)])


@post("/console/sign-out", **page("viewer"), status_code=303)
async def sign_out(request: Request[Any, Any, Any], headend: NamedDependency[Headend]) -> Redirect:
    """Forget the cookie (the token itself stays valid: revoke it with ``der tokens``)."""
    actor: Actor = actor_of(request)
    if headend.rest_auth.enabled:
        await headend.auditor.record(
            "console.sign_out",
            actor=actor,
            source=client_source(request),
            outcome="ok",
            message=f"{actor.name} signed out of the console",
        )
    return Redirect(
        SIGN_IN_PATH if headend.rest_auth.enabled else "/",
        status_code=303,
        cookies=[session_cookie(headend, "", max_age=0)],
    )
