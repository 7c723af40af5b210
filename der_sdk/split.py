"""Site splits: the built-in policies and :func:`split_site`, which runs any policy within
the physics of each asset.

Built-in policies: ``capacity_weighted`` (the default), ``equal``, ``headroom`` and
``soc_balancing``. The first three share one water-filling procedure and differ only in
the weights:

1. Assets are sorted by ``asset_id`` first, so the result does not depend on input order.
2. Every asset starts at the point of its range nearest 0 (``asset.clamp(0)``). For most
   assets that is 0. An asset whose range excludes 0 (a must-run minimum, ``min_mw > 0``,
   or a load that must draw, ``max_mw < 0``) cannot be idle, so it starts at that limit and
   the rest of the target is shared from there. This keeps every share within limits and
   makes every target in ``[sum(min_mw), sum(max_mw)]`` reachable.
3. What remains of the target is shared in proportion to the weights among the assets with
   headroom in the target's direction (``max_mw`` side for positive targets, ``min_mw``
   side for negative ones, i.e. charging). An asset whose share would pass its limit is
   set to that limit, and the rest is shared again among the others, until the target is
   placed or no asset has headroom left.
4. What cannot be placed is reported as ``unallocated_mw = target - sum(shares)``, never
   dropped. A feasible target is met exactly: float noise left by the arithmetic is put on
   the last assets (by id) with headroom, and ``unallocated_mw`` is then ``0.0``.

``soc_balancing`` (:func:`split_soc_balancing`) fills storage to a common state-of-charge
level first, then the other assets by headroom.

:func:`split_site` is how the headend and the agent split a site dispatch: each asset gets
its *available range now* (:mod:`der_sdk.control`), the policy is called with it, and the
result is checked: a share outside its range (or missing) is clamped, what the clamp left is
shared again by headroom, and what still does not fit is ``unallocated_mw``. So a policy,
built-in or a plugin's, never asks PV to consume, a charger to export or a battery for more
energy than it holds for the duration.

Invalid input raises :class:`ValueError`: a non-finite target or limit, ``min_mw > max_mw``
or a duplicate ``asset_id`` (the inventory loader refuses all of these).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence

from der_sdk.control import SplitAsset, SplitContext
from der_sdk.extensions import SplitPolicy, SplitResult
from der_sdk.models import Asset
from der_sdk.plugins import hookimpl

__all__ = [
    "DEFAULT_SPLIT_POLICY",
    "SOC_HORIZON_S",
    "der_split_policies",
    "split_capacity_weighted",
    "split_equal",
    "split_headroom",
    "split_site",
    "split_soc_balancing",
    "split_soc_balancing_in_context",
]

log = logging.getLogger("der.split")

DEFAULT_SPLIT_POLICY = "capacity_weighted"


def split_capacity_weighted(target_mw: float, assets: Sequence[Asset]) -> SplitResult:
    """Split ``target_mw`` in proportion to each asset's ``capacity_mwh``.

    Among the assets that still have headroom, when none has any capacity (PV, wind, or an
    inventory without capacities) the weight falls back to the asset's headroom in the
    target's direction (``|max_mw|`` or ``|min_mw|`` for an asset whose range includes 0),
    so power still goes where it fits. See the module docstring for clamping and
    redistribution.
    """
    return _water_fill(target_mw, assets, lambda asset: max(asset.capacity_mwh, 0.0))


def split_equal(target_mw: float, assets: Sequence[Asset]) -> SplitResult:
    """Split ``target_mw`` equally across the assets (then clamp and redistribute)."""
    return _water_fill(target_mw, assets, lambda asset: 1.0)


def split_headroom(target_mw: float, assets: Sequence[Asset]) -> SplitResult:
    """Split ``target_mw`` in proportion to each asset's headroom in the target's direction
    (from its idle point to ``max_mw`` upwards, to ``min_mw`` downwards). With the
    available ranges of a site dispatch, that is what each asset can do now: a PV plant
    gives in proportion to its available power, a battery to its energy for the duration."""
    if not math.isfinite(target_mw):
        raise ValueError(f"split target must be a finite number of MW, got {target_mw}")
    ordered = _sorted_assets(assets)
    upward = target_mw > math.fsum(a.clamp(0.0) for a in ordered)

    def room(asset: Asset) -> float:
        idle = asset.clamp(0.0)
        return asset.max_mw - idle if upward else idle - asset.min_mw

    return _water_fill(target_mw, ordered, room)


SOC_HORIZON_S = 3600.0
"""The horizon over which ``soc_balancing`` levels states of charge when the dispatch has no
duration."""


def split_soc_balancing(target_mw: float, assets: Sequence[Asset]) -> SplitResult:
    """``soc_balancing`` without telemetry: no state of charge is known, so it splits by
    headroom (:func:`split_headroom`)."""
    return split_headroom(target_mw, assets)


def split_soc_balancing_in_context(target_mw: float, context: SplitContext) -> SplitResult:
    """Split ``target_mw`` so the batteries' states of charge converge.

    Storage (a ``setpoint`` asset with ``capacity_mwh > 0`` and a known ``soc_pct``) goes
    first. Discharging, it finds the level ``L`` such that every battery above ``L`` gives
    the energy down to ``L`` over the horizon (the dispatch's ``duration_s``, else
    :data:`SOC_HORIZON_S`), each within its range, and together they give the target:
    the fullest give most, the emptiest nothing. Charging is the mirror image: the
    emptiest take most. What storage cannot place goes to the other assets by headroom.
    """
    if not math.isfinite(target_mw):
        raise ValueError(f"split target must be a finite number of MW, got {target_mw}")
    entries = sorted(context.assets, key=lambda e: e.asset_id)
    ordered = _sorted_assets([e.effective() for e in entries])
    storage = [e for e in entries if _is_storage(e)]
    if not storage:
        return split_headroom(target_mw, ordered)
    idle = {a.asset_id: a.clamp(0.0) for a in ordered}
    want = target_mw - math.fsum(idle.values())
    hours = (context.duration_s or SOC_HORIZON_S) / 3600
    shares = dict(idle)
    shares.update(_level(storage, want, hours, idle))
    _settle_level_noise(storage, want, idle, shares)
    stored_ids = {e.asset_id for e in storage}
    others = [a for a in ordered if a.asset_id not in stored_ids]
    if others:  # what storage did not place: the other assets, by headroom
        rest = target_mw - math.fsum(shares[e.asset_id] for e in storage)
        shares.update(
            _water_fill(rest, others, _headroom_weight(rest, shares, others), shares).shares
        )
    # then anything left over to whoever still has headroom (storage included)
    return _water_fill(target_mw, ordered, _headroom_weight(target_mw, shares, ordered), shares)


def _is_storage(entry: SplitAsset) -> bool:
    return entry.kind == "setpoint" and entry.asset.capacity_mwh > 0 and entry.soc_pct is not None


def _level(
    storage: list[SplitAsset], want: float, hours: float, idle: dict[str, float]
) -> dict[str, float]:
    """The storage shares that move every state of charge towards one level ``L``, placing
    as much of ``want`` (MW beyond the idle points) as they can."""
    upward = want > 0

    def gives(level: float) -> dict[str, float]:
        out = {}
        for entry in storage:
            start = idle[entry.asset_id]
            soc = entry.soc_pct or 0.0
            energy = entry.asset.capacity_mwh * (soc - level) / 100  # > 0: above the level
            if upward:
                out[entry.asset_id] = min(entry.max_mw, start + max(0.0, energy / hours))
            else:
                out[entry.asset_id] = max(entry.min_mw, start + min(0.0, energy / hours))
        return out

    def placed(level: float) -> float:
        return math.fsum(mw - idle[a] for a, mw in gives(level).items())

    if want == 0:
        return {e.asset_id: idle[e.asset_id] for e in storage}
    # placed() moves monotonically with the level: bisect on it (deterministic: a fixed
    # number of steps from fixed bounds).
    lo, hi = 0.0, 100.0  # at 0 every battery gives all it holds, at 100 takes all it can
    for _ in range(100):
        mid = (lo + hi) / 2
        enough = placed(mid) >= want if upward else placed(mid) <= want
        if enough == upward:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    return gives(hi if upward else lo)


def _settle_level_noise(
    storage: list[SplitAsset], want: float, idle: dict[str, float], shares: dict[str, float]
) -> None:
    """Put the bisection's last bit (well under 1 µW) on the batteries the level moved,
    so a battery the level left idle stays exactly idle."""
    residual = want - math.fsum(shares[e.asset_id] - idle[e.asset_id] for e in storage)
    if residual == 0 or abs(residual) > 1e-6:
        return  # exact, or storage could not place it all: the others take the rest
    for entry in reversed(storage):
        before = shares[entry.asset_id]
        if before == idle[entry.asset_id]:
            continue
        after = min(entry.max_mw, max(entry.min_mw, before + residual))
        shares[entry.asset_id] = after
        residual -= after - before
        if residual == 0:
            return


def _headroom_weight(
    target_mw: float, shares: dict[str, float], ordered: Sequence[Asset]
) -> Callable[[Asset], float]:
    upward = target_mw > math.fsum(shares[a.asset_id] for a in ordered)

    def weight(asset: Asset) -> float:
        start = shares[asset.asset_id]
        return asset.max_mw - start if upward else start - asset.min_mw

    return weight


@hookimpl
def der_split_policies() -> list[SplitPolicy]:
    return [
        SplitPolicy(
            name="capacity_weighted",
            split=split_capacity_weighted,
            description="in proportion to capacity_mwh (default); clamp, then redistribute",
        ),
        SplitPolicy(
            name="equal",
            split=split_equal,
            description="equal shares; clamp, then redistribute",
        ),
        SplitPolicy(
            name="headroom",
            split=split_headroom,
            description="in proportion to what each asset can do now in the target's direction",
        ),
        SplitPolicy(
            name="soc_balancing",
            split=split_soc_balancing,
            split_in_context=split_soc_balancing_in_context,
            description="storage first, converging states of charge; the rest by headroom",
        ),
    ]


def split_site(policy: SplitPolicy, target_mw: float, context: SplitContext) -> SplitResult:
    """Split ``target_mw`` over the site of ``context`` by ``policy``, within each asset's
    available range.

    The policy gets the context (``split_in_context``) or the assets with their available
    ranges as limits (``split``). Its result is then checked: a share outside its asset's
    range is clamped, a missing or non-finite one is the asset's idle point, a share for an
    asset not in the context is dropped; what that changed is shared again among the
    assets with headroom, in proportion to it. ``unallocated_mw`` is what still does not
    fit (0 for a target within the sum of the ranges).

    :raises ValueError: a non-finite target, a bad range or a duplicate asset, or what the
        policy raised.
    """
    if not math.isfinite(target_mw):
        raise ValueError(f"split target must be a finite number of MW, got {target_mw}")
    ordered = _sorted_assets(context.effective_assets())
    if policy.split_in_context is not None:
        result = policy.split_in_context(target_mw, context)
    else:
        result = policy.split(target_mw, ordered)
    return _enforce(policy.name, target_mw, ordered, result)


def _enforce(name: str, target_mw: float, ordered: list[Asset], result: SplitResult) -> SplitResult:
    """``result`` within the ranges of ``ordered``, redistributed (see :func:`split_site`)."""
    if not isinstance(result, SplitResult):
        raise TypeError(
            f"split policy {name!r} returned {type(result).__name__}, not a SplitResult"
        )
    shares: dict[str, float] = {}
    changed = set(result.shares) - {a.asset_id for a in ordered}
    for stray in sorted(changed):
        log.warning("split policy %r gave a share to asset %s, not in the split", name, stray)
    for asset in ordered:
        asked = result.shares.get(asset.asset_id)
        if asked is None or not math.isfinite(asked):
            shares[asset.asset_id] = asset.clamp(0.0)
            changed.add(asset.asset_id)
            continue
        shares[asset.asset_id] = asset.clamp(asked)
        if shares[asset.asset_id] != asked:
            changed.add(asset.asset_id)
    placed = math.fsum(shares.values())
    if not changed and math.isclose(
        placed + result.unallocated_mw, target_mw, rel_tol=1e-9, abs_tol=1e-9
    ):
        clean = {asset_id: mw + 0.0 for asset_id, mw in shares.items()}  # no -0.0, no int
        return SplitResult(shares=clean, unallocated_mw=result.unallocated_mw + 0.0)
    if changed:
        log.info(
            "split policy %r: shares of %s clamped into their available range; the rest "
            "shared again by headroom",
            name,
            ", ".join(sorted(changed)),
        )
    return _water_fill(target_mw, ordered, _headroom_weight(target_mw, shares, ordered), shares)


def _sorted_assets(assets: Sequence[Asset]) -> list[Asset]:
    ordered = sorted(assets, key=lambda a: a.asset_id)
    for previous, asset in itertools.pairwise(ordered):
        if previous.asset_id == asset.asset_id:
            raise ValueError(f"asset {asset.asset_id} appears twice in the split")
    for asset in ordered:
        if not (math.isfinite(asset.min_mw) and math.isfinite(asset.max_mw)):
            raise ValueError(f"asset {asset.asset_id} has a non-finite limit")
        if asset.min_mw > asset.max_mw:
            raise ValueError(
                f"asset {asset.asset_id} has min_mw {asset.min_mw} > max_mw {asset.max_mw}"
            )
    return ordered


def _water_fill(
    target_mw: float,
    assets: Sequence[Asset],
    weight: Callable[[Asset], float],
    start: dict[str, float] | None = None,
) -> SplitResult:
    """Share ``target_mw`` by ``weight`` from ``start`` (default: each asset's idle point,
    ``clamp(0)``; else shares within the limits), clamping and sharing again."""
    if not math.isfinite(target_mw):
        raise ValueError(f"split target must be a finite number of MW, got {target_mw}")
    ordered = _sorted_assets(assets)
    if not ordered:
        return SplitResult(shares={}, unallocated_mw=target_mw + 0.0)

    if start is None:
        shares = {asset.asset_id: asset.clamp(0.0) for asset in ordered}
    else:
        shares = {asset.asset_id: asset.clamp(start[asset.asset_id]) for asset in ordered}
    remaining = target_mw - math.fsum(shares.values())
    upward = remaining > 0

    def headroom(asset: Asset) -> float:
        share = shares[asset.asset_id]
        return asset.max_mw - share if upward else share - asset.min_mw

    # Each round either places the rest or fills at least one asset, so this ends.
    active = [asset for asset in ordered if headroom(asset) > 0]
    while active and remaining != 0 and (remaining > 0) == upward:
        weights = [weight(asset) for asset in active]
        total = math.fsum(weights)
        if not total > 0:  # nobody left with a weight: share by headroom instead
            weights = [headroom(asset) for asset in active]
            total = math.fsum(weights)
        # the fraction first: remaining * w underflows for denormal weights (5e-324)
        gives = [remaining * (w / total) for w in weights]
        full = [abs(give) >= headroom(a) for a, give in zip(active, gives, strict=True)]
        if not any(full):
            for asset, give in zip(active, gives, strict=True):
                # clamp: "give < headroom" can still round one ulp past the limit
                shares[asset.asset_id] = asset.clamp(shares[asset.asset_id] + give)
            break
        for asset, is_full in zip(active, full, strict=True):
            if is_full:
                shares[asset.asset_id] = asset.max_mw if upward else asset.min_mw
        active = [asset for asset, is_full in zip(active, full, strict=True) if not is_full]
        remaining = target_mw - math.fsum(shares.values())

    feasible = (
        math.fsum(a.min_mw for a in ordered) <= target_mw <= math.fsum(a.max_mw for a in ordered)
    )
    if feasible:
        _absorb_residual(target_mw, ordered, shares)
    clean = {asset_id: mw + 0.0 for asset_id, mw in shares.items()}  # no -0.0
    unallocated = 0.0 if feasible else target_mw - math.fsum(clean.values())
    return SplitResult(shares=clean, unallocated_mw=unallocated)


def _absorb_residual(target_mw: float, ordered: list[Asset], shares: dict[str, float]) -> None:
    """Put the float noise of a feasible split on the last assets (by id) that can take it."""
    for _ in range(3):  # one pass nearly always suffices; a few more settle the last ulp
        residual = target_mw - math.fsum(shares.values())
        if residual == 0:
            return
        for asset in reversed(ordered):
            before = shares[asset.asset_id]
            after = asset.clamp(before + residual)
            shares[asset.asset_id] = after
            residual -= after - before
            if residual == 0:
                break
