"""The operator console: server-rendered pages served by the headend at ``/`` and
``/console/...`` (REST stays where it is), htmx for partial updates, every script and style
served from this package (no CDN: control rooms are often air-gapped).

:func:`console_handlers` gives the route handlers :func:`der_sdk_headend.rest.create_app`
mounts; :func:`template_config` the Jinja2 templates (``console/templates``). Pages render
with :func:`render`, which adds what ``base.html`` needs (the signed-in actor, the CSRF
token, the navigation). Sign-in, the cookie and CSRF: :mod:`.auth`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, Router
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar_htmx import HTMXRequest

from der_sdk_headend.console.auth import (
    CONSOLE_KEY,
    CSRF_FIELD,
    CSRF_HEADER,
    SIGN_IN_PATH,
    csrf_token,
    sign_in,
    sign_in_form,
    sign_out,
)
from der_sdk_headend.rest.auth import access, actor_of
from der_sdk_headend.tokens import role_allows

if TYPE_CHECKING:
    from litestar.types import ControllerRouterHandler, ExceptionHandlersMap

    from der_sdk_headend.service import Headend

__all__ = [
    "STATIC_DIR",
    "STATIC_PATH",
    "TEMPLATES_DIR",
    "console_context",
    "console_handlers",
    "render",
    "template_config",
]

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
STATIC_PATH = "/console/static"


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    """The console's Jinja2 templates (autoescaped)."""
    return TemplateConfig(directory=TEMPLATES_DIR, engine=JinjaTemplateEngine)


def console_context(request: Request[Any, Any, Any], headend: Headend) -> dict[str, Any]:
    """What ``base.html`` uses: ``actor`` (who is signed in), ``role`` (viewer, operator,
    admin; ``admin`` while authentication is off), ``can_operate``/``is_admin``,
    ``csrf_token``, ``csrf_header``, ``csrf_field``, ``auth_enabled``, ``path``."""
    actor = actor_of(request)
    enabled = headend.rest_auth.enabled
    role = (actor.role or "viewer") if enabled else "admin"
    return {
        "actor": actor,
        "role": role,
        "can_operate": role_allows(role, "operator"),  # type: ignore[arg-type]
        "is_admin": role == "admin",
        "csrf_token": csrf_token(request),
        "csrf_header": CSRF_HEADER,
        "csrf_field": CSRF_FIELD,
        "auth_enabled": enabled,
        "path": request.url.path,
        "static": STATIC_PATH,
    }


def render(
    request: Request[Any, Any, Any],
    headend: Headend,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
) -> Template:
    """A page (or an htmx partial) with :func:`console_context` merged under ``context``."""
    return Template(
        template,
        context={**console_context(request, headend), **(context or {})},
        status_code=status_code,
    )


def _not_signed_in(request: Request[Any, Any, Any], exc: NotAuthorizedException) -> Response[Any]:
    """A page asked for without (a valid) sign-in: to the sign-in page, then back."""
    if request.method == "GET" and not request.headers.get("hx-request"):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return Redirect(f"{SIGN_IN_PATH}?next={_quote(target)}", status_code=303)
    return Response(
        {"status": 401, "detail": exc.detail},
        status_code=401,
        headers={"HX-Redirect": SIGN_IN_PATH},
    )


def _refused(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Console errors as a small HTML page (htmx requests get the text alone)."""
    status = exc.status_code
    if request.headers.get("hx-request"):
        return Response(exc.detail, status_code=status, media_type="text/plain")
    return Template(
        "error.html",
        context={"status": status, "detail": exc.detail, "static": STATIC_PATH},
        status_code=status,
    )


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="/")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    NotAuthorizedException: _not_signed_in,
    PermissionDeniedException: _refused,
    HTTPException: _refused,
}


def console_handlers() -> list[ControllerRouterHandler]:
    """The console's routes: pages, sign-in/out and the static files, all out of the
    OpenAPI schema."""
    from der_sdk_headend.console.alarms import ALARM_HANDLERS
    from der_sdk_headend.console.dispatch import DISPATCH_HANDLERS
    from der_sdk_headend.console.pages import PAGE_HANDLERS
    from der_sdk_headend.console.schedules import SCHEDULE_HANDLERS

    pages = Router(
        "/",
        route_handlers=[
            *(sign_in_form, sign_in, sign_out, *PAGE_HANDLERS, *DISPATCH_HANDLERS),
            *(*ALARM_HANDLERS, *SCHEDULE_HANDLERS),
        ],
        request_class=HTMXRequest,
        exception_handlers=EXCEPTION_HANDLERS,
        include_in_schema=False,
    )
    static = create_static_files_router(
        STATIC_PATH,
        directories=[STATIC_DIR],
        opt={**access("open")["opt"], CONSOLE_KEY: True},
        include_in_schema=False,
        name="console-static",
    )
    return [pages, static]
