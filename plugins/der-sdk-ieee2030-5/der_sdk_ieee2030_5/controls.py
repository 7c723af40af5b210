"""What a DERControl means here: pure functions, no I/O.

* :func:`map_control` turns a DERControlBase into a MW setpoint for the assets an end
  device stands for, or says why it cannot (``docs/programs.md`` lists what is mapped).
* :func:`resolve` applies the standard's precedence between overlapping controls: the
  control of the program with the lower ``primacy`` value wins; between equal primacy,
  the control created later wins. Each control gets the parts of its interval that no
  control above it covers (none: it is superseded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from envoy_schema.server.schema.sep2.der import DERControlBase
from envoy_schema.server.schema.sep2.event import EventStatusType

from der_sdk.models import Asset

__all__ = [
    "GENERATION_TYPES",
    "Control",
    "Mapped",
    "NotMapped",
    "Window",
    "map_control",
    "resolve",
]

GENERATION_TYPES = frozenset({"pv", "wind"})
"""Asset types whose MW setpoint is a ceiling on their output (they cannot be pushed up):
for these, a limit on generation or export is a setpoint."""

OPEN_STATUSES = frozenset({EventStatusType.Scheduled, EventStatusType.Active})

Window = tuple[int, int]
"""``[start, end)`` in the server's time (seconds since 1970, UTC)."""


@dataclass(frozen=True, kw_only=True)
class Control:
    """One DERControl of one program, as read from the server."""

    mrid: str
    program_mrid: str
    primacy: int
    creation_time: int
    start: int
    duration: int
    status: int
    base: DERControlBase
    href: str | None = None
    reply_to: str | None = None
    response_required: int = 0
    description: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.duration

    @property
    def is_open(self) -> bool:
        """Scheduled or active on the server (not cancelled or superseded there)."""
        return self.status in OPEN_STATUSES

    def outranks(self, other: Control) -> bool:
        """Whether this control wins over ``other`` where they overlap: lower primacy,
        then the later creation time (then the larger mRID, so that the order is total)."""
        return (-self.primacy, self.creation_time, self.mrid) > (
            -other.primacy,
            other.creation_time,
            other.mrid,
        )


@dataclass(frozen=True)
class Mapped:
    """The control as a setpoint: ``mw`` for the whole target, ``via`` the field used."""

    mw: float
    via: str


@dataclass(frozen=True)
class NotMapped:
    """Nothing in the control maps to a setpoint of this target; ``reason`` says why."""

    reason: str


def _watts(value: int, multiplier: int) -> float:
    return float(value) * 10.0**multiplier


def map_control(base: DERControlBase, assets: Sequence[Asset]) -> Mapped | NotMapped:
    """The MW setpoint ``base`` asks of ``assets`` (an end device's site or asset).

    In order, the first present wins: ``opModTargetW`` (signed W: + discharge or export),
    csipaus ``opModStorageTargetW``, ``opModFixedW`` (signed hundredths of a percent of
    the target's ``max_mw``, or of ``-min_mw`` when negative), then for targets of
    generation assets only (``pv``, ``wind``: their setpoint is a ceiling)
    ``opModMaxLimW`` (hundredths of a percent of ``max_mw``), csipaus ``opModGenLimW`` and
    ``opModExpLimW`` (W). ``opModEnergize`` or ``opModConnect`` false: 0 MW.
    """
    max_mw = sum(a.max_mw for a in assets)
    min_mw = sum(a.min_mw for a in assets)
    if base.opModTargetW is not None:
        return Mapped(
            _watts(base.opModTargetW.value, base.opModTargetW.multiplier) / 1e6, "opModTargetW"
        )
    if base.opModStorageTargetW is not None:
        target = base.opModStorageTargetW
        return Mapped(_watts(target.value, target.multiplier) / 1e6, "opModStorageTargetW")
    if base.opModFixedW is not None:
        share = base.opModFixedW / 10_000
        return Mapped(share * (max_mw if share >= 0 else -min_mw), "opModFixedW")
    generation_only = bool(assets) and all(a.asset_type in GENERATION_TYPES for a in assets)
    limits = []
    if base.opModMaxLimW is not None:
        limits.append((base.opModMaxLimW / 10_000 * max_mw, "opModMaxLimW"))
    for name in ("opModGenLimW", "opModExpLimW"):
        limit = getattr(base, name)
        if limit is not None:
            limits.append((_watts(limit.value, limit.multiplier) / 1e6, name))
    if limits and generation_only:
        mw, via = min(limits)
        return Mapped(max(0.0, mw), via)
    if base.opModEnergize is False or base.opModConnect is False:
        return Mapped(0.0, "opModEnergize" if base.opModEnergize is False else "opModConnect")
    present = sorted(name for name, value in base if value is not None)
    if limits:
        return NotMapped(
            f"{', '.join(via for _, via in limits)}: a limit maps to a setpoint only for"
            " generation assets (pv, wind); this target has storage or load"
        )
    if not present:
        return NotMapped("the DERControlBase is empty")
    return NotMapped(f"no mapped control in {', '.join(present)}")


@dataclass
class Resolution:
    """Where each open control holds (:func:`resolve`)."""

    windows: dict[str, list[Window]] = field(default_factory=dict)
    """Each control's parts that no control above it covers, by mRID, in time order."""
    superseded_by: dict[str, str] = field(default_factory=dict)
    """Controls with no part left, and the mRID of a control that covers them."""


def resolve(controls: Sequence[Control], now: int) -> Resolution:
    """Split the open controls that have not ended (at ``now``) into the windows where
    each one wins (see the module). A control that ended is left out."""
    live = [c for c in controls if c.is_open and c.end > now and c.duration > 0]
    result = Resolution()
    for control in live:
        above = sorted(
            ((o.start, o.end, o.mrid) for o in live if o is not control and o.outranks(control)),
        )
        parts: list[Window] = [(control.start, control.end)]
        cover = ""
        for start, end, mrid in above:
            next_parts: list[Window] = []
            for a, b in parts:
                if end <= a or start >= b:
                    next_parts.append((a, b))
                    continue
                cover = mrid
                if a < start:
                    next_parts.append((a, start))
                if end < b:
                    next_parts.append((end, b))
            parts = next_parts
        parts = [(a, b) for a, b in parts if b > now]
        if parts:
            result.windows[control.mrid] = parts
        else:
            result.superseded_by[control.mrid] = cover
    return result
