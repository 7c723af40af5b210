from der_sdk import hookimpl
from der_sdk.extensions import SplitPolicy, SplitResult


def first_asset_takes_all(target_mw, assets):
    ordered = sorted(assets, key=lambda a: a.asset_id)
    shares = {a.asset_id: 0.0 for a in ordered}
    if ordered:
        shares[ordered[0].asset_id] = ordered[0].clamp(target_mw)
    return SplitResult(shares=shares, unallocated_mw=target_mw - sum(shares.values()))


@hookimpl
def der_split_policies():
    return [SplitPolicy(name="first_takes_all", split=first_asset_takes_all)]
