"""``/plugins``, ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from litestar import Controller, MediaType, Request, Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec

from der_sdk_headend.rest.auth import access
from der_sdk_headend.rest.metrics import render_metrics
from der_sdk_headend.rest.schemas import Health, PluginRow

if TYPE_CHECKING:
    from der_sdk_headend.service import Headend

__all__ = ["HEALTH_CHECK_TIMEOUT_S", "SystemController"]

log = logging.getLogger("der.headend.rest")

HEALTH_CHECK_TIMEOUT_S = 2.0
"""``/healthz`` answers degraded when storage takes longer than this to say it is healthy
(a stalled SQLite write lock, an unreachable server), instead of keeping the prober waiting."""


class SystemController(Controller):
    tags = ["system"]

    @get(
        "/plugins",
        summary="Installed plugins with package, version and hooks",
        **access("viewer"),
    )
    async def plugins(self, headend: NamedDependency[Headend]) -> list[PluginRow]:
        commands = headend.plugins.commands.by_plugin()
        return [
            PluginRow(
                name=p.name,
                package=p.package,
                version=p.version,
                hooks=list(p.hooks),
                builtin=p.builtin,
                commands=commands.get(p.name, []),
            )
            for p in headend.plugins.info()
        ]

    @get(
        "/healthz",
        summary="Liveness, storage health and ingest backlog",
        description="200 with status `ok`; 503 with status `degraded` and a `reason` when "
        "storage is not healthy (or does not answer within 2 s), the message bus of a cluster "
        "is not connected, telemetry writes are "
        "stalled (failing, or the oldest queued batch waiting longer than 5 s), or a program "
        "source has lost its upstream server (`programs` lists each program). Latest "
        "values and the rest of the API keep answering while degraded. Needs no token.",
        responses={503: ResponseSpec(Health, description="`degraded`, with a `reason`")},
        **access("open"),
    )
    async def healthz(self, headend: NamedDependency[Headend]) -> Response[Health]:
        storage = headend.storage
        reason: str | None = None
        try:
            async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_S):
                if not await storage.healthy():
                    reason = f"storage {storage.name} is not healthy"
        except TimeoutError:
            reason = (
                f"storage {storage.name} did not answer its health check within "
                f"{HEALTH_CHECK_TIMEOUT_S:g} s"
            )
        except Exception as exc:
            reason = f"storage {storage.name} health check failed: {type(exc).__name__}"
        cluster = headend.cluster
        if reason is None and cluster is not None:
            reason = cluster.health_reason()
        queued_batches = queued_samples = 0
        ingest = headend.ingest_or_none
        if ingest is not None:
            stats = ingest.stats()
            queued_batches, queued_samples = stats.queued_batches, stats.queued_samples
            if reason is None and stats.stalled:
                reason = stats.stall_reason
        writers = headend.stream_writers  # bus mode: the stream writers and the stream
        if reason is None and writers is not None:
            reason = writers.health_reason()
        programs = headend.programs
        if reason is None and programs is not None:
            reason = programs.health_reason()
        health = Health(
            status="ok" if reason is None else "degraded",
            storage=storage.name,
            agents_connected=headend.agents_connected,
            assets_connected=headend.assets_connected,
            reason=reason,
            ingest_queued_batches=queued_batches,
            ingest_queued_samples=queued_samples,
            programs=programs.health() if programs is not None else [],
        )
        return Response(health, status_code=200 if reason is None else 503)

    @get(
        "/metrics",
        summary="Prometheus metrics",
        description="Ingest queue and storage writes, telemetry gaps, connected agents, "
        "active alarms by severity, and each connected agent's store-and-forward buffer "
        "(from its heartbeats), in the Prometheus text format. Needs a viewer token unless "
        "the headend runs with `METRICS_AUTH=open`.",
        media_type=MediaType.TEXT,
        **access("metrics"),
    )
    async def metrics(
        self, request: Request[Any, Any, Any], headend: NamedDependency[Headend]
    ) -> Response[bytes]:
        body, content_type = render_metrics(
            headend, request.headers.get("accept"), await _alarm_counts(headend)
        )
        return Response(body, media_type=content_type)


async def _alarm_counts(headend: Headend) -> dict[str, int] | None:
    """Active alarms by severity from storage, or ``None`` (left out of the scrape, the
    rest still served) while storage is not open, slow or failing."""
    if headend.ingest_or_none is None:  # storage is not open yet
        return None
    try:
        async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_S):
            counts = await headend.storage.active_alarm_counts()
        return {str(severity): count for severity, count in counts.items()}
    except Exception as exc:
        log.warning("/metrics: active alarms left out: %s: %s", type(exc).__name__, exc)
        return None
