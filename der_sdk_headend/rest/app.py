"""The Litestar application, assembled in one place from the controllers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

import der_sdk
from der_sdk_headend.rest.agents import AgentsController
from der_sdk_headend.rest.assets import AssetsController
from der_sdk_headend.rest.dispatch import DispatchController
from der_sdk_headend.rest.errors import EXCEPTION_HANDLERS
from der_sdk_headend.rest.heartbeat import HeartbeatController
from der_sdk_headend.rest.system import SystemController
from der_sdk_headend.rest.telemetry import TelemetryController

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["create_app"]


def create_app(headend: Headend) -> Litestar:
    """The REST API of ``headend``; every handler gets it as the ``headend`` dependency.

    OpenAPI is served at ``/schema/openapi.json``.
    """

    def provide_headend() -> Headend:
        return headend

    return Litestar(
        route_handlers=[
            AssetsController,
            AgentsController,
            TelemetryController,
            DispatchController,
            HeartbeatController,
            SystemController,
        ],
        dependencies={"headend": Provide(provide_headend, sync_to_thread=False)},
        # Handlers annotate ``headend: Headend``; the service module imports this one, so
        # the name is resolved here rather than by a circular import.
        signature_namespace={"Headend": type(headend)},
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(
            title="der-sdk headend",
            version=der_sdk.__version__,
            description="Operator and integration API of the der-sdk reference headend: "
            "inventory, presence, telemetry, dispatch.",
            path="/schema",
        ),
        logging_config=None,
    )
