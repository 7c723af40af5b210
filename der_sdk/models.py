"""The domain model: one set of msgspec Structs shared by the SDK, headend and agent.

Protobuf exists only at the wire edge (:mod:`der_sdk.wire.codec`); REST bodies and storage
rows are these Structs. New fields always carry defaults so older peers keep working.

Sign convention for power: ``mw`` is positive for discharge, export or generation and
negative for charge, import or consumption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "ALARM_SEVERITIES",
    "DISPATCH_HORIZON_S",
    "DISPATCH_STATE_RANK",
    "SCHEDULE_HORIZON_S",
    "SCHEDULE_MAX_STEPS",
    "TERMINAL_DISPATCH_STATES",
    "AgentHeartbeat",
    "Alarm",
    "AlarmSeverity",
    "AlarmState",
    "Allocation",
    "Asset",
    "BufferStats",
    "Dispatch",
    "DispatchEvent",
    "DispatchRequest",
    "DispatchState",
    "DispatchTarget",
    "Event",
    "EventAck",
    "Heartbeat",
    "LocalDispatchReport",
    "Quality",
    "ScheduleStep",
    "SeqRange",
    "Session",
    "SetpointAck",
    "SetpointCommand",
    "SetpointOutcomeAck",
    "Site",
    "TargetStep",
    "TelemetryAck",
    "TelemetryBatch",
    "TelemetrySample",
    "holds_non_finite",
    "refuse_non_finite",
    "utc_now",
]

Quality = Literal["good", "uncertain", "bad"]
"""Sample quality. ``bad`` samples carry a ``quality_reason`` and never a fresh value."""

DispatchState = Literal[
    "submitted",  # accepted and recorded; not yet sent (its agent is offline)
    "sent",  # pushed down the agent's stream, no acknowledgement yet
    "acked",  # the agent received it and recorded it in its journal; not applied yet
    "applied",  # the agent applied it (possibly clamped)
    "rejected",  # the agent refused it (reason given)
    "failed",  # delivery or application failed (reason given)
    "superseded",  # a newer dispatch for the same target replaced it (or cut a schedule)
    "expired",  # its expiry passed before it could be applied; never applied
    "scheduled",  # a schedule (start_at) that has not started: at the headend or the agent
    "active",  # a schedule whose first step ran on the agent; it runs on
    "completed",  # a schedule that ran every step (and its duration, if it has one)
    "cancelled",  # a schedule stopped by POST /dispatch/{id}/cancel
]
"""A dispatch moves only forward: submitted → sent → acked → one final state; a schedule:
(submitted → sent →) scheduled → active → completed, cancelled or superseded."""

DISPATCH_STATE_RANK: dict[str, int] = {
    "submitted": 0,
    "sent": 1,
    "acked": 2,
    "scheduled": 2,
    "active": 3,
    "applied": 4,
    "rejected": 4,
    "failed": 4,
    "superseded": 4,
    "expired": 4,
    "completed": 4,
    "cancelled": 4,
}
"""The order of the states: a change to a lower or equal rank is ignored."""

TERMINAL_DISPATCH_STATES: frozenset[str] = frozenset(
    {"applied", "rejected", "failed", "superseded", "expired", "completed", "cancelled"}
)

SCHEDULE_HORIZON_S = 7 * 24 * 3600
"""How far a schedule reaches, in seconds (7 days): ``start_at`` at most this long after
the dispatch is made, and each step's ``offset_s`` and the ``duration_s`` of a schedule at
most this long after ``start_at``. Well inside :data:`DISPATCH_HORIZON_S`."""

SCHEDULE_MAX_STEPS = 288
"""The most steps a schedule may have (a day of five-minute steps)."""


def utc_now() -> datetime:
    """The current time as an aware UTC datetime (the only kind the model stores)."""
    return datetime.now(UTC)


class Site(msgspec.Struct, frozen=True, kw_only=True):
    """A physical site: one or more assets behind one point of common coupling.

    ``latitude``/``longitude`` are WGS 84 degrees (``None``: not given). ``split_policy``
    names the policy that splits this site's dispatches (``None``: the headend's).
    """

    site_id: str
    name: str
    location: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    split_policy: str | None = None


class Asset(msgspec.Struct, frozen=True, kw_only=True):
    """One controllable DER asset from the inventory.

    ``asset_id`` is a stable UUID (canonical lower-case text). Limits are in MW with the
    sign convention of the module: ``min_mw`` is usually negative for storage (charging).
    ``ramp_rate_mw_per_min`` of ``None`` means the asset can step instantly.
    ``efficiency`` is round-trip efficiency in ``(0, 1]``. ``latitude``/``longitude``
    are WGS 84 degrees (``None``: not given; a simulator may fall back to its site's).
    """

    asset_id: str
    site_id: str
    name: str
    asset_type: str = "bess"
    capacity_mwh: float = 0.0
    max_mw: float = 0.0
    min_mw: float = 0.0
    ramp_rate_mw_per_min: float | None = None
    efficiency: float = 1.0
    location: str | None = None
    latitude: float | None = None
    longitude: float | None = None

    def clamp(self, mw: float) -> float:
        """``mw`` limited to ``[min_mw, max_mw]``."""
        return min(self.max_mw, max(self.min_mw, mw))


class TelemetrySample(msgspec.Struct, kw_only=True, omit_defaults=False, gc=False):
    """One reading of one asset: the core fields every DER shares, plus ``details``.

    ``details`` holds the asset type's extension fields (see the ``der_asset_types`` hook);
    receivers keep unknown keys, so a newer agent can send fields an older headend does
    not know yet.

    Samples are not tracked by Python's cycle collector (``gc=False``): a headend holds
    hundreds of thousands of them in flight, and scanning them made every collection
    slower (docs/performance.md). ``details`` holds JSON values, so a sample cannot be
    part of a reference cycle; do not put the sample itself into its ``details``.
    """

    asset_id: str
    site_id: str
    ts: datetime
    mw: float
    mw_setpoint: float | None = None
    online: bool = True
    status: str | None = None
    fault_code: str | None = None
    seq: int = 0
    quality: Quality = "good"
    quality_reason: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)


DISPATCH_HORIZON_S = 31_536_000
"""How far ahead a dispatch may reach, in seconds: one year of 365 days. ``duration_s``
and ``ttl_s`` are at most this, and ``expires_at`` at most this long after the dispatch is
made. The bound keeps every date the headend computes from them (when a duration ends, when
a dispatch expires) far inside the years a datetime can hold."""

DispatchSeconds = Annotated[
    float,
    msgspec.Meta(
        gt=0,
        le=DISPATCH_HORIZON_S,
        description=f"seconds, more than 0 and at most {DISPATCH_HORIZON_S} (one year)",
    ),
]
"""A time span of a dispatch request: positive and within :data:`DISPATCH_HORIZON_S`."""


def refuse_non_finite(sample: TelemetrySample) -> tuple[TelemetrySample, list[str]]:
    """``sample`` with every non-finite number (NaN, +inf, -inf) taken out, and what was.

    JSON has no spelling for these numbers (a JSON encoder writes ``null``), so a sample
    carrying one would be stored as a number and served as ``null``. Instead the sample
    is refused as ``bad``: a non-finite ``mw`` becomes ``0.0`` (as in every bad sample),
    a non-finite ``mw_setpoint`` becomes ``None``, and a ``details`` field holding one at
    any depth is left out; ``quality_reason`` names each field after any reason the
    sample already had.

    :return: ``(sample, problems)``; ``sample`` itself and ``[]`` when every number is
        finite, else a copy and one message per field:
        ``"mw: expected a finite number, got nan"``.
    """
    problems: list[str] = []
    changes: dict[str, Any] = {}
    if not math.isfinite(sample.mw):
        problems.append(f"mw: expected a finite number, got {sample.mw!r}")
        changes["mw"] = 0.0
    if sample.mw_setpoint is not None and not math.isfinite(sample.mw_setpoint):
        problems.append(f"mw_setpoint: expected a finite number, got {sample.mw_setpoint!r}")
        changes["mw_setpoint"] = None
    bad_keys = [key for key, value in sample.details.items() if holds_non_finite(value)]
    if bad_keys:
        for key in bad_keys:
            value = sample.details[key]
            if isinstance(value, float):
                problems.append(f"details.{key}: expected a finite number, got {value!r}")
            else:
                problems.append(f"details.{key}: holds a non-finite number")
        changes["details"] = {k: v for k, v in sample.details.items() if k not in bad_keys}
    if not problems:
        return sample, problems
    reasons = [sample.quality_reason] if sample.quality_reason else []
    changes["quality"] = "bad"
    changes["quality_reason"] = "; ".join([*reasons, *problems])
    return msgspec.structs.replace(sample, **changes), problems


def holds_non_finite(value: object) -> bool:
    """Whether ``value`` is, or holds at any depth, a non-finite float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(holds_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(holds_non_finite(v) for v in value)
    return False


class ScheduleStep(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One step of a schedule: ``mw`` holds from ``start_at + offset_s`` until the next
    step (the last one until the schedule's end, or for good without ``duration_s``)."""

    offset_s: float
    mw: float


class DispatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /dispatch``. Give ``asset_id`` or ``site_id``; ``asset_id`` wins.

    ``expires_at`` (an aware time) or ``ttl_s`` (seconds from now), not both: a dispatch
    not applied by then is never applied. ``duration_s``: how long the setpoint holds
    before the asset returns to its default. Each reaches at most
    :data:`DISPATCH_HORIZON_S` ahead; decoding checks ``duration_s`` and ``ttl_s``, the
    headend's dispatcher checks all three (also for requests built in code).

    ``policy`` names the split policy of a site dispatch (``None``: the site's
    ``split_policy``, else the headend's); a per-asset dispatch ignores it.

    ``start_at`` (an aware time, in the future) makes a schedule: without ``steps``,
    ``mw`` holds from ``start_at`` for ``duration_s``; with ``steps`` each step's ``mw``
    holds from ``start_at + offset_s`` (give ``mw`` or ``steps``, not both).
    The agent runs a schedule by its own clock (``docs/dispatch.md``).
    """

    mw: float | None = None
    asset_id: str | None = None
    site_id: str | None = None
    duration_s: DispatchSeconds | None = None
    expires_at: datetime | None = None
    ttl_s: DispatchSeconds | None = None
    policy: str | None = None
    start_at: datetime | None = None
    steps: list[ScheduleStep] | None = None


class DispatchTarget(msgspec.Struct, kw_only=True):
    """One asset's part of a dispatch after split and clamp."""

    asset_id: str
    mw: float
    state: DispatchState = "submitted"
    applied_mw: float | None = None
    reason: str | None = None
    command_id: str | None = None
    """The setpoint that carried this target to its agent (set when sent)."""
    steps: list[TargetStep] | None = None
    """A schedule's steps for this asset (after split), each with its status; ``None``
    for an immediate dispatch."""


class TargetStep(msgspec.Struct, kw_only=True):
    """One step of a schedule for one asset, as the agent reported it.

    ``status``: ``pending`` (not run yet), then ``applied``, ``rejected``, ``failed``, or
    ``skipped`` (its time passed while the agent could not run it: it is never run late
    once the next step is due), or ``superseded``/``cancelled`` (the schedule stopped
    before it). ``at`` is when the agent ran it, by its clock.
    """

    offset_s: float
    mw: float
    status: str = "pending"
    applied_mw: float | None = None
    at: datetime | None = None
    reason: str | None = None


class Dispatch(msgspec.Struct, kw_only=True):
    """A dispatch record and its current lifecycle state.

    ``asset_id`` is set for a per-asset dispatch, ``site_id`` alone for a site dispatch.
    ``targets`` are the per-asset shares after split and clamp; ``unallocated_mw`` is what
    the split could not place within the assets' limits.
    """

    dispatch_id: str
    mw: float
    state: DispatchState
    created_at: datetime
    updated_at: datetime
    asset_id: str | None = None
    site_id: str | None = None
    duration_s: float | None = None
    targets: list[DispatchTarget] = msgspec.field(default_factory=list)
    unallocated_mw: float = 0.0
    policy: str | None = None
    source: str = "rest"
    reason: str | None = None
    expires_at: datetime | None = None
    idempotency_key: str | None = None
    request_fingerprint: str | None = None
    """SHA-256 of the request body, to tell a retry from a reused ``Idempotency-Key``."""
    start_at: datetime | None = None
    """A schedule's start (UTC); ``None`` for a dispatch that starts when it arrives."""
    steps: list[ScheduleStep] | None = None
    """A schedule's steps as requested (a schedule without steps has one, at 0)."""
    superseded_by: str | None = None
    """The dispatch that replaced this one (state ``superseded``)."""
    cancel_requested_at: datetime | None = None
    """When ``POST /dispatch/{id}/cancel`` asked for it to stop."""
    external_id: str | None = None
    """The id of the control upstream, for a dispatch a program made (``source``
    ``program:<name>``): an OpenADR event, a 2030.5 DERControl (``docs/programs.md``)."""


class DispatchEvent(msgspec.Struct, kw_only=True):
    """A timestamped state change of a dispatch (its lifecycle history)."""

    dispatch_id: str
    state: DispatchState
    ts: datetime
    detail: str | None = None


class Session(msgspec.Struct, kw_only=True):
    """One asset's presence on one agent stream, from register to stream end."""

    session_id: str
    asset_id: str
    site_id: str
    agent_id: str
    peer: str
    connected_at: datetime
    disconnected_at: datetime | None = None
    headend_id: str | None = None
    """The headend that opened the session (``HEADEND_ID``); ``None`` in records written
    before headends had ids. A restarting headend closes only its own open sessions."""


class Heartbeat(msgspec.Struct, kw_only=True):
    """An agent's liveness signal, recorded once for each asset the agent serves."""

    asset_id: str
    site_id: str
    agent_id: str
    ts: datetime
    uptime_s: float | None = None


class Event(msgspec.Struct, kw_only=True):
    """Something operators should see in the record: refusals, gaps, faults."""

    ts: datetime
    kind: str
    message: str
    asset_id: str | None = None
    site_id: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


AlarmSeverity = Literal["info", "warning", "major", "critical"]
"""How serious an alarm is, least to most (the severities adapters raise conditions with)."""
ALARM_SEVERITIES: tuple[AlarmSeverity, ...] = ("info", "warning", "major", "critical")
AlarmState = Literal["active", "cleared"]


class Alarm(msgspec.Struct, kw_only=True):
    """A condition of one asset that operators acknowledge (docs/alarms.md).

    There is one live alarm per ``(asset_id, code)``: a raise while it is active changes
    nothing, a raise soon after it cleared (the headend's de-bounce) makes it active
    again and counts ``raise_count`` up; a raise later opens a new alarm. Times are UTC:
    ``raised_at`` and ``cleared_at`` are when the condition began and ended (the agent's
    clock for device conditions), ``acknowledged_at`` and ``updated_at`` the headend's.
    """

    alarm_id: str
    asset_id: str
    site_id: str
    code: str
    severity: AlarmSeverity
    text: str
    state: AlarmState
    raised_at: datetime
    cleared_at: datetime | None = None
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    raise_count: int = 1
    updated_at: datetime | None = None


# ----------------------------------------------------------------------------- agent link
# What travels on the agent's stream, as the headend's rooms behind the link and the agent
# see it; :mod:`der_sdk.wire.codec` converts each to and from its protobuf message.


class Allocation(msgspec.Struct, frozen=True, kw_only=True):
    """One asset's part of an acknowledged setpoint."""

    asset_id: str
    mw: float
    status: str = "applied"
    reason: str | None = None


class SetpointCommand(msgspec.Struct, frozen=True, kw_only=True):
    """A setpoint for an agent (``Setpoint`` on the wire): ``asset_id`` for one asset, or
    ``site_id`` for a site the agent splits. ``expires_in_ms`` is the time left when it was
    built (relative, so agent clock skew does not matter); ``expires_at`` the same instant."""

    command_id: str
    mw: float
    asset_id: str | None = None
    site_id: str | None = None
    duration_s: float | None = None
    expires_in_ms: int | None = None
    expires_at: datetime | None = None
    start_at: datetime | None = None
    """Set: a schedule of ``steps`` (``(offset_s, mw)``) the agent runs from then."""
    steps: tuple[tuple[float, float], ...] = ()
    cancels: str | None = None
    """Set: this command cancels the schedule command with this id."""


class SetpointAck(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's answer to a :class:`SetpointCommand` (``SetpointAck`` on the wire).

    ``status`` is ``acked`` (in the agent's journal) or a final one: ``applied``,
    ``rejected``, ``failed``, ``expired`` (anything else is an unknown status, taken as
    ``failed``). ``allocations`` are the per-asset outcomes of a final status; ``ts`` is
    when the agent answered, by its clock (``None``: not given).
    """

    command_id: str
    status: str
    applied_mw: float = 0.0
    reason: str | None = None
    ts: datetime | None = None
    allocations: tuple[Allocation, ...] = ()
    step: int | None = None
    """Set: the report of this step of the schedule ``command_id``."""
    superseded_by: str | None = None
    """The command that superseded the schedule (status ``superseded``)."""


class SetpointOutcomeAck(msgspec.Struct, frozen=True, kw_only=True):
    """The headend recorded the final :class:`SetpointAck` of ``command_id`` (of its
    ``step``, when set); the agent stops reporting it (``SetpointOutcomeAck`` on the wire)."""

    command_id: str
    step: int | None = None


class LocalDispatchReport(msgspec.Struct, frozen=True, kw_only=True):
    """A command an edge service sent down the agent's dispatch path, and its outcome
    (the ``LocalDispatch`` message). ``mw`` is as requested; ``allocations`` are after split
    and clamp; ``ts`` is when the agent applied it."""

    command_id: str
    mw: float
    ts: datetime
    status: str
    asset_id: str | None = None
    site_id: str | None = None
    duration_s: float | None = None
    reason: str | None = None
    allocations: tuple[Allocation, ...] = ()
    unallocated_mw: float = 0.0
    policy: str | None = None


class BufferStats(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's store-and-forward buffer, as reported with each heartbeat."""

    batches: int = 0
    samples: int = 0
    bytes: int = 0
    oldest_age_s: float = 0.0
    dropped_samples: int = 0
    dropped_batches: int = 0
    replay_batches: int = 0


SeqRange = tuple[int, int]
"""The telemetry batch seqs ``first..last``, both included."""


class TelemetryBatch(msgspec.Struct, kw_only=True):
    """One batch of an agent's telemetry stream as it arrived (``TelemetryBatch`` on the
    wire), its samples decoded.

    ``seq`` numbers the batch in the agent's stream; ``floor_seq`` is the lowest seq the
    agent still holds; ``dropped`` the seq ranges it dropped without an acknowledgement
    (``None`` from an older agent that does not list them). ``samples`` are those that
    decoded, in order; a sample that did not is not here. ``non_finite`` names, by index
    in ``samples``, the samples whose non-finite numbers were taken out
    (:func:`refuse_non_finite`: they are ``bad``), one message per field.
    """

    seq: int
    samples: list[TelemetrySample]
    floor_seq: int = 0
    dropped: tuple[SeqRange, ...] | None = None
    non_finite: dict[int, Sequence[str]] = msgspec.field(default_factory=dict)


class TelemetryAck(msgspec.Struct, frozen=True, kw_only=True):
    """Batch ``seq`` is in storage, and every seq up to ``stored_through`` is settled
    (stored, acknowledged earlier or recorded as a gap): the agent may forget them
    (``TelemetryAck`` on the wire)."""

    seq: int
    stored_through: int = 0


class AgentHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's heartbeat as it arrived (``Heartbeat`` on the wire); stored as one
    :class:`Heartbeat` per asset the agent serves. ``agent_id`` is empty and ``ts`` is
    ``None`` when the agent sent none (the headend fills in its own); ``buffer`` is its
    store-and-forward buffer, when reported."""

    agent_id: str = ""
    ts: datetime | None = None
    uptime_s: float = 0.0
    buffer: BufferStats | None = None
    clock_offset_s: float | None = None
    """The agent's clock offset from the headend's (headend minus agent), when measured."""


class EventAck(msgspec.Struct, frozen=True, kw_only=True):
    """The headend stored the agent's event ``event_id``; the agent stops sending it
    (``EventAck`` on the wire)."""

    event_id: str
