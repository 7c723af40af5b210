"""``/plugins`` and ``/healthz``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Controller, Response, get
from litestar.di import NamedDependency

from der_sdk_headend.rest.schemas import Health, PluginRow

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["SystemController"]


class SystemController(Controller):
    tags = ["system"]

    @get("/plugins", summary="Installed plugins with package, version and hooks")
    async def plugins(self, headend: NamedDependency[Headend]) -> list[PluginRow]:
        return [
            PluginRow(
                name=p.name,
                package=p.package,
                version=p.version,
                hooks=list(p.hooks),
                builtin=p.builtin,
            )
            for p in headend.plugins.info()
        ]

    @get(
        "/healthz",
        summary="Liveness and storage health",
        description="200 with status `ok`, or 503 with status `degraded` when storage is "
        "not healthy.",
    )
    async def healthz(self, headend: NamedDependency[Headend]) -> Response[Health]:
        storage = headend.storage
        try:
            healthy = await storage.healthy()
        except Exception:
            healthy = False
        health = Health(
            status="ok" if healthy else "degraded",
            storage=storage.name,
            agents_connected=headend.agents_connected,
            assets_connected=headend.assets_connected,
        )
        return Response(health, status_code=200 if healthy else 503)
