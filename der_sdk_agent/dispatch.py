"""The agent's dispatch path: validate, split, clamp, apply, acknowledge.

Setpoints from the headend (:meth:`Dispatcher.headend_command`), local commands from edge
services (:attr:`~der_sdk.extensions.EdgeServiceContext.dispatch`) and the link-loss
fallback (:meth:`Dispatcher.link_loss_fallback`) take the same path:

* ``asset_id`` set (it wins over ``site_id``): the asset must be served by this agent;
  the MW is clamped to the static range of the asset's control kind (``[min_mw, max_mw]``
  for a setpoint, ``[0, max_mw]`` for an export limit, ``[min_mw, 0]`` for an import
  limit; :mod:`der_sdk.control`) and applied to that asset only.
* ``site_id`` alone: it must be this agent's site; the MW is split across the served
  assets (sorted by id) with the configured split policy, each asset within its available
  range now (from the latest sample its adapter read, :func:`der_sdk.split.split_site`),
  each share clamped, and all shares applied concurrently. MW the split cannot place is
  reported in the reason.
* ``start_at`` (a schedule): taken into the journal and run by the agent's clock
  (:mod:`der_sdk_agent.schedule`); a cancel command (``cancels``) stops one. A command
  applied now cuts the schedules of its assets (they end ``superseded``).
* ``duration_s``: the setpoint holds that long, then the asset returns to its default (a
  setpoint to 0 MW or the value nearest 0 its limits allow; an export or import limit is
  lifted: ``max_mw`` or ``min_mw``) and a ``duration_reverted`` event is recorded. A newer
  setpoint for the asset cancels the revert.

Headend commands are **applied at most once per command id**, across reconnects and agent
restarts, through the dispatch journal
(:class:`~der_sdk_agent.store.journal.CommandJournal`): the command is committed as
``acked`` before any device is touched, and a command id already in the journal is never
applied again (its final outcome is sent again instead). A command with an expiry is not
applied after its deadline; it ends ``expired``.

Dispatches are serialised (one lock), so two commands never interleave on an asset and
"newer" has one meaning: whichever command reaches this path last, from the headend or
from an edge service, is the one in force.

Local commands are reported: the report (a :class:`~der_sdk.wire.codec.LocalDispatchReport`)
is committed to the outbox, from which the link sends it until the headend acknowledges it
(the headend records a dispatch with source ``local``), and every listener added with
:meth:`Dispatcher.add_local_listener` gets it too.

The journal also remembers, per asset, where the setpoint in force came from (``headend``,
``local``, ``fallback``, ``default``): the link-loss fallback only touches assets whose
setpoint came from the headend.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from der_sdk.control import DEFAULT_CONTROL, ControlModel, split_context
from der_sdk.extensions import SetpointResult, SplitPolicy
from der_sdk.models import TelemetrySample, utc_now
from der_sdk.split import split_site
from der_sdk.wire.codec import Allocation, LocalDispatchReport
from der_sdk_agent.adapters import AdapterRuntime
from der_sdk_agent.store.journal import CommandJournal, JournalEntry
from der_sdk_agent.store.outbox import Outbox

if TYPE_CHECKING:
    from der_sdk_agent.schedule import ScheduleRunner

__all__ = ["DispatchOutcome", "Dispatcher", "HeadendCommand", "InForceSource"]

log = logging.getLogger("der.agent.dispatch")

AckStatus = Literal["applied", "rejected", "failed", "expired"]
InForceSource = Literal["headend", "schedule", "local", "fallback", "default"]

_NOISE_MW = 1e-9


@dataclass(frozen=True, kw_only=True)
class DispatchOutcome:
    """What the agent did with one command: the content of its SetpointAck."""

    command_id: str
    status: AckStatus
    allocations: tuple[Allocation, ...] = ()
    reason: str | None = None
    unallocated_mw: float = 0.0

    @property
    def applied_mw(self) -> float:
        """Total MW applied over the allocations."""
        return math.fsum(a.mw for a in self.allocations if a.status == "applied")


@dataclass(frozen=True, kw_only=True)
class HeadendCommand:
    """A ``Setpoint`` as received: ``received_at`` is the loop time at receipt and
    ``received_wall`` the agent's wall clock then (seconds since the epoch).

    Its expiry, if any, is whichever comes first: ``expires_in_ms`` after receipt
    (relative, so clock skew does not matter) or ``expires_at`` by the agent's own clock
    (so transit time or a headend clock running fast does not let it through).
    """

    command_id: str
    asset_id: str | None
    site_id: str | None
    mw: float
    duration_s: float | None = None
    expires_in_ms: int | None = None
    expires_at: float | None = None  # seconds since the epoch, UTC
    received_at: float = 0.0
    received_wall: float = 0.0
    start_at: float | None = None
    """A schedule's start, seconds since the epoch (``None``: apply now)."""
    steps: tuple[tuple[float, float], ...] = ()
    cancels: str | None = None
    """Set: this command cancels the schedule command with this id."""

    @property
    def deadline(self) -> float | None:
        """Loop time after which the command must not be applied (``None``: never)."""
        limits = []
        if self.expires_in_ms is not None:
            limits.append(self.received_at + self.expires_in_ms / 1000.0)
        if self.expires_at is not None:
            limits.append(self.received_at + (self.expires_at - self.received_wall))
        return min(limits) if limits else None

    @property
    def clock_skew_s(self) -> float | None:
        """How much later the absolute expiry is, by the agent's clock, than the relative
        one (both given): about the headend's clock lead over the agent's plus transit."""
        if self.expires_in_ms is None or self.expires_at is None:
            return None
        return (self.expires_at - self.received_wall) - self.expires_in_ms / 1000.0


class Dispatcher:
    """Applies commands to the served assets through their adapter runtimes.

    :param journal: the dispatch journal and the setpoints in force. Without it nothing
        is recorded and :meth:`headend_command` is unavailable.
    :param outbox: where local command reports and events go. Without it they are only
        logged (and given to the local listeners).
    :param controls: the control model of each asset type, by name (the installed asset
        types'); a type not in it is a setpoint within its limits.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        site_id: str,
        runtimes: Mapping[str, AdapterRuntime],
        policy: SplitPolicy,
        journal: CommandJournal | None = None,
        outbox: Outbox | None = None,
        controls: Mapping[str, ControlModel] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.site_id = site_id
        self.runtimes = dict(sorted(runtimes.items()))
        self.policy = policy
        self.controls: Mapping[str, ControlModel] = controls or {}
        self.journal = journal
        self.outbox = outbox
        self._lock = asyncio.Lock()
        self._reverts: dict[str, asyncio.Task[None]] = {}
        self._local_listeners: list[Callable[[LocalDispatchReport], None]] = []
        self.schedules: ScheduleRunner | None = None
        """Runs schedules (set by the agent); without it a schedule is rejected."""

    def add_local_listener(self, listener: Callable[[LocalDispatchReport], None]) -> None:
        """Call ``listener`` after each local command (cheap and non-blocking, please)."""
        self._local_listeners.append(listener)

    # ------------------------------------------------------------------ entry points

    async def handle(
        self,
        command_id: str,
        *,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None = None,
        deadline: float | None = None,
        source: InForceSource = "headend",
    ) -> DispatchOutcome:
        """Apply one command and say what happened. Never raises for a bad command.

        :param deadline: loop time after which the command must not be applied; checked
            once the command has its turn (``expired`` then, nothing applied).
        :param source: recorded as the origin of the setpoint in force of each asset the
            command was applied to.
        """
        problem = _check_numbers(mw, duration_s)
        if problem is not None:
            return self._reject(command_id, problem)
        try:
            async with self._lock:
                if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                    return _expired(command_id)
                outcome: DispatchOutcome | None = None
                if asset_id:
                    outcome = await self._asset_setpoint(command_id, asset_id, mw, duration_s)
                elif site_id:
                    outcome = await self._site_setpoint(command_id, site_id, mw, duration_s)
                if outcome is not None:
                    await self._record_in_force(outcome, source)
                    return outcome
        except Exception as exc:  # a bug must not leave the headend without an ack
            log.exception("command %s: dispatch failed", command_id)
            return DispatchOutcome(
                command_id=command_id,
                status="failed",
                reason=f"agent {self.agent_id} failed: {type(exc).__name__}: {exc}",
            )
        return self._reject(command_id, "setpoint names neither asset_id nor site_id")

    async def headend_command(
        self, command: HeadendCommand, send: Callable[[JournalEntry], None]
    ) -> JournalEntry:
        """Take a headend command through the journal; apply it at most once.

        A command id already in the journal is not applied again: its final outcome is
        passed to ``send`` again (nothing while it is still in progress). A new one is
        committed as ``acked`` and sent, then (unless its deadline has passed: ``expired``)
        applied; its final outcome is committed, unreported, and sent.

        :param send: gets each journal entry to acknowledge (``SetpointAck``); called on
            the loop, it must not block.
        :return: the command's journal entry, final unless it was in progress already.
        """
        if self.journal is None:
            raise RuntimeError("headend commands need the agent's dispatch journal")
        schedules = self.schedules
        if command.start_at is not None and schedules is not None:
            return await schedules.accept(
                command.command_id,
                asset_id=command.asset_id,
                site_id=command.site_id,
                start=command.start_at,
                steps=command.steps,
                duration_s=command.duration_s,
                send=send,
            )
        entry, new = await self.journal.receive(
            command.command_id,
            asset_id=command.asset_id,
            site_id=command.site_id,
            mw=command.mw,
            duration_s=command.duration_s,
        )
        if not new:
            if entry.final:
                log.info(
                    "command %s was received before (%s); its outcome is sent again, the "
                    "command is not applied again",
                    command.command_id,
                    entry.status,
                )
                send(entry)
            else:
                log.info(
                    "command %s was received before and is still in progress",
                    command.command_id,
                )
            return entry
        send(entry)
        deadline = command.deadline
        if command.cancels is not None:
            outcome = await self._cancel(command, send)
        elif command.start_at is not None:
            outcome = self._reject(command.command_id, "this agent runs no schedules")
        elif deadline is not None and deadline <= command.received_at:  # expired on arrival
            outcome = _expired(command.command_id)
        else:
            if schedules is not None:
                assets = [command.asset_id] if command.asset_id else list(self.runtimes)
                await schedules.supersede(assets, schedules.clock(), by=command.command_id)
            outcome = await self.handle(
                command.command_id,
                asset_id=command.asset_id,
                site_id=command.site_id,
                mw=command.mw,
                duration_s=command.duration_s,
                deadline=deadline,
            )
        entry = await self.journal.finish(
            command.command_id, outcome.status, outcome.allocations, outcome.reason
        )
        send(entry)
        return entry

    async def _cancel(
        self, command: HeadendCommand, send: Callable[[JournalEntry], None]
    ) -> DispatchOutcome:
        """A cancel command: stop its schedule, and return the assets to their default
        if a step of it ran."""
        assert command.cancels is not None
        if self.schedules is None:
            return self._reject(command.command_id, "this agent runs no schedules")
        result = await self.schedules.cancel(command.command_id, command.cancels, send=send)
        if not result.revert:
            return DispatchOutcome(
                command_id=command.command_id,
                status="applied" if result.status == "applied" else "rejected",
                reason=result.reason,
            )
        return await self.handle(
            command.command_id,
            asset_id=result.asset_id,
            site_id=result.site_id,
            mw=0.0,
            source="default",
        )

    async def local_dispatch(
        self,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None = None,
    ) -> DispatchOutcome:
        """The :data:`~der_sdk.extensions.LocalDispatch` callable for edge services.

        The command id is unique (``local-<uuid>``): it becomes the headend's dispatch id.
        The report is committed to the outbox before this returns.
        """
        return await self._local_command(asset_id, site_id, mw, duration_s, source="local")

    async def link_loss_fallback(self, why: str) -> list[DispatchOutcome]:
        """Return each asset whose setpoint in force came from the headend to its default
        (a setpoint to 0 MW, or the value nearest 0 its limits allow; an export or import
        limit is lifted), each as a local command (so the headend's history shows it).
        Assets commanded locally are left alone.

        :param why: said in each command's reported reason.
        """
        if self.journal is None:
            return []
        in_force = self.journal.in_force
        targets = [a for a in self.runtimes if in_force.get(a) == "headend"]
        return [
            await self._local_command(
                a,
                None,
                self.control_of(a).release_mw(self.runtimes[a].asset),
                None,
                source="fallback",
                note=why,
            )
            for a in targets
        ]

    async def _local_command(
        self,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None,
        *,
        source: InForceSource,
        note: str | None = None,
    ) -> DispatchOutcome:
        command_id = f"local-{uuid.uuid4()}"
        outcome = await self.handle(
            command_id,
            asset_id=asset_id,
            site_id=site_id,
            mw=mw,
            duration_s=duration_s,
            source=source,
        )
        log.info(
            "%s command %s (%s %s MW): %s%s",
            "local" if source == "local" else "fallback",
            command_id,
            f"asset {asset_id}" if asset_id else f"site {site_id}",
            f"{mw:g}",
            outcome.status,
            f": {outcome.reason}" if outcome.reason else "",
        )
        if _check_numbers(mw, duration_s) is None:  # not a command at all otherwise
            await self._report_local(outcome, asset_id, site_id, mw, duration_s, note)
        return outcome

    async def _report_local(
        self,
        outcome: DispatchOutcome,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None,
        note: str | None,
    ) -> None:
        report = LocalDispatchReport(
            command_id=outcome.command_id,
            mw=mw,
            ts=utc_now(),
            status=outcome.status,
            asset_id=asset_id or None,
            site_id=None if asset_id else site_id or None,
            duration_s=duration_s,
            reason="; ".join(r for r in (note, outcome.reason) if r) or None,
            allocations=outcome.allocations,
            unallocated_mw=outcome.unallocated_mw,
            policy=self.policy.name if not asset_id and site_id else None,
        )
        if self.outbox is not None:
            try:
                await self.outbox.local_reports.add(report)
            except Exception:
                log.exception(
                    "local command %s: its report could not be stored; the headend will "
                    "not hear of it",
                    outcome.command_id,
                )
        for listener in self._local_listeners:
            try:
                listener(report)
            except Exception:
                log.exception("local command %s: a listener failed", outcome.command_id)

    async def _record_in_force(self, outcome: DispatchOutcome, source: InForceSource) -> None:
        if self.journal is None:
            return
        try:
            for allocation in outcome.allocations:
                if allocation.status == "applied":
                    await self.journal.set_in_force(allocation.asset_id, source, outcome.command_id)
        except Exception:  # the command was applied all the same
            log.exception("command %s: recording the setpoints in force failed", outcome.command_id)

    async def close(self) -> None:
        """Cancel pending reverts (at shutdown)."""
        tasks = list(self._reverts.values())
        self._reverts.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ per asset

    async def _asset_setpoint(
        self, command_id: str, asset_id: str, mw: float, duration_s: float | None
    ) -> DispatchOutcome:
        key = asset_id if asset_id in self.runtimes else asset_id.lower()
        if key not in self.runtimes:
            return self._reject(
                command_id, f"asset {asset_id} is not served by agent {self.agent_id}"
            )
        allocation = await self._apply_share(key, mw, duration_s)
        log.info(
            "command %s: asset %s %g MW -> %s %g MW%s",
            command_id,
            key,
            mw,
            allocation.status,
            allocation.mw,
            f" ({allocation.reason})" if allocation.reason else "",
        )
        return DispatchOutcome(
            command_id=command_id,
            status=_status(allocation.status),
            allocations=(allocation,),
            reason=allocation.reason,
        )

    # ------------------------------------------------------------------ per site

    async def _site_setpoint(
        self, command_id: str, site_id: str, mw: float, duration_s: float | None
    ) -> DispatchOutcome:
        if site_id != self.site_id and site_id.lower() != self.site_id.lower():
            return self._reject(
                command_id,
                f"site {site_id} is not served by agent {self.agent_id} "
                f"(it serves site {self.site_id})",
            )
        assets = [rt.asset for rt in self.runtimes.values()]
        try:
            context = split_context(
                assets,
                controls=self.controls,
                latest=self._latest,
                duration_s=duration_s,
                now=utc_now(),
                site_id=site_id,
            )
            split = split_site(self.policy, mw, context)
        except Exception as exc:
            reason = f"split policy {self.policy.name!r} failed: {type(exc).__name__}: {exc}"
            log.error("command %s: site %s %g MW: %s", command_id, site_id, mw, reason)
            return DispatchOutcome(command_id=command_id, status="failed", reason=reason)

        shares = {a: s for a, s in split.shares.items() if a in self.runtimes}
        unallocated = split.unallocated_mw + math.fsum(
            s for a, s in split.shares.items() if a not in self.runtimes
        )
        for stray in sorted(set(split.shares) - set(shares)):
            log.error(
                "command %s: split policy %r returned asset %s, which this agent does not "
                "serve; its share is reported unallocated",
                command_id,
                self.policy.name,
                stray,
            )
        log.info(
            "command %s: site %s %g MW split by %s: %s%s",
            command_id,
            site_id,
            mw,
            self.policy.name,
            ", ".join(f"{a}={s:g}" for a, s in shares.items()) or "no assets",
            f"; {unallocated:g} MW unallocated" if abs(unallocated) > _NOISE_MW else "",
        )
        allocations = await asyncio.gather(
            *(self._apply_share(a, share, duration_s) for a, share in shares.items())
        )
        problems = [f"{a.asset_id}: {a.reason}" for a in allocations if a.status != "applied"]
        if abs(unallocated) > _NOISE_MW:
            problems.append(f"{unallocated:g} MW unallocated")
        else:
            unallocated = 0.0
        statuses = {a.status for a in allocations}
        status: AckStatus
        if statuses <= {"applied"} and allocations:
            status = "applied"
        elif statuses == {"rejected"}:
            status = "rejected"
        else:
            status = "failed"
        if not allocations:
            status = "rejected"
            problems.insert(0, "no assets to split across")
        return DispatchOutcome(
            command_id=command_id,
            status=status,
            allocations=tuple(allocations),
            reason="; ".join(problems) if problems else None,
            unallocated_mw=unallocated,
        )

    # ------------------------------------------------------------------ one share

    def _latest(self, asset_id: str) -> TelemetrySample | None:
        runtime = self.runtimes.get(asset_id)
        return runtime.latest if runtime is not None else None

    def control_of(self, asset_id: str) -> ControlModel:
        """The control model of the asset's type."""
        return self.controls.get(self.runtimes[asset_id].asset.asset_type, DEFAULT_CONTROL)

    async def _apply_share(self, asset_id: str, mw: float, duration_s: float | None) -> Allocation:
        """Clamp, apply and (with a duration) schedule the revert. Holds ``_lock``."""
        runtime = self.runtimes[asset_id]
        asset = runtime.asset
        self._cancel_revert(asset_id)
        control = self.control_of(asset_id)
        target = control.clamp(asset, mw)
        notes: list[str] = []
        if abs(target - mw) > _NOISE_MW:
            lo, hi = control.static_range(asset)
            what = "limits" if control.kind == "setpoint" else control.kind.replace("_", " ")
            notes.append(f"clamped {mw:g} MW to {target:g} MW ({what} {lo:g}..{hi:g})")
        result: SetpointResult = await runtime.apply_setpoint(target, duration_s)
        if result.reason:
            notes.append(result.reason)
        applied = result.status == "applied"
        if applied and duration_s is not None:
            self._reverts[asset_id] = asyncio.create_task(
                self._revert_after(asset_id, duration_s),
                name=f"der-agent-revert-{asset_id}",
            )
        return Allocation(
            asset_id=asset_id,
            mw=(result.applied_mw if result.applied_mw is not None else target)
            if applied
            else target,
            status=result.status,
            reason="; ".join(notes) if notes else None,
        )

    def _cancel_revert(self, asset_id: str) -> None:
        task = self._reverts.pop(asset_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _revert_after(self, asset_id: str, duration_s: float) -> None:
        await asyncio.sleep(duration_s)
        async with self._lock:
            if self._reverts.get(asset_id) is not asyncio.current_task():
                return  # a newer setpoint took over while we waited for the lock
            del self._reverts[asset_id]
            runtime = self.runtimes[asset_id]
            idle = self.control_of(asset_id).release_mw(runtime.asset)
            result = await runtime.apply_setpoint(idle, None)
            if result.status == "applied":
                await self._record_in_force(
                    DispatchOutcome(
                        command_id=f"revert-{asset_id}",
                        status="applied",
                        allocations=(Allocation(asset_id=asset_id, mw=idle),),
                    ),
                    "default",
                )
        if result.status == "applied":
            message = f"setpoint duration {duration_s:g} s elapsed; returned to {idle:g} MW"
            log.info("asset %s: %s", asset_id, message)
        else:
            message = (
                f"setpoint duration {duration_s:g} s elapsed but returning to {idle:g} MW "
                f"{result.status}: {result.reason}"
            )
            log.warning("asset %s: %s", asset_id, message)
        if self.outbox is not None:
            try:
                await self.outbox.add_event(
                    "duration_reverted",
                    message,
                    asset_id=asset_id,
                    data={
                        "duration_s": duration_s,
                        "mw": idle,
                        "status": result.status,
                        "reason": result.reason,
                    },
                )
            except Exception:
                log.exception("asset %s: recording the duration revert failed", asset_id)

    def _reject(self, command_id: str, reason: str) -> DispatchOutcome:
        log.warning("command %s rejected: %s", command_id, reason)
        return DispatchOutcome(command_id=command_id, status="rejected", reason=reason)


def _expired(command_id: str) -> DispatchOutcome:
    reason = "expired before it could be applied; not applied"
    log.warning("command %s %s", command_id, reason)
    return DispatchOutcome(command_id=command_id, status="expired", reason=reason)


def _status(value: str) -> AckStatus:
    if value in ("applied", "rejected"):
        return value  # type: ignore[return-value]
    return "failed"


def _check_numbers(mw: float, duration_s: float | None) -> str | None:
    if not math.isfinite(mw):
        return f"mw must be a finite number, got {mw}"
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        return f"duration_s must be a positive number of seconds, got {duration_s}"
    return None
