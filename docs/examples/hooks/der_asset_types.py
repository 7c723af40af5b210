import msgspec

from der_sdk import hookimpl
from der_sdk.extensions import AssetType


class HydroDetails(msgspec.Struct, kw_only=True):
    head_m: float | None = None
    flow_m3s: float | None = None


@hookimpl
def der_asset_types():
    return [AssetType(name="hydro", details=HydroDetails, description="run-of-river hydro")]
