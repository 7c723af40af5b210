"""Built-in split policies: ``capacity_weighted`` (the default) and ``equal``.

A policy splits one site target (MW) across the site's assets. Both built-ins share one
water-filling procedure and differ only in the weights:

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

Invalid input raises :class:`ValueError`: a non-finite target or limit, ``min_mw > max_mw``
or a duplicate ``asset_id`` (the inventory loader refuses all of these).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

from der_sdk.extensions import SplitPolicy, SplitResult
from der_sdk.models import Asset
from der_sdk.plugins import hookimpl

__all__ = [
    "DEFAULT_SPLIT_POLICY",
    "der_split_policies",
    "split_capacity_weighted",
    "split_equal",
]

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
    ]


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
    target_mw: float, assets: Sequence[Asset], weight: Callable[[Asset], float]
) -> SplitResult:
    if not math.isfinite(target_mw):
        raise ValueError(f"split target must be a finite number of MW, got {target_mw}")
    ordered = _sorted_assets(assets)
    if not ordered:
        return SplitResult(shares={}, unallocated_mw=target_mw + 0.0)

    shares = {asset.asset_id: asset.clamp(0.0) for asset in ordered}
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
