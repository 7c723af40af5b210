"""The headend's side of a program: :class:`HeadendProgramContext` turns a program's
controls into dispatches through the dispatcher, under the precedence rule
(:mod:`.precedence`), and records every action in the audit trail (``via=program:<name>``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from der_sdk.inventory import ProgramConfig
from der_sdk.models import Asset, Dispatch, Site, TelemetrySample, utc_now
from der_sdk.programs import (
    ProgramContext,
    ProgramDispatch,
    ProgramRefusedError,
    program_source_name,
)
from der_sdk.storage.contract import StorageBackend
from der_sdk_headend.audit import Actor, Auditor
from der_sdk_headend.dispatch import (
    CancelConflictError,
    Dispatcher,
    InvalidDispatchError,
    UnknownTargetError,
)
from der_sdk_headend.dispatch.lifecycle import is_open, window
from der_sdk_headend.programs.precedence import (
    control_fingerprint,
    manual_hold,
    program_window,
    to_request,
)

__all__ = ["HOLD_LOOKBACK", "REMEMBERED_CONTROLS", "HeadendProgramContext"]

REMEMBERED_CONTROLS = 10_000
"""How many controls a program's context remembers (their dispatch and fingerprint) for
idempotency; the oldest are forgotten first (a control re-sent after that, unchanged,
makes a new dispatch only if the old one is no longer open: open ones are always known)."""
HOLD_LOOKBACK = 100
"""How many of an asset's newest dispatches are looked at for a manual hold (open ones
are always looked at)."""


class HeadendProgramContext(ProgramContext):
    """The :class:`~der_sdk.programs.ProgramContext` the headend gives a program.

    :param health: called with ``(ok, detail)`` by :meth:`report_health`.
    """

    def __init__(
        self,
        config: ProgramConfig,
        *,
        sites: Sequence[Site],
        assets: Sequence[Asset],
        dispatcher: Dispatcher,
        storage: StorageBackend,
        auditor: Auditor,
        latest: Callable[[str], TelemetrySample | None],
        health: Callable[[bool, str], None],
    ) -> None:
        self.program = config.name
        self.sites = tuple(sites)
        self.assets = tuple(assets)
        self.log = logging.getLogger(f"der.headend.programs.{config.name}")
        self.source = program_source_name(config.name)
        self._config = config
        self._dispatcher = dispatcher
        self._storage = storage
        self._auditor = auditor
        self._latest = latest
        self._health = health
        self._actor = Actor(kind="program", name=config.name)
        self._asset_ids = {a.asset_id for a in self.assets}
        self._site_ids = {s.site_id for s in self.sites}
        self._lock = asyncio.Lock()
        self._by_external: dict[str, tuple[str, str | None]] = {}
        """external id → (dispatch id, fingerprint of the control) of its latest dispatch."""
        self._held: dict[str, tuple[str, str]] = {}
        """external id → (fingerprint, why) of a control held back, not audited again."""
        for dispatch in dispatcher.open_dispatches():
            if dispatch.source == self.source and dispatch.external_id is not None:
                self._by_external[dispatch.external_id] = (
                    dispatch.dispatch_id,
                    dispatch.request_fingerprint,
                )

    # ------------------------------------------------------------------ schedule

    async def schedule(self, request: ProgramDispatch) -> Dispatch:
        async with self._lock:
            return await self._schedule(request)

    async def _schedule(self, request: ProgramDispatch) -> Dispatch:
        fingerprint = control_fingerprint(request)
        known = self._by_external.get(request.external_id)
        if known is not None and known[1] == fingerprint:
            record = await self._record_of(known[0])
            if record is not None:
                return record
        held = self._held.get(request.external_id)
        if held is not None and held[0] == fingerprint:
            raise ProgramRefusedError("held", held[1])
        try:
            assets = self._targets_of(request)
            now = utc_now()
            dispatch_request = to_request(request, now)
            start, end = program_window(request, now)
            hold = manual_hold(
                await self._hold_candidates(assets), assets, max(start, now), end, now
            )
            if hold is not None:
                why = (
                    f"held back: manual dispatch {hold.dispatch_id} ({hold.source}) holds "
                    f"{_assets_named(hold, assets)} until {_end_of(hold)}; manual wins for "
                    "its duration"
                )
                self._held[request.external_id] = (fingerprint, why)
                while len(self._held) > REMEMBERED_CONTROLS:
                    del self._held[next(iter(self._held))]
                raise ProgramRefusedError("held", why, held_by=hold.dispatch_id)
        except ProgramRefusedError as exc:
            await self._audit_create(request, "refused" if exc.kind != "held" else "held", str(exc))
            raise
        self._held.pop(request.external_id, None)
        if known is not None:
            await self._replace(known[0], request.external_id)
        try:
            dispatch, _ = await self._dispatcher.submit(
                dispatch_request,
                source=self.source,
                external_id=request.external_id,
                fingerprint=fingerprint,
            )
        except (InvalidDispatchError, UnknownTargetError) as exc:
            await self._audit_create(request, "refused", str(exc))
            raise ProgramRefusedError("invalid", str(exc)) from None
        self._remember(request.external_id, dispatch.dispatch_id, fingerprint)
        await self._audit_create(request, "ok", dispatch.state, dispatch=dispatch)
        return dispatch

    def _remember(self, external_id: str, dispatch_id: str, fingerprint: str) -> None:
        self._by_external.pop(external_id, None)  # the newest last
        self._by_external[external_id] = (dispatch_id, fingerprint)
        if len(self._by_external) <= REMEMBERED_CONTROLS:
            return
        open_ids = {d.dispatch_id for d in self._dispatcher.open_dispatches()}
        for old in list(self._by_external):
            if len(self._by_external) <= REMEMBERED_CONTROLS:
                break
            if self._by_external[old][0] not in open_ids:
                del self._by_external[old]

    def _targets_of(self, request: ProgramDispatch) -> set[str]:
        """The assets ``request`` may reach; refused when outside the program's scope."""
        if request.asset_id is not None:
            asset = next((a for a in self.assets if a.asset_id == request.asset_id.lower()), None)
            if asset is None:
                raise ProgramRefusedError(
                    "out_of_scope",
                    f"asset {request.asset_id} is not in the scope of program {self.program}",
                )
            return {asset.asset_id}
        if request.site_id is None:
            raise ProgramRefusedError("invalid", "the control names neither asset_id nor site_id")
        site_id = request.site_id.lower()
        if site_id not in self._site_ids:
            raise ProgramRefusedError(
                "out_of_scope",
                f"site {request.site_id} is not in the scope of program {self.program} "
                "(list it under the program's sites)",
            )
        return {a.asset_id for a in self.assets if a.site_id == site_id}

    async def _hold_candidates(self, assets: set[str]) -> list[Dispatch]:
        """Dispatches that may hold ``assets``: the open ones, and each asset's newest."""
        found = {d.dispatch_id: d for d in self._dispatcher.open_dispatches()}
        for asset_id in sorted(assets):
            for dispatch in await self._storage.dispatch_history(
                asset_id=asset_id, limit=HOLD_LOOKBACK
            ):
                found.setdefault(dispatch.dispatch_id, dispatch)
        return list(found.values())

    async def _replace(self, dispatch_id: str, external_id: str) -> None:
        """Stop the dispatch of a control that changed upstream, before its new one."""
        record = await self._record_of(dispatch_id)
        if record is None or not is_open(record):
            return
        await self._cancel(record, f"control {external_id} changed upstream; replaced")

    # ------------------------------------------------------------------ cancel

    async def cancel(self, external_id: str, reason: str) -> Dispatch | None:
        async with self._lock:
            self._held.pop(external_id, None)
            known = self._by_external.get(external_id)
            if known is None:
                return None
            record = await self._record_of(known[0])
            if record is None or not is_open(record):
                return None
            return await self._cancel(record, reason)

    async def _cancel(self, record: Dispatch, reason: str) -> Dispatch:
        by = f"program {self.program}: {reason}"
        try:
            cancelled = await self._dispatcher.cancel(record.dispatch_id, by=by)
        except CancelConflictError as exc:
            await self._audit_cancel(record, "refused", str(exc))
            return record
        result = cancelled if cancelled is not None else record
        await self._audit_cancel(result, "ok", reason)
        return result

    # ------------------------------------------------------------------ reads

    async def open_dispatches(self) -> list[Dispatch]:
        return [d for d in self._dispatcher.open_dispatches() if d.source == self.source]

    async def latest(self, asset_id: str) -> TelemetrySample | None:
        if asset_id.lower() not in self._asset_ids:
            return None
        return self._latest(asset_id.lower())

    def report_health(self, ok: bool, detail: str) -> None:
        self._health(ok, detail)

    async def _record_of(self, dispatch_id: str) -> Dispatch | None:
        for dispatch in self._dispatcher.open_dispatches():
            if dispatch.dispatch_id == dispatch_id:
                return dispatch
        return await self._storage.get_dispatch(dispatch_id)

    # ------------------------------------------------------------------ audit

    async def _audit_create(
        self,
        request: ProgramDispatch,
        outcome: str,
        detail: str,
        *,
        dispatch: Dispatch | None = None,
    ) -> None:
        target: dict[str, Any] = (
            {"asset_id": request.asset_id} if request.asset_id else {"site_id": request.site_id}
        )
        what = f"control {request.external_id}"
        if dispatch is not None:
            message = (
                f"dispatch {dispatch.dispatch_id} for {what} created by program "
                f"{self.program}: {detail}"
            )
        else:
            message = f"{what} of program {self.program} {outcome}: {detail}"
        await self._auditor.record(
            "dispatch.create",
            actor=self._actor,
            source=self.source,
            outcome=outcome,
            message=message,
            dispatch_id=dispatch.dispatch_id if dispatch is not None else None,
            external_id=request.external_id,
            mw=request.mw,
            start_at=request.start_at.isoformat() if request.start_at is not None else None,
            reason=None if dispatch is not None else detail,
            via=self.source,
            **target,
        )

    async def _audit_cancel(self, record: Dispatch, outcome: str, detail: str) -> None:
        await self._auditor.record(
            "dispatch.cancel",
            actor=self._actor,
            source=self.source,
            outcome=outcome,
            message=f"dispatch {record.dispatch_id} (control {record.external_id}) cancel "
            f"{'requested' if outcome == 'ok' else 'refused'} by program {self.program}: "
            f"{detail}",
            dispatch_id=record.dispatch_id,
            external_id=record.external_id,
            state=record.state,
            asset_id=record.asset_id,
            site_id=record.site_id if record.asset_id is None else None,
            reason=detail,
            via=self.source,
        )


def _assets_named(hold: Dispatch, assets: set[str]) -> str:
    held = sorted(t.asset_id for t in hold.targets if t.asset_id in assets)
    return f"asset{'s' if len(held) > 1 else ''} {', '.join(held)}"


def _end_of(hold: Dispatch) -> str:
    end = window(hold)[1]
    return end.isoformat() if end is not None else "it is replaced"
