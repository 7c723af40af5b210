"""Planning a dispatch: validate the request, split and clamp it into targets, and fix its
id from an ``Idempotency-Key``. Nothing here routes, stores or sends.

Bounds (``docs/headend.md``, "Time bounds"): ``duration_s`` and ``ttl_s`` are more than 0
and at most :data:`~der_sdk.models.DISPATCH_HORIZON_S` (one year); ``expires_at`` has a
time zone, is after now and at most that long after it. A request outside them is refused
(:class:`InvalidDispatchError`); :func:`out_of_bounds` finds stored records outside them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import msgspec

from der_sdk.asset_types import BUILTIN_ASSET_TYPES
from der_sdk.control import (
    DEFAULT_CONTROL,
    AvailableRange,
    ControlKind,
    ControlModel,
    split_context,
)
from der_sdk.errors import DerSdkError, UnknownNameError
from der_sdk.extensions import SplitPolicy
from der_sdk.inventory import Inventory
from der_sdk.models import (
    DISPATCH_HORIZON_S,
    SCHEDULE_HORIZON_S,
    SCHEDULE_MAX_STEPS,
    Asset,
    Dispatch,
    DispatchRequest,
    DispatchTarget,
    ScheduleStep,
    TargetStep,
    TelemetrySample,
)
from der_sdk.plugins import Registry
from der_sdk.split import split_site

__all__ = [
    "IDEMPOTENCY_NAMESPACE",
    "CancelConflictError",
    "DispatchError",
    "DispatchPreview",
    "IdempotencyConflictError",
    "InvalidDispatchError",
    "PreviewStep",
    "PreviewTarget",
    "UnknownTargetError",
    "available_ranges",
    "builtin_controls",
    "check_idempotency_key",
    "fingerprint",
    "idempotent_id",
    "out_of_bounds",
    "plan",
    "preview_of",
    "replay",
]

log = logging.getLogger("der.headend.dispatch")

_HORIZON = timedelta(seconds=DISPATCH_HORIZON_S)
START_TOLERANCE_S = 5.0
"""How far in the past ``start_at`` may be (transit, clocks a little apart): a start that
much earlier than the headend's clock is taken as now-ish, not refused."""
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1c9a52-63b1-4c1e-9f5e-2d7f0b3f4a10")
"""Dispatch ids of idempotent requests are ``uuid5(IDEMPOTENCY_NAMESPACE, key)``."""
_fingerprint_encode = msgspec.json.Encoder(order="sorted").encode

LatestSample = Callable[[str], TelemetrySample | None]
"""``latest(asset_id)``: the asset's latest telemetry sample, or ``None``."""


def builtin_controls() -> dict[str, ControlModel]:
    """The control models of the built-in asset types, by type name."""
    return {t.name: t.control for t in BUILTIN_ASSET_TYPES}


class DispatchError(DerSdkError):
    """A dispatch request was refused; the message says why."""


class InvalidDispatchError(DispatchError):
    """The request is malformed (REST: 400)."""


class UnknownTargetError(DispatchError):
    """The asset or site is not in the inventory (REST: 404)."""


class CancelConflictError(DispatchError):
    """The dispatch cannot be cancelled in its state (REST: 409)."""


class IdempotencyConflictError(DispatchError):
    """The ``Idempotency-Key`` was used before for a different request (REST: 409)."""


def fmt_mw(mw: float) -> str:
    return f"{mw:g}"


# ----------------------------------------------------------------------------- plan


def _policy_named(
    name: str, default: SplitPolicy, policies: Registry[SplitPolicy] | None, where: str
) -> SplitPolicy:
    if name == default.name:
        return default
    try:
        if policies is None:
            raise UnknownNameError("split policy", name, [default.name])
        return policies.get(name)
    except UnknownNameError as exc:
        raise InvalidDispatchError(f"{where}: {exc}") from None


def plan(
    request: DispatchRequest,
    *,
    inventory: Inventory,
    policy: SplitPolicy,
    source: str,
    now: datetime,
    policies: Registry[SplitPolicy] | None = None,
    controls: Mapping[str, ControlModel] | None = None,
    latest: LatestSample | None = None,
) -> Dispatch:
    """The ``submitted`` dispatch record for ``request``: checked, split and clamped.

    ``asset_id`` wins over ``site_id``: one target, clamped to the static range of the
    asset's control kind (``controls`` by asset type; default: the built-in types'). A MW
    of the wrong sign for the kind (a negative export limit, a positive import limit) is
    refused. A site is split over its inventory assets, each within its available range
    now (from ``latest``), by the request's ``policy``, else the site's ``split_policy``,
    else ``policy``; names are looked up in ``policies``. What no asset can take is
    ``unallocated_mw``.

    :raises InvalidDispatchError: no target, a non-finite ``mw``, a bad ``duration_s``,
        ``ttl_s`` or ``expires_at``, a MW the asset's kind cannot take, an unknown
        ``policy``, or a site without assets.
    :raises UnknownTargetError: the asset or site is not in the inventory.
    """
    if request.start_at is not None or request.steps is not None:
        return _plan_schedule(
            request,
            inventory=inventory,
            policy=policy,
            source=source,
            now=now,
            policies=policies,
            controls=controls if controls is not None else builtin_controls(),
        )
    if request.mw is None:
        raise InvalidDispatchError(
            "`mw` is required: the MW to dispatch (or give start_at and steps)"
        )
    if not math.isfinite(request.mw):
        raise InvalidDispatchError(f"mw must be a finite number of MW, got {request.mw}")
    _check_span("duration_s", request.duration_s)
    if controls is None:
        controls = builtin_controls()
    chosen = None
    if request.policy is not None:
        chosen = _policy_named(request.policy, policy, policies, "policy")
    dispatch = Dispatch(
        dispatch_id=str(uuid.uuid4()),
        mw=request.mw,
        state="submitted",
        created_at=now,
        updated_at=now,
        duration_s=request.duration_s,
        source=source,
        expires_at=_expiry(request, now),
    )
    if request.asset_id:
        asset = _asset(inventory, request.asset_id)
        if request.site_id and request.site_id != asset.site_id:
            log.info(
                "dispatch for asset %s also names site %s; asset_id wins",
                asset.asset_id,
                request.site_id,
            )
        control = controls.get(asset.asset_type, DEFAULT_CONTROL)
        lo, hi = control.static_range(asset)
        problem = control.sign_problem(request.mw)
        if problem is not None:
            raise InvalidDispatchError(
                f"mw: {fmt_mw(request.mw)} MW cannot be sent to asset {asset.asset_id} "
                f"({asset.name}, {asset.asset_type}): its control kind is {control.kind}, "
                f"range [{fmt_mw(lo)}, {fmt_mw(hi)}] MW; {problem}"
            )
        target = control.clamp(asset, request.mw)
        reason = None
        if target != request.mw:
            reason = f"clamped to [{fmt_mw(lo)}, {fmt_mw(hi)}]"
        dispatch.asset_id = asset.asset_id
        dispatch.site_id = asset.site_id
        dispatch.targets = [DispatchTarget(asset_id=asset.asset_id, mw=target, reason=reason)]
        dispatch.reason = reason
        return dispatch
    if request.site_id:
        site_id = _site_id(inventory, request.site_id)
        site = inventory.site(site_id)
        if chosen is None and site.split_policy is not None:
            chosen = _policy_named(
                site.split_policy, policy, policies, f"site {site_id} split_policy"
            )
        chosen = chosen or policy
        assets = inventory.assets_for_site(site_id)
        if not assets:
            raise InvalidDispatchError(f"site {site_id} has no assets in the inventory")
        context = split_context(
            assets,
            controls=controls,
            latest=latest,
            duration_s=request.duration_s,
            now=now,
            site_id=site_id,
        )
        try:
            split = split_site(chosen, request.mw, context)
        except ValueError as exc:
            raise InvalidDispatchError(f"site {site_id}: {exc}") from exc
        dispatch.site_id = site_id
        dispatch.policy = chosen.name
        dispatch.targets = [
            DispatchTarget(asset_id=asset_id, mw=mw) for asset_id, mw in split.shares.items()
        ]
        dispatch.unallocated_mw = split.unallocated_mw
        if split.unallocated_mw:
            dispatch.reason = (
                f"{fmt_mw(split.unallocated_mw)} MW could not be placed within what site "
                f"{site_id}'s assets can take now"
            )
        return dispatch
    raise InvalidDispatchError("give asset_id or site_id: the dispatch has no target")


# ----------------------------------------------------------------------------- schedules


def _plan_schedule(
    request: DispatchRequest,
    *,
    inventory: Inventory,
    policy: SplitPolicy,
    source: str,
    now: datetime,
    policies: Registry[SplitPolicy] | None,
    controls: Mapping[str, ControlModel],
) -> Dispatch:
    """The ``submitted`` record of a schedule (``start_at``, with ``steps`` or ``mw``).

    Every step is checked against the target's static range (an asset's by its control
    kind: a PV plant's export limit is never negative; a site's sum of them) and refused,
    not clamped, when outside. A site's steps are each split by the request's ``policy``,
    else the site's ``split_policy``, else ``policy``, over the assets' static ranges: what
    they can do at a future step is not known now.
    """
    start_at = _check_start(request, now)
    steps = _check_steps(request)
    duration = request.duration_s
    if duration is not None:
        problem = _span_problem("duration_s", duration)
        if problem is None and duration > SCHEDULE_HORIZON_S:
            problem = (
                f"duration_s of a schedule must be at most {SCHEDULE_HORIZON_S} seconds "
                f"(7 days), got {duration:g}"
            )
        if problem is None and duration <= steps[-1].offset_s:
            problem = (
                f"duration_s ({duration:g} s) must be more than the last step's offset_s "
                f"(steps[{len(steps) - 1}].offset_s = {steps[-1].offset_s:g} s)"
            )
        if problem is not None:
            raise InvalidDispatchError(problem)
    dispatch = Dispatch(
        dispatch_id=str(uuid.uuid4()),
        mw=steps[0].mw,
        state="scheduled",
        created_at=now,
        updated_at=now,
        duration_s=duration,
        source=source,
        start_at=start_at,
        steps=steps,
    )
    if request.asset_id:
        asset = _asset(inventory, request.asset_id)
        control = controls.get(asset.asset_type, DEFAULT_CONTROL)
        low, high = control.static_range(asset)
        what = f"asset {asset.asset_id} ({asset.asset_type}, control kind {control.kind})"
        _check_step_limits(steps, low, high, what, given_steps=request.steps is not None)
        dispatch.asset_id, dispatch.site_id = asset.asset_id, asset.site_id
        dispatch.targets = [
            DispatchTarget(
                asset_id=asset.asset_id,
                mw=steps[0].mw,
                state="submitted",
                steps=[TargetStep(offset_s=s.offset_s, mw=s.mw) for s in steps],
            )
        ]
        return dispatch
    if not request.site_id:
        raise InvalidDispatchError("give asset_id or site_id: the dispatch has no target")
    site_id = _site_id(inventory, request.site_id)
    assets = inventory.assets_for_site(site_id)
    if not assets:
        raise InvalidDispatchError(f"site {site_id} has no assets in the inventory")
    site = inventory.site(site_id)
    if request.policy is not None:
        policy = _policy_named(request.policy, policy, policies, "policy")
    elif site.split_policy is not None:
        policy = _policy_named(site.split_policy, policy, policies, f"site {site_id} split_policy")
    ranges = [controls.get(a.asset_type, DEFAULT_CONTROL).static_range(a) for a in assets]
    low = math.fsum(lo for lo, _ in ranges)
    high = math.fsum(hi for _, hi in ranges)
    context = split_context(
        assets, controls=controls, latest=None, duration_s=duration, now=now, site_id=site_id
    )
    _check_step_limits(
        steps,
        low,
        high,
        f"site {site_id} (the sum of its assets' ranges by control kind)",
        given_steps=request.steps is not None,
    )
    per_asset: dict[str, list[TargetStep]] = {a.asset_id: [] for a in assets}
    for step in steps:
        try:
            split = split_site(policy, step.mw, context)
        except ValueError as exc:
            raise InvalidDispatchError(f"site {site_id}: {exc}") from exc
        for asset_id in per_asset:
            share = split.shares.get(asset_id, 0.0)
            per_asset[asset_id].append(TargetStep(offset_s=step.offset_s, mw=share))
    dispatch.site_id = site_id
    dispatch.policy = policy.name
    dispatch.targets = [
        DispatchTarget(asset_id=asset_id, mw=shares[0].mw, steps=shares)
        for asset_id, shares in per_asset.items()
    ]
    return dispatch


def _check_start(request: DispatchRequest, now: datetime) -> datetime:
    start_at = request.start_at
    if start_at is None:
        raise InvalidDispatchError(
            "steps need start_at: the time the schedule starts, e.g. 2026-01-01T11:00:00+01:00"
        )
    if start_at.tzinfo is None:
        raise InvalidDispatchError(
            "start_at needs a time zone, e.g. 2026-01-01T11:00:00Z or +01:00"
        )
    if request.expires_at is not None or request.ttl_s is not None:
        raise InvalidDispatchError(
            "a schedule (start_at) takes no expires_at or ttl_s; stop it with "
            "POST /dispatch/{id}/cancel"
        )
    if start_at - now < timedelta(seconds=-START_TOLERANCE_S):
        raise InvalidDispatchError(
            f"start_at {start_at.isoformat()} is in the past (headend time "
            f"{now.isoformat()}; up to {START_TOLERANCE_S:g} s in the past is taken)"
        )
    if start_at - now > timedelta(seconds=SCHEDULE_HORIZON_S):
        raise InvalidDispatchError(
            f"start_at {start_at.isoformat()} is more than {SCHEDULE_HORIZON_S} seconds "
            f"(7 days) after now ({now.isoformat()})"
        )
    return now + (start_at - now)  # the same instant, in UTC


def _check_steps(request: DispatchRequest) -> list[ScheduleStep]:
    if request.steps is None:
        if request.mw is None:
            raise InvalidDispatchError("a schedule needs mw (held from start_at) or steps")
        if not math.isfinite(request.mw):
            raise InvalidDispatchError(f"mw must be a finite number of MW, got {request.mw}")
        return [ScheduleStep(offset_s=0.0, mw=request.mw)]
    if request.mw is not None:
        raise InvalidDispatchError("give mw or steps, not both (each step has its own mw)")
    steps = request.steps
    if not steps:
        raise InvalidDispatchError("steps is empty: give at least one step")
    if len(steps) > SCHEDULE_MAX_STEPS:
        raise InvalidDispatchError(f"steps: at most {SCHEDULE_MAX_STEPS} steps, got {len(steps)}")
    previous: float | None = None
    for i, step in enumerate(steps):
        offset = step.offset_s
        if not math.isfinite(offset):
            raise InvalidDispatchError(f"steps[{i}].offset_s must be a finite number, got {offset}")
        if i == 0 and offset != 0:
            raise InvalidDispatchError(
                f"steps[0].offset_s must be 0 (the first step starts at start_at), got {offset:g}"
            )
        if previous is not None and offset <= previous:
            raise InvalidDispatchError(
                f"steps[{i}].offset_s must be more than steps[{i - 1}].offset_s "
                f"({previous:g}): offsets increase strictly, got {offset:g}"
            )
        if offset > SCHEDULE_HORIZON_S:
            raise InvalidDispatchError(
                f"steps[{i}].offset_s must be at most {SCHEDULE_HORIZON_S} seconds (7 days) "
                f"after start_at, got {offset:g}"
            )
        if not math.isfinite(step.mw):
            raise InvalidDispatchError(
                f"steps[{i}].mw must be a finite number of MW, got {step.mw}"
            )
        previous = offset
    return list(steps)


def _check_step_limits(
    steps: list[ScheduleStep], low: float, high: float, what: str, *, given_steps: bool
) -> None:
    for i, step in enumerate(steps):
        if not low <= step.mw <= high:
            name = f"steps[{i}].mw" if given_steps else "mw"
            raise InvalidDispatchError(
                f"{name} {step.mw:g} MW is outside the limits of {what}: "
                f"[{fmt_mw(low)}, {fmt_mw(high)}] MW"
            )


def _asset(inventory: Inventory, asset_id: str) -> Asset:
    try:
        return inventory.asset(asset_id)
    except UnknownNameError:
        raise UnknownTargetError(f"unknown asset {asset_id}") from None


def _site_id(inventory: Inventory, site_id: str) -> str:
    try:
        return inventory.site(site_id).site_id
    except UnknownNameError:
        raise UnknownTargetError(f"unknown site {site_id}") from None


# ----------------------------------------------------------------------------- preview


class PreviewTarget(msgspec.Struct, kw_only=True):
    """One asset's share of a previewed dispatch, with the limits it was clamped to."""

    asset_id: str
    asset_name: str
    mw: float
    """The target after split and clamp: what ``POST /dispatch`` would send this asset."""
    min_mw: float
    max_mw: float
    reason: str | None = None
    """Why the share is not what was asked: clamped to the asset's limits (an asset
    dispatch), or held at the edge of its available range (a site dispatch); ``None``
    otherwise."""
    kind: ControlKind = "setpoint"
    """The asset's control kind: what ``mw`` means for it (``docs/asset_types.md``)."""
    available_min_mw: float | None = None
    available_max_mw: float | None = None
    """The range the asset can take now, which a site split keeps within."""
    basis: str | None = None
    """What bounded the available range (``"available PV 3.1 MW"``)."""


class DispatchPreview(msgspec.Struct, kw_only=True):
    """What ``POST /dispatch`` would produce for a request: nothing stored or sent."""

    mw: float
    asset_id: str | None
    site_id: str | None
    policy: str | None
    """The split policy of a site dispatch; ``None`` for one asset."""
    targets: list[PreviewTarget]
    unallocated_mw: float
    reason: str | None = None
    duration_s: float | None = None
    expires_at: datetime | None = None
    start_at: datetime | None = None
    """A schedule's start; ``None`` for an immediate dispatch."""
    steps: list[PreviewStep] | None = None
    """A schedule's steps, each with every asset's share."""


class PreviewStep(msgspec.Struct, kw_only=True):
    """One step of a previewed schedule: the site's (or asset's) MW and each share."""

    offset_s: float
    mw: float
    shares: dict[str, float]


def available_ranges(
    dispatch: Dispatch,
    inventory: Inventory,
    *,
    controls: Mapping[str, ControlModel] | None = None,
    latest: LatestSample | None = None,
    now: datetime,
) -> dict[str, tuple[ControlKind, AvailableRange]]:
    """The control kind and available range of each target's asset, as :func:`plan` saw
    them with the same ``latest`` and ``now``."""
    if controls is None:
        controls = builtin_controls()
    found = {}
    for target in dispatch.targets:
        asset = inventory.asset(target.asset_id)
        model = controls.get(asset.asset_type, DEFAULT_CONTROL)
        sample = latest(asset.asset_id) if latest is not None else None
        found[asset.asset_id] = (
            model.kind,
            model.available_range(asset, sample, dispatch.duration_s, now=now),
        )
    return found


def preview_of(
    dispatch: Dispatch,
    inventory: Inventory,
    ranges: Mapping[str, tuple[ControlKind, AvailableRange]] | None = None,
) -> DispatchPreview:
    """The preview of a planned (not yet routed) ``dispatch``: its targets with the limits
    of their assets and, given ``ranges`` (:func:`available_ranges`), their control kinds
    and available ranges; from :func:`plan`'s result, so a preview never differs from the
    dispatch it stands for."""
    ranges = ranges or {}
    targets = []
    for target in dispatch.targets:
        asset = inventory.asset(target.asset_id)
        kind: ControlKind = "setpoint"
        available: AvailableRange | None = None
        if target.asset_id in ranges:
            kind, available = ranges[target.asset_id]
        lo, hi = (asset.min_mw, asset.max_mw) if available is None else available
        reason = target.reason
        if reason is None and dispatch.asset_id is None:  # a site's share at a limit
            if dispatch.mw > 0 and target.mw == hi:
                reason = _at_limit("max", hi, asset.max_mw, available)
            elif dispatch.mw < 0 and target.mw == lo:
                reason = _at_limit("min", lo, asset.min_mw, available)
        targets.append(
            PreviewTarget(
                asset_id=target.asset_id,
                asset_name=asset.name,
                mw=target.mw,
                min_mw=asset.min_mw,
                max_mw=asset.max_mw,
                reason=reason,
                kind=kind,
                available_min_mw=None if available is None else available.min_mw,
                available_max_mw=None if available is None else available.max_mw,
                basis=None if available is None else available.basis,
            )
        )
    return DispatchPreview(
        mw=dispatch.mw,
        asset_id=dispatch.asset_id,
        site_id=dispatch.site_id,
        policy=dispatch.policy,
        targets=targets,
        unallocated_mw=dispatch.unallocated_mw,
        reason=dispatch.reason,
        duration_s=dispatch.duration_s,
        expires_at=dispatch.expires_at,
        start_at=dispatch.start_at,
        steps=None
        if dispatch.steps is None
        else [
            PreviewStep(
                offset_s=step.offset_s,
                mw=step.mw,
                shares={t.asset_id: t.steps[i].mw for t in dispatch.targets if t.steps},
            )
            for i, step in enumerate(dispatch.steps)
        ],
    )


def _at_limit(side: str, mw: float, static: float, available: AvailableRange | None) -> str:
    if available is None or mw == static:
        return f"at its limit {side}_mw {fmt_mw(mw)}"
    return f"at the {side} it can take now, {fmt_mw(mw)} MW ({available.basis})"


# ----------------------------------------------------------------------------- bounds


def _span_problem(name: str, seconds: float | None) -> str | None:
    """Why ``seconds`` (``duration_s`` or ``ttl_s``) is out of bounds, or ``None``."""
    if seconds is None or (math.isfinite(seconds) and 0 < seconds <= DISPATCH_HORIZON_S):
        return None
    return (
        f"{name} must be more than 0 and at most {DISPATCH_HORIZON_S} seconds (one year), "
        f"got {seconds:g}"
    )


def _check_span(name: str, seconds: float | None) -> None:
    problem = _span_problem(name, seconds)
    if problem is not None:
        raise InvalidDispatchError(problem)


def _beyond_horizon(expires_at: datetime, since: datetime) -> str | None:
    """Why ``expires_at`` is too far after ``since``, or ``None``.

    Subtracting aware datetimes is exact at any UTC offset; converting ``expires_at`` to
    UTC first would overflow for a time such as 9999-12-31T23:59:59-12:00.
    """
    if expires_at - since <= _HORIZON:
        return None
    return (
        f"expires_at {expires_at.isoformat()} is more than {DISPATCH_HORIZON_S} seconds "
        f"(one year) after {since.isoformat()}; the latest allowed is "
        f"{(since + _HORIZON).isoformat()}"
    )


def _expiry(request: DispatchRequest, now: datetime) -> datetime | None:
    if request.expires_at is not None and request.ttl_s is not None:
        raise InvalidDispatchError("give expires_at or ttl_s, not both")
    if request.ttl_s is not None:
        _check_span("ttl_s", request.ttl_s)
        return now + timedelta(seconds=request.ttl_s)
    if request.expires_at is not None:
        if request.expires_at.tzinfo is None:
            raise InvalidDispatchError(
                "expires_at needs a time zone, e.g. 2026-01-01T12:00:00Z or +01:00"
            )
        if request.expires_at <= now:
            raise InvalidDispatchError(
                f"expires_at {request.expires_at.isoformat()} is already in the past "
                f"(headend time {now.isoformat()})"
            )
        problem = _beyond_horizon(request.expires_at, now)
        if problem is not None:
            raise InvalidDispatchError(problem)
        return now + (request.expires_at - now)  # the same instant, in UTC
    return None


def out_of_bounds(dispatch: Dispatch) -> str | None:
    """Why a stored dispatch reaches beyond :data:`DISPATCH_HORIZON_S`, or ``None``.

    Versions before the bounds stored such records; their dates overflow.
    """
    problem = _span_problem("duration_s", dispatch.duration_s)
    if problem is None and dispatch.expires_at is not None:
        problem = _beyond_horizon(dispatch.expires_at, dispatch.created_at)
    if problem is None:
        return None
    return f"stored out of bounds: {problem}"


# ----------------------------------------------------------------------------- idempotency


def check_idempotency_key(key: str) -> str:
    """The key, stripped. :raises InvalidDispatchError: not 1 to 255 printable characters."""
    key = key.strip()
    if not key or len(key) > 255 or not key.isprintable():
        raise InvalidDispatchError(
            "header Idempotency-Key must be 1 to 255 printable characters (a UUID is a good key)"
        )
    return key


def idempotent_id(key: str) -> str:
    """The dispatch id an ``Idempotency-Key`` fixes."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, key))


def fingerprint(request: DispatchRequest) -> str:
    """SHA-256 of the request, to tell a retry from a reused key. Fields added since
    (``policy``, ``start_at``, ``steps``) count only when given, so a retry across an
    upgrade hashes as before they existed."""
    body = msgspec.to_builtins(request)
    for added in _ADDED_FIELDS:
        if body.get(added) is None:
            body.pop(added, None)
    return hashlib.sha256(_fingerprint_encode(body)).hexdigest()


_ADDED_FIELDS = ("policy", "start_at", "steps")


def replay(known: Dispatch, request_fingerprint: str | None) -> Dispatch:
    """``known``, the record an earlier request with the same key created.

    :raises IdempotencyConflictError: that request was a different one.
    """
    if known.request_fingerprint != request_fingerprint:
        raise IdempotencyConflictError(
            f"Idempotency-Key {known.idempotency_key!r} was already used for dispatch "
            f"{known.dispatch_id} with a different request; use a new key for a new "
            "dispatch"
        )
    log.info(
        "dispatch %s: repeated request with Idempotency-Key %r; returning the record",
        known.dispatch_id,
        known.idempotency_key,
    )
    return known
