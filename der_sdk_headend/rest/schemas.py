"""Response bodies of the REST API that are not domain models themselves."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from der_sdk.models import Dispatch, DispatchEvent

__all__ = [
    "AgentRow",
    "DispatchDetail",
    "ErrorBody",
    "Health",
    "PluginRow",
    "SessionRow",
    "SiteRow",
]


class SiteRow(msgspec.Struct, kw_only=True):
    """A site and the ids of its assets (sorted)."""

    site_id: str
    name: str
    location: str | None = None
    asset_ids: list[str] = msgspec.field(default_factory=list)


class SessionRow(msgspec.Struct, kw_only=True):
    """One past or current session of an asset."""

    connected_at: datetime
    disconnected_at: datetime | None
    peer: str
    agent_id: str


class AgentRow(msgspec.Struct, kw_only=True):
    """One configured asset and the agent stream serving it (if any).

    ``peer`` and ``agent_id`` are those of the live stream; ``last_seen`` is kept after
    the asset disconnects (for this headend run).
    """

    asset_id: str
    asset_name: str
    site_id: str
    site_name: str
    connected: bool
    peer: str | None = None
    agent_id: str | None = None
    last_seen: datetime | None = None
    sessions: list[SessionRow] = msgspec.field(default_factory=list)


class DispatchDetail(Dispatch, kw_only=True):
    """A dispatch record with its lifecycle events, oldest first."""

    events: list[DispatchEvent] = msgspec.field(default_factory=list)


class PluginRow(msgspec.Struct, kw_only=True):
    """An installed plugin: where it comes from and the hooks it implements."""

    name: str
    package: str
    version: str
    hooks: list[str]
    builtin: bool


class Health(msgspec.Struct, kw_only=True):
    """``GET /healthz``: ``ok`` (200), or ``degraded`` (503) when storage is unhealthy or
    telemetry writes are stalled (``reason`` says which)."""

    status: Literal["ok", "degraded"]
    storage: str
    agents_connected: int
    assets_connected: int
    reason: str | None = None
    ingest_queued_batches: int = 0
    ingest_queued_samples: int = 0


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error response: the HTTP status and a ``detail`` saying what and where."""

    status_code: int
    detail: str
    extra: Any = None
