"""Response bodies of the REST API that are not domain models themselves."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from der_sdk.control import ControlKind
from der_sdk.models import Asset, Dispatch, DispatchEvent
from der_sdk_headend.audit import Actor
from der_sdk_headend.programs.runner import ProgramHealth
from der_sdk_headend.tokens import MAX_NAME_LENGTH, Role, StoredToken

__all__ = [
    "AgentRow",
    "AssetRow",
    "AuditRecord",
    "ControlState",
    "DispatchDetail",
    "ErrorBody",
    "Health",
    "NewToken",
    "PluginRow",
    "SessionRow",
    "SiteRow",
    "TokenRequest",
    "TokenRow",
]


class SiteRow(msgspec.Struct, kw_only=True):
    """A site and the ids of its assets (sorted)."""

    site_id: str
    name: str
    location: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    split_policy: str | None = None
    asset_ids: list[str] = msgspec.field(default_factory=list)


class ControlState(msgspec.Struct, kw_only=True):
    """How an asset is controlled and the range it can take now (``docs/asset_types.md``).

    ``kind``: what a dispatch's MW means (``setpoint``, ``export_limit``,
    ``import_limit``). ``min_mw``/``max_mw``: the range available now, from the limits and
    the latest telemetry; ``basis`` says what bounded it; ``as_of`` is the time of the
    sample used (``null``: none).
    """

    kind: ControlKind
    min_mw: float
    max_mw: float
    basis: str
    as_of: datetime | None = None


class AssetRow(Asset, frozen=True, kw_only=True):
    """An inventory asset with its ``control`` state now."""

    control: ControlState


class SessionRow(msgspec.Struct, kw_only=True):
    """One past or current session of an asset."""

    connected_at: datetime
    disconnected_at: datetime | None
    peer: str
    agent_id: str
    headend_id: str | None = None
    """The headend the agent was registered with (``HEADEND_ID``); ``null`` for sessions
    recorded before headends had ids."""


class AgentRow(msgspec.Struct, kw_only=True):
    """One configured asset and the agent stream serving it (if any).

    ``peer`` and ``agent_id`` are those of the live stream, and ``headend_id`` the
    ``HEADEND_ID`` of the headend holding it (in a cluster, any replica's); ``last_seen``
    is when this headend last heard from the asset, kept after it disconnects (for this
    headend run).
    """

    asset_id: str
    asset_name: str
    site_id: str
    site_name: str
    connected: bool
    peer: str | None = None
    agent_id: str | None = None
    headend_id: str | None = None
    last_seen: datetime | None = None
    sessions: list[SessionRow] = msgspec.field(default_factory=list)
    clock_offset_s: float | None = None
    """The serving agent's clock offset from the headend's, seconds (headend minus agent),
    as it last reported it; ``None`` when not connected here or not reported."""


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
    commands: list[str] = msgspec.field(default_factory=list)
    """The ``der`` subcommands this plugin provides (``der_commands``)."""


class Health(msgspec.Struct, kw_only=True):
    """``GET /healthz``: ``ok`` (200), or ``degraded`` (503) when storage is unhealthy,
    telemetry writes are stalled or a program lost its server (``reason`` says which)."""

    status: Literal["ok", "degraded"]
    storage: str
    agents_connected: int
    assets_connected: int
    reason: str | None = None
    ingest_queued_batches: int = 0
    ingest_queued_samples: int = 0
    programs: list[ProgramHealth] = msgspec.field(default_factory=list)
    """The northbound programs and whether each reaches its server (docs/programs.md)."""


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error response: the HTTP status and a ``detail`` saying what and where."""

    status_code: int
    detail: str
    extra: Any = None


class TokenRow(msgspec.Struct, kw_only=True):
    """A REST token as admins see it: never its secret or hash."""

    id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None = None
    active: bool

    @classmethod
    def of(cls, token: StoredToken) -> TokenRow:
        return cls(
            id=token.id,
            name=token.name,
            role=token.role,
            created_at=token.created_at,
            revoked_at=token.revoked_at,
            active=token.active,
        )


class NewToken(TokenRow, kw_only=True):
    """``POST /tokens``: the new token with its secret, shown this once and never again."""

    token: str


class TokenRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /tokens``."""

    role: Role
    name: Annotated[
        str, msgspec.Meta(max_length=MAX_NAME_LENGTH, pattern=r"^[^\x00-\x1f\x7f]*$")
    ] = ""


class AuditRecord(msgspec.Struct, kw_only=True):
    """One audit record: who (``actor``) did what (``action``) from where (``source``),
    how it ended (``outcome``), and the facts of that action (``details``)."""

    ts: datetime
    action: str
    actor: Actor
    source: str
    outcome: str
    message: str
    asset_id: str | None = None
    site_id: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)
