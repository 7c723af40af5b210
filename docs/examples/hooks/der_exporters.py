from der_sdk import hookimpl
from der_sdk.errors import DerSdkError
from der_sdk.extensions import Exporter, ExporterType


class PrintingHistorian(Exporter):
    """Sends each batch to a (pretend) historian that deduplicates by batch id."""

    def __init__(self, ctx) -> None:
        self.url = ctx.options.get("url") or ""
        if not self.url:
            raise DerSdkError(f"exporter {ctx.name}: set {ctx.variable('url')}")
        self.seen = set()

    async def export(self, batch) -> None:
        if batch.batch_id in self.seen:  # given again after a crash: nothing new to send
            return
        print(f"POST {self.url}: {len(batch.samples)} samples")
        self.seen.add(batch.batch_id)


@hookimpl
def der_exporters():
    return [ExporterType(name="printing-historian", factory=PrintingHistorian)]
