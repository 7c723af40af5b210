import msgspec

from der_sdk import hookimpl
from der_sdk.control import ControlModel
from der_sdk.extensions import AssetType


class HydroDetails(msgspec.Struct, kw_only=True):
    head_m: float | None = None
    flow_m3s: float | None = None
    available_mw: float | None = None


def hydro_range(asset, latest, duration_s):
    """What the river gives now; None when the sample does not say."""
    available = latest.details.get("available_mw")
    if not isinstance(available, int | float):
        return None
    return 0.0, float(available), f"available hydro {available:.3g} MW"


HYDRO_CONTROL = ControlModel(kind="export_limit", range_rule=hydro_range)


@hookimpl
def der_asset_types():
    return [
        AssetType(
            name="hydro",
            details=HydroDetails,
            description="run-of-river hydro",
            control=HYDRO_CONTROL,
        )
    ]
