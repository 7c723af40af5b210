"""From an OpenADR 2.0b event to site dispatches, as pure functions (docs/programs.md).

An event (as openleadr parses ``oadrDistributeEvent``: a dict with ``event_descriptor``,
``active_period``, ``event_signals`` and ``targets``) becomes one
:class:`~der_sdk.programs.ProgramDispatch` per site it reaches: a schedule from the
event's start, one step per interval of the signal the rule reads, the MW of each step
from the rule:

* ``simple_levels``: the ``SIMPLE`` signal's level (0 normal, 1 moderate, 2 high,
  3 special) looked up in the site's level table (``site_levels``, else ``levels``); a
  level not in the table takes the entry of the highest level below it (0 MW when none);
* ``price_threshold``: an ``ELECTRICITY_PRICE`` or ``ENERGY_PRICE`` signal; a price at or
  above ``price_threshold`` dispatches the site's ``mw_above_threshold`` (``site_mw``,
  else ``mw_above_threshold``), below it 0 MW.

An event reaches every site of the program unless its targets name ``resource_id``\\ s:
then only the sites whose id is one of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec

from der_sdk.models import Asset, ScheduleStep, Site
from der_sdk.programs import ProgramDispatch

__all__ = [
    "PRICE_SIGNALS",
    "SIMPLE_SIGNAL",
    "EventPlan",
    "OpenAdrOptions",
    "event_id_of",
    "plan_event",
    "site_range",
]

SIMPLE_SIGNAL = "SIMPLE"
PRICE_SIGNALS = ("ELECTRICITY_PRICE", "ENERGY_PRICE")

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400, description="seconds, in (0, 86400]")]


class OpenAdrOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The ``options:`` of an ``openadr2b`` program (docs/programs.md, "OpenADR 2.0b")."""

    vtn_url: str
    """The VTN's base URL, e.g. ``https://vtn.example.com/OpenADR2/Simple/2.0b``."""
    ven_name: str
    """This VEN's name, as the VTN knows it."""
    ven_id: str | None = None
    """This VEN's id, when the VTN assigned one out of band (else the VTN gives one)."""
    poll_interval_s: Seconds = 10.0
    """How often the VTN is polled (oadrPoll)."""
    rule: Literal["simple_levels", "price_threshold"] = "simple_levels"
    levels: dict[int, float] = msgspec.field(default_factory=dict)
    """``simple_levels``: SIMPLE level → MW for each site (+ discharge/export)."""
    site_levels: dict[str, dict[int, float]] = msgspec.field(default_factory=dict)
    """``simple_levels``: a level table of its own for a site, by site id."""
    price_threshold: float | None = None
    """``price_threshold``: the price at or above which a site is dispatched."""
    mw_above_threshold: float = 0.0
    site_mw: dict[str, float] = msgspec.field(default_factory=dict)
    """``price_threshold``: the MW of a site of its own, by site id."""
    over_limits: Literal["opt_out", "clamp"] = "opt_out"
    """An event asking a site for more than its assets' limits: opt out, or clamp the MW
    to the site's range and opt in."""
    market_contexts: list[str] = msgspec.field(default_factory=list)
    """Only events of these market contexts (programs); empty: any."""
    report_interval_s: Seconds = 10.0
    """How often the site MW telemetry report is sampled for the VTN."""
    cert: str | None = None
    """This VEN's client certificate (PEM): TLS client authentication and XML signatures."""
    key: str | None = None
    passphrase: str | None = None
    ca_file: str | None = None
    """The CA that signed the VTN's TLS certificate."""
    vtn_fingerprint: str | None = None
    """The VTN's certificate fingerprint: messages whose signature does not match are
    ignored."""
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.rule == "simple_levels" and not (self.levels or self.site_levels):
            raise ValueError("rule simple_levels needs a levels table (level: MW)")
        if self.rule == "price_threshold" and self.price_threshold is None:
            raise ValueError("rule price_threshold needs price_threshold")
        if (self.cert is None) != (self.key is None):
            raise ValueError("give cert and key together (PEM files)")


@dataclass
class EventPlan:
    """What an event asks of the program: its id and modification, its status, the
    site dispatches it makes, and why it makes none (``ignored``)."""

    event_id: str
    modification_number: int
    status: str
    controls: list[ProgramDispatch] = field(default_factory=list)
    ignored: str | None = None
    clamped: list[str] = field(default_factory=list)


def event_id_of(external_id: str) -> str:
    """The OpenADR event id of a dispatch's ``external_id`` (``<event id>/<site id>``)."""
    return external_id.rpartition("/")[0] or external_id


def site_range(assets: Sequence[Asset]) -> tuple[float, float]:
    """The MW range of a site: the sums of its assets' ``min_mw`` and ``max_mw``."""
    return sum(a.min_mw for a in assets), sum(a.max_mw for a in assets)


def plan_event(
    event: Mapping[str, Any],
    options: OpenAdrOptions,
    sites: Sequence[Site],
    assets: Sequence[Asset],
) -> EventPlan:
    """The site dispatches ``event`` makes under ``options`` (module docstring)."""
    descriptor = event.get("event_descriptor") or {}
    event_id = str(descriptor.get("event_id", ""))
    plan = EventPlan(
        event_id=event_id,
        modification_number=int(descriptor.get("modification_number") or 0),
        status=str(descriptor.get("event_status", "")),
    )
    context = descriptor.get("market_context")
    if options.market_contexts and context not in options.market_contexts:
        plan.ignored = f"market context {context!r} is not one of {options.market_contexts}"
        return plan
    signal = _signal_for(event, options)
    if signal is None:
        wanted = SIMPLE_SIGNAL if options.rule == "simple_levels" else " or ".join(PRICE_SIGNALS)
        plan.ignored = f"the event has no {wanted} signal"
        return plan
    period = event.get("active_period") or {}
    start = period.get("dtstart")
    if not isinstance(start, datetime):
        plan.ignored = "the event has no start (active_period.dtstart)"
        return plan
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    intervals = list(signal.get("intervals") or [])
    offsets: list[tuple[float, float]] = []  # (offset_s, payload)
    offset = 0.0
    for interval in sorted(intervals, key=lambda i: int(i.get("uid") or 0)):
        offsets.append((offset, float(interval.get("signal_payload") or 0.0)))
        duration = interval.get("duration")
        offset += duration.total_seconds() if isinstance(duration, timedelta) else 0.0
    total = offset or _seconds(period.get("duration"))
    if not offsets or total <= 0:
        plan.ignored = "the event's signal has no intervals with a duration"
        return plan
    by_site: dict[str, list[Asset]] = {}
    for asset in assets:
        by_site.setdefault(asset.site_id, []).append(asset)
    for site in _targeted(event, sites):
        low, high = site_range(by_site.get(site.site_id, []))
        steps: list[ScheduleStep] = []
        for at, payload in offsets:
            mw = _mw(options, site.site_id, payload)
            if options.over_limits == "clamp" and not low <= mw <= high:
                plan.clamped.append(
                    f"site {site.site_id}: {mw:g} MW clamped to [{low:g}, {high:g}]"
                )
                mw = min(high, max(low, mw))
            if not steps or steps[-1].mw != mw:
                steps.append(ScheduleStep(offset_s=at, mw=mw))
        plan.controls.append(
            ProgramDispatch(
                external_id=f"{event_id}/{site.site_id}",
                site_id=site.site_id,
                start_at=start,
                duration_s=total,
                steps=steps,
                reason=f"OpenADR event {event_id} ({signal.get('signal_name')})",
            )
        )
    if not plan.controls:
        plan.ignored = "the event targets none of the program's sites"
    return plan


def _signal_for(event: Mapping[str, Any], options: OpenAdrOptions) -> Mapping[str, Any] | None:
    signals = event.get("event_signals") or []
    if isinstance(signals, Mapping):
        signals = signals.get("event_signals") or []
    wanted = (SIMPLE_SIGNAL,) if options.rule == "simple_levels" else PRICE_SIGNALS
    for signal in signals:
        if str(signal.get("signal_name", "")).upper() in wanted:
            return signal  # type: ignore[no-any-return]
    return None


def _targeted(event: Mapping[str, Any], sites: Sequence[Site]) -> list[Site]:
    """The sites the event reaches: those named by ``resource_id`` targets, else all."""
    targets = event.get("targets") or []
    if isinstance(targets, Mapping):
        targets = [targets]
    resources = {
        str(t["resource_id"]).lower()
        for t in targets
        if isinstance(t, Mapping) and t.get("resource_id")
    }
    if not resources:
        return list(sites)
    return [s for s in sites if s.site_id in resources]


def _mw(options: OpenAdrOptions, site_id: str, payload: float) -> float:
    if options.rule == "price_threshold":
        threshold = options.price_threshold if options.price_threshold is not None else 0.0
        if payload < threshold:
            return 0.0
        return options.site_mw.get(site_id, options.mw_above_threshold)
    table = options.site_levels.get(site_id) or options.levels
    below = [level for level in table if level <= payload]
    return table[max(below)] if below else 0.0


def _seconds(value: object) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else 0.0
