"""The agent's dispatch path: validate, split, clamp, apply, acknowledge.

Setpoints from the headend and local commands from edge services
(:attr:`~der_sdk.extensions.EdgeServiceContext.dispatch`) take the same path:

* ``asset_id`` set (it wins over ``site_id``): the asset must be served by this agent;
  the MW is clamped to the asset's ``[min_mw, max_mw]`` and applied to that asset only.
* ``site_id`` alone: it must be this agent's site; the MW is split across the served
  assets (sorted by id) with the configured split policy, each share clamped, and all
  shares applied concurrently. MW the split cannot place is reported in the reason.
* ``duration_s``: the setpoint holds that long, then the asset returns to 0 MW (or the
  value nearest 0 its limits allow). A newer setpoint for the asset cancels the revert.

Dispatches are serialised (one lock), so two commands never interleave on an asset and
"newer" has one meaning: whichever command reaches this path last, from the headend or
from an edge service, is the one in force.

Local commands are reported: every listener added with :meth:`Dispatcher.add_local_listener`
gets a :class:`~der_sdk.wire.codec.LocalDispatchReport` (the link sends it to the headend,
which records a dispatch with source ``local``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from der_sdk.extensions import SetpointResult, SplitPolicy
from der_sdk.models import utc_now
from der_sdk.wire.codec import Allocation, LocalDispatchReport
from der_sdk_agent.adapters import AdapterRuntime

__all__ = ["DispatchOutcome", "Dispatcher"]

log = logging.getLogger("der.agent.dispatch")

AckStatus = Literal["applied", "rejected", "failed"]

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


class Dispatcher:
    """Applies commands to the served assets through their adapter runtimes."""

    def __init__(
        self,
        *,
        agent_id: str,
        site_id: str,
        runtimes: Mapping[str, AdapterRuntime],
        policy: SplitPolicy,
    ) -> None:
        self.agent_id = agent_id
        self.site_id = site_id
        self.runtimes = dict(sorted(runtimes.items()))
        self.policy = policy
        self._lock = asyncio.Lock()
        self._reverts: dict[str, asyncio.Task[None]] = {}
        self._local_listeners: list[Callable[[LocalDispatchReport], None]] = []

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
    ) -> DispatchOutcome:
        """Apply one command and say what happened. Never raises for a bad command."""
        problem = _check_numbers(mw, duration_s)
        if problem is not None:
            return self._reject(command_id, problem)
        try:
            async with self._lock:
                if asset_id:
                    return await self._asset_setpoint(command_id, asset_id, mw, duration_s)
                if site_id:
                    return await self._site_setpoint(command_id, site_id, mw, duration_s)
        except Exception as exc:  # a bug must not leave the headend without an ack
            log.exception("command %s: dispatch failed", command_id)
            return DispatchOutcome(
                command_id=command_id,
                status="failed",
                reason=f"agent {self.agent_id} failed: {type(exc).__name__}: {exc}",
            )
        return self._reject(command_id, "setpoint names neither asset_id nor site_id")

    async def local_dispatch(
        self,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None = None,
    ) -> DispatchOutcome:
        """The :data:`~der_sdk.extensions.LocalDispatch` callable for edge services.

        The command id is unique (``local-<uuid>``): it becomes the headend's dispatch id.
        """
        command_id = f"local-{uuid.uuid4()}"
        outcome = await self.handle(
            command_id, asset_id=asset_id, site_id=site_id, mw=mw, duration_s=duration_s
        )
        log.info(
            "local command %s (%s %s MW): %s%s",
            command_id,
            f"asset {asset_id}" if asset_id else f"site {site_id}",
            f"{mw:g}",
            outcome.status,
            f": {outcome.reason}" if outcome.reason else "",
        )
        if _check_numbers(mw, duration_s) is None:  # not a command at all otherwise
            self._report_local(outcome, asset_id, site_id, mw, duration_s)
        return outcome

    def _report_local(
        self,
        outcome: DispatchOutcome,
        asset_id: str | None,
        site_id: str | None,
        mw: float,
        duration_s: float | None,
    ) -> None:
        report = LocalDispatchReport(
            command_id=outcome.command_id,
            mw=mw,
            ts=utc_now(),
            status=outcome.status,
            asset_id=asset_id or None,
            site_id=None if asset_id else site_id or None,
            duration_s=duration_s,
            reason=outcome.reason,
            allocations=outcome.allocations,
            unallocated_mw=outcome.unallocated_mw,
            policy=self.policy.name if not asset_id and site_id else None,
        )
        for listener in self._local_listeners:
            try:
                listener(report)
            except Exception:
                log.exception("local command %s: a listener failed", outcome.command_id)

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
            split = self.policy.split(mw, assets)
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

    async def _apply_share(self, asset_id: str, mw: float, duration_s: float | None) -> Allocation:
        """Clamp, apply and (with a duration) schedule the revert. Holds ``_lock``."""
        runtime = self.runtimes[asset_id]
        asset = runtime.asset
        self._cancel_revert(asset_id)
        target = asset.clamp(mw)
        notes: list[str] = []
        if abs(target - mw) > _NOISE_MW:
            notes.append(
                f"clamped {mw:g} MW to {target:g} MW (limits {asset.min_mw:g}..{asset.max_mw:g})"
            )
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
            idle = runtime.asset.clamp(0.0)
            result = await runtime.apply_setpoint(idle, None)
        if result.status == "applied":
            log.info(
                "asset %s: setpoint duration %g s elapsed; returned to %g MW",
                asset_id,
                duration_s,
                idle,
            )
        else:
            log.warning(
                "asset %s: setpoint duration %g s elapsed but returning to %g MW %s: %s",
                asset_id,
                duration_s,
                idle,
                result.status,
                result.reason,
            )

    def _reject(self, command_id: str, reason: str) -> DispatchOutcome:
        log.warning("command %s rejected: %s", command_id, reason)
        return DispatchOutcome(command_id=command_id, status="rejected", reason=reason)


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
