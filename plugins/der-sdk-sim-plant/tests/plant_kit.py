"""Assets, clocks and adapters for the sim-plant tests."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from der_sdk.conditions import ConditionQueue
from der_sdk.extensions import AdapterContext
from der_sdk.models import Asset

SITE = "51e00000-0000-4000-8000-0000000000a1"
PV = Asset(
    asset_id="51e00000-0000-4000-8000-000000000001",
    site_id=SITE,
    name="PV 1",
    asset_type="pv",
    max_mw=2.0,
    min_mw=0.0,
)
WIND = Asset(
    asset_id="51e00000-0000-4000-8000-000000000002",
    site_id=SITE,
    name="Wind 1",
    asset_type="wind",
    max_mw=3.0,
    min_mw=0.0,
)
EV = Asset(
    asset_id="51e00000-0000-4000-8000-000000000003",
    site_id=SITE,
    name="EV depot",
    asset_type="ev_charger",
    max_mw=0.0,
    min_mw=-0.3,
)
SOLSTICE_NOON = datetime(2026, 6, 21, 12, 0, tzinfo=UTC)


class FakeClock:
    """A monotonic clock and a wall clock that move only when told."""

    def __init__(self, wall: datetime = SOLSTICE_NOON) -> None:
        self.now = 1000.0
        self.wall = wall

    def __call__(self) -> float:
        return self.now

    def wall_clock(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.now += seconds


A = TypeVar("A")


def build(
    factory: Callable[..., A], asset: Asset, options: dict[str, Any] | None = None
) -> tuple[A, FakeClock, ConditionQueue]:
    """An adapter of ``factory`` for ``asset`` on a fake clock, with a condition queue."""
    clock = FakeClock()
    conditions = ConditionQueue()
    adapter = factory(
        AdapterContext(asset=asset, options=options or {}, conditions=conditions),
        clock=clock,
        wall_clock=clock.wall_clock,
    )
    return adapter, clock, conditions
