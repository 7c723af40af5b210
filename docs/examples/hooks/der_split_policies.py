from der_sdk import hookimpl
from der_sdk.extensions import SplitPolicy, SplitResult


def first_asset_takes_all(target_mw, assets):
    ordered = sorted(assets, key=lambda a: a.asset_id)
    shares = {a.asset_id: 0.0 for a in ordered}
    if ordered:
        shares[ordered[0].asset_id] = ordered[0].clamp(target_mw)
    return SplitResult(shares=shares, unallocated_mw=target_mw - sum(shares.values()))


def emptiest_charges_first(target_mw, context):
    """Charging: batteries by state of charge, lowest first; anything else as above."""
    if target_mw >= 0:
        return first_asset_takes_all(target_mw, context.effective_assets())
    known = [e for e in context.assets if e.soc_pct is not None]
    shares = {e.asset_id: 0.0 for e in context.assets}
    left = target_mw
    for entry in sorted(known, key=lambda e: (e.soc_pct, e.asset_id)):
        shares[entry.asset_id] = max(entry.min_mw, left)
        left -= shares[entry.asset_id]
    return SplitResult(shares=shares, unallocated_mw=left)


@hookimpl
def der_split_policies():
    return [
        SplitPolicy(name="first_takes_all", split=first_asset_takes_all),
        SplitPolicy(
            name="emptiest_first",
            split=first_asset_takes_all,  # without telemetry
            split_in_context=emptiest_charges_first,
        ),
    ]
