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
    Asset,
    Dispatch,
    DispatchRequest,
    DispatchTarget,
    TelemetrySample,
)
from der_sdk.plugins import Registry
from der_sdk.split import split_site

__all__ = [
    "IDEMPOTENCY_NAMESPACE",
    "DispatchError",
    "DispatchPreview",
    "IdempotencyConflictError",
    "InvalidDispatchError",
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
    """SHA-256 of the request, to tell a retry from a reused key. A request without a
    ``policy`` hashes as before the field existed, so a retry across an upgrade matches."""
    if request.policy is None:
        body = msgspec.to_builtins(request)
        del body["policy"]
        return hashlib.sha256(_fingerprint_encode(body)).hexdigest()
    return hashlib.sha256(_fingerprint_encode(request)).hexdigest()


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
