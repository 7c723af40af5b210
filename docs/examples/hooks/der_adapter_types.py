import msgspec

from der_sdk import hookimpl
from der_sdk.extensions import Adapter, AdapterContext, AdapterType, SetpointResult
from der_sdk.models import TelemetrySample, utc_now


class ConstantOptions(msgspec.Struct, forbid_unknown_fields=True):
    mw: float = 0.0


class ConstantAdapter(Adapter):
    def __init__(self, ctx: AdapterContext) -> None:
        self.asset, self.mw = ctx.asset, ctx.options.mw

    async def connect(self) -> None: ...

    async def read(self) -> TelemetrySample:
        return TelemetrySample(
            asset_id=self.asset.asset_id, site_id=self.asset.site_id, ts=utc_now(), mw=self.mw
        )

    async def apply_setpoint(self, mw, duration_s=None):
        self.mw = mw
        return SetpointResult(status="applied", applied_mw=mw)

    async def close(self) -> None: ...


@hookimpl
def der_adapter_types():
    return [AdapterType(name="constant", factory=ConstantAdapter, options=ConstantOptions)]
