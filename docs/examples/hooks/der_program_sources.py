import asyncio
from datetime import UTC, datetime, timedelta

import msgspec

from der_sdk import hookimpl
from der_sdk.programs import (
    ProgramDispatch,
    ProgramRefusedError,
    ProgramSource,
    ProgramSourceType,
)


class EveningPeakOptions(msgspec.Struct, forbid_unknown_fields=True):
    mw: float
    start_in_s: float = 60.0
    duration_s: float = 3600.0


class EveningPeak(ProgramSource):
    """Asks every site in scope for `mw` once, and logs what became of it."""

    def __init__(self, ctx, options: EveningPeakOptions) -> None:
        self.ctx, self.options = ctx, options
        self.closed = asyncio.Event()

    async def run(self) -> None:
        start = datetime.now(UTC) + timedelta(seconds=self.options.start_in_s)
        for site in self.ctx.sites:
            control = ProgramDispatch(
                external_id=f"evening-peak/{site.site_id}",
                site_id=site.site_id,
                mw=self.options.mw,
                start_at=start,
                duration_s=self.options.duration_s,
            )
            try:
                await self.ctx.schedule(control)
            except ProgramRefusedError as exc:  # held by an operator, or invalid
                self.ctx.log.warning("cannot comply: %s", exc)
        self.ctx.report_health(True, "no server to lose")
        await self.closed.wait()

    async def dispatch_changed(self, dispatch) -> None:
        self.ctx.log.info("%s is %s", dispatch.external_id, dispatch.state)

    async def close(self) -> None:
        self.closed.set()


@hookimpl
def der_program_sources():
    return [
        ProgramSourceType(
            name="evening-peak",
            factory=EveningPeak,
            options=EveningPeakOptions,
            description="one fixed evening peak dispatch per site",
        )
    ]
