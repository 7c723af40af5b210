"""The Litestar application, assembled in one place from the controllers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Litestar, Router
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

import der_sdk
from der_sdk_headend.rest.agents import AgentsController
from der_sdk_headend.rest.alarms import AlarmsController
from der_sdk_headend.rest.assets import AssetsController
from der_sdk_headend.rest.audit import AuditController
from der_sdk_headend.rest.auth import (
    BEARER_SCHEME,
    access,
    check_access_rules,
    create_auth_middleware,
)
from der_sdk_headend.rest.body import MAX_BODY_BYTES, JsonBodyRequest
from der_sdk_headend.rest.dispatch import DispatchController
from der_sdk_headend.rest.errors import EXCEPTION_HANDLERS
from der_sdk_headend.rest.events import EventsController
from der_sdk_headend.rest.export import TelemetryExportController
from der_sdk_headend.rest.heartbeat import HeartbeatController
from der_sdk_headend.rest.openapi import StrictStructSchemaPlugin, declare_refusals
from der_sdk_headend.rest.state import app_state
from der_sdk_headend.rest.system import SystemController
from der_sdk_headend.rest.telemetry import TelemetryController
from der_sdk_headend.rest.tokens import TokensController

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["create_app"]


def create_app(headend: Headend) -> Litestar:
    """The REST API of ``headend``; every handler gets it as the ``headend`` dependency
    (the hot ``GET /telemetry/{id}`` from the app's state: :mod:`.state`).

    Every route declares who may call it (:func:`der_sdk_headend.rest.auth.access`); one
    middleware enforces it. Bodies are JSON of bounded size (:mod:`.body`). OpenAPI is
    served, to anybody, at ``/schema/openapi.json``, with every refusal a route can answer
    (:mod:`.openapi`).
    """

    # Imported here: the console imports rest.auth, and this package's __init__ imports
    # this module, so a module-level import would be circular when the console is
    # imported first.
    from der_sdk_headend.console import STATIC_PATH, console_handlers, template_config
    from der_sdk_headend.console.asset import live_handlers

    def provide_headend() -> Headend:
        return headend

    app = Litestar(
        route_handlers=[
            AssetsController,
            AgentsController,
            TelemetryController,
            TelemetryExportController,
            DispatchController,
            AlarmsController,
            HeartbeatController,
            EventsController,
            SystemController,
            TokensController,
            AuditController,
            *console_handlers(),
            *live_handlers(),  # the console's live stream, Asset page and trends
        ],
        template_config=template_config(),
        dependencies={"headend": Provide(provide_headend, sync_to_thread=False)},
        state=app_state(headend),
        # Handlers annotate ``headend: Headend``; the service module imports this one, so
        # the name is resolved here rather than by a circular import.
        signature_namespace={"Headend": type(headend)},
        middleware=[create_auth_middleware(headend)],
        exception_handlers=EXCEPTION_HANDLERS,
        request_class=JsonBodyRequest,
        request_max_body_size=MAX_BODY_BYTES,
        plugins=[StrictStructSchemaPlugin()],
        openapi_config=OpenAPIConfig(
            title="der-sdk headend",
            version=der_sdk.__version__,
            description="Operator and integration API of the der-sdk reference headend: "
            "inventory, presence, telemetry, dispatch, events. Send "
            "`Authorization: Bearer <token>`; each operation's `BearerToken` requirement "
            "names the role it needs.",
            render_plugins=[
                # Served from the console's static files: the API browser works offline.
                SwaggerRenderPlugin(
                    path="/swagger",
                    js_url=f"{STATIC_PATH}/swagger/swagger-ui-bundle.js",
                    css_url=f"{STATIC_PATH}/swagger/swagger-ui.css",
                    standalone_preset_js_url=f"{STATIC_PATH}/swagger/swagger-ui-standalone-preset.js",
                    favicon=f"<link rel='icon' type='image/png' "
                    f"href='{STATIC_PATH}/swagger/favicon-32x32.png'>",
                )
            ],
            openapi_router=Router(
                "/schema", route_handlers=[], include_in_schema=False, **access("open")
            ),
            components=Components(
                security_schemes={
                    BEARER_SCHEME: SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="A REST token (`der_...`) from `der tokens create` or "
                        "POST /tokens. Roles: viewer < operator < admin.",
                    )
                }
            ),
        ),
        logging_config=None,
    )
    check_access_rules(app)
    declare_refusals(app)
    return app
