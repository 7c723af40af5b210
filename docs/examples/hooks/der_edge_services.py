from der_sdk import hookimpl
from der_sdk.extensions import EdgeService, EdgeServiceType


class LastValues(EdgeService):
    def __init__(self, ctx) -> None:
        self.latest = {}

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def on_telemetry(self, samples) -> None:
        self.latest.update({s.asset_id: s.mw for s in samples})


@hookimpl
def der_edge_services():
    return [EdgeServiceType(name="last-values", factory=LastValues)]
