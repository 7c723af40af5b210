"""The OpenADR 2.0b VEN: an openleadr client run as a der-sdk program source.

``run()`` registers with the VTN (oadrQueryRegistration, oadrCreatePartyRegistration),
registers the telemetry report (one ``TELEMETRY_USAGE`` data point per site: its MW from
the latest telemetry), syncs the events, then polls every ``poll_interval_s``. The VTN's
answer to each poll is the health the headend shows: no answer (refused, timed out,
invalid) is a lost server, reported until an answer comes back; after a failed
registration it tries again every poll interval. The schedules the headend already has
keep running meanwhile.

Each event (new or modified) is planned by :func:`~der_sdk_openadr.mapping.plan_event`
and its site dispatches scheduled; the VEN answers **optIn** when the headend made them
all, **optOut** when one was refused (an operator's manual dispatch holds a site's
asset, or the MW is beyond the site's limits with ``over_limits: opt_out``) and then
cancels the others. A cancelled event cancels its dispatches. When a dispatch the VEN
opted in for is later superseded (an operator's manual dispatch), rejected or failed at
the agent, the VEN sends oadrCreatedEvent again with **optOut** for that event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from openleadr import OpenADRClient, enums, utils

from der_sdk.models import Dispatch
from der_sdk.programs import ProgramContext, ProgramRefusedError, ProgramSource
from der_sdk_openadr.mapping import OpenAdrOptions, event_id_of, plan_event

__all__ = ["OPT_IN", "OPT_OUT", "OpenAdrVen"]

OPT_IN = "optIn"
OPT_OUT = "optOut"
_NOT_REGISTERED = frozenset({452, 463})
"""OpenADR error codes that say the VTN does not know this VEN (invalid id, not
registered): it registers again."""
_GAVE_UP = frozenset({"superseded", "rejected", "failed", "expired"})
"""Final states of a dispatch the VEN opted in for that make it opt out afterwards."""

# openleadr logs every poll and event at INFO; keep ours and its warnings
logging.getLogger("openleadr").setLevel(logging.WARNING)


class OpenAdrVen(ProgramSource):
    """One VEN for one program (module docstring)."""

    def __init__(self, ctx: ProgramContext, options: OpenAdrOptions) -> None:
        self.ctx = ctx
        self.options = options
        self.client = OpenADRClient(
            ven_name=options.ven_name,
            vtn_url=options.vtn_url,
            ven_id=options.ven_id,
            cert=options.cert,
            key=options.key,
            passphrase=options.passphrase,
            ca_file=options.ca_file,
            vtn_fingerprint=options.vtn_fingerprint,
            check_hostname=options.check_hostname,
            show_fingerprint=False,
        )
        self.client.add_handler("on_event", self._on_event)
        self.client.add_handler("on_update_event", self._on_event)
        self.client.add_hook("after_parse_xml", self._heard)
        sites = {s.site_id for s in ctx.sites} | {a.site_id for a in ctx.assets}
        for site_id in sorted(sites):
            self.client.add_report(
                callback=functools.partial(self._site_mw, site_id),
                resource_id=site_id,
                measurement="REAL_POWER",
                unit="W",
                scale="M",
                report_specifier_id=f"der-sdk-{ctx.program}-telemetry",
                r_id=f"{site_id}/mw",
                report_duration=timedelta(hours=1),
                sampling_rate=timedelta(seconds=options.report_interval_s),
            )
        self._closed = asyncio.Event()
        self._last_heard = 0.0
        self._events: dict[str, int] = {}  # event id → modification number answered
        self._opted_out: set[str] = set()  # event ids the VEN opted out of
        self._cancelling: set[str] = set()  # external ids the VEN cancels itself
        self._registered = False

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        try:
            while not self._closed.is_set():
                if not self._registered:
                    self._registered = await self._register()
                    if not self._registered:
                        self.ctx.report_health(
                            False, f"{self.options.vtn_url}: registration got no answer"
                        )
                        await self._pause()
                        continue
                    self.ctx.report_health(
                        True,
                        f"registered with {self.options.vtn_url} as VEN {self.client.ven_id}",
                    )
                heard = self._last_heard
                await self.client._poll()
                if not self._registered:
                    self.ctx.report_health(False, f"{self.options.vtn_url}: not registered")
                    continue
                if self._last_heard == heard:
                    self.ctx.report_health(False, f"{self.options.vtn_url}: no answer to oadrPoll")
                else:
                    self.ctx.report_health(True, f"polling {self.options.vtn_url}")
                await self._pause()
        finally:
            await self._stop_client()

    async def _register(self) -> bool:
        """Register with the VTN and its reports, sync events (openleadr's ``run()``
        without its own polling job); ``False`` when the VTN gave no registration."""
        client = self.client
        _, answer = await client.query_registration()
        if answer and "registration_id" in answer:
            client.registration_id = answer["registration_id"]
        request_id = (answer or {}).get("response", {}).get("request_id")
        await client.create_party_registration(ven_id=client.ven_id, request_id=request_id)
        if not client.registration_id:
            return False
        await client.register_reports(client.reports)
        if client.reports and client.report_queue_task is None:
            client.report_queue_task = asyncio.create_task(
                client._report_queue_worker(), name=f"openadr-{self.ctx.program}-reports"
            )
        if not client.scheduler.running:  # runs the report sampling jobs
            client.scheduler.start()
        await client.sync_events()
        return True

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.poll_interval_s):
                await self._closed.wait()

    def _heard(self, message_type: str, payload: Mapping[str, Any]) -> None:
        """openleadr's ``after_parse_xml`` hook: the VTN answered with a message that
        passed the schema (and, with ``vtn_fingerprint``, the signature check). An
        answer with an OpenADR error code counts as none; one saying this VEN is not
        registered (452 invalid id, 463 not registered) makes it register again."""
        response = payload.get("response") if isinstance(payload, Mapping) else None
        code = int(response.get("response_code", 200)) if isinstance(response, Mapping) else 200
        if code == 200:
            self._last_heard = time.monotonic()
            return
        self.ctx.log.warning(
            "the VTN answered %s with OpenADR error %s: %s",
            message_type,
            code,
            response.get("response_description") if isinstance(response, Mapping) else "",
        )
        if code in _NOT_REGISTERED:
            self._registered = False

    async def _stop_client(self) -> None:
        client = self.client
        if client.scheduler.running:
            client.scheduler.shutdown(wait=False)
        if client.report_queue_task is not None:
            client.report_queue_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await client.report_queue_task
            client.report_queue_task = None
        if client.client_session is not None:
            await client.client_session.close()
            client.client_session = None

    async def close(self) -> None:
        self._closed.set()

    # ------------------------------------------------------------------ events

    async def _on_event(self, event: Mapping[str, Any]) -> str:
        """openleadr's ``on_event`` and ``on_update_event``: plan, schedule, opt."""
        plan = plan_event(event, self.options, self.ctx.sites, self.ctx.assets)
        self._events[plan.event_id] = plan.modification_number
        if plan.status == enums.EVENT_STATUS.CANCELLED:
            await self._cancel_event(plan.event_id, "event cancelled by the VTN")
            return OPT_IN
        if plan.status == enums.EVENT_STATUS.COMPLETED:
            return OPT_IN  # over: nothing to run (openleadr sends no response for it)
        if plan.ignored is not None:
            self.ctx.log.info("OpenADR event %s: opted out: %s", plan.event_id, plan.ignored)
            return self._opt_out(plan.event_id)
        for note in plan.clamped:
            self.ctx.log.info("OpenADR event %s: %s", plan.event_id, note)
        refusals: list[str] = []
        for control in plan.controls:
            try:
                await self.ctx.schedule(control)
            except ProgramRefusedError as exc:
                refusals.append(f"site {control.site_id}: {exc}")
        if refusals:
            await self._cancel_event(plan.event_id, "opted out of the event")
            self.ctx.log.warning(
                "OpenADR event %s: opted out: %s", plan.event_id, "; ".join(refusals)
            )
            return self._opt_out(plan.event_id)
        self._opted_out.discard(plan.event_id)
        self.ctx.log.info(
            "OpenADR event %s (modification %d): opted in, %d site dispatch(es)",
            plan.event_id,
            plan.modification_number,
            len(plan.controls),
        )
        return OPT_IN

    def _opt_out(self, event_id: str) -> str:
        self._opted_out.add(event_id)
        return OPT_OUT

    async def _cancel_event(self, event_id: str, reason: str) -> None:
        for dispatch in await self.ctx.open_dispatches():
            external_id = dispatch.external_id
            if external_id is not None and event_id_of(external_id) == event_id:
                self._cancelling.add(external_id)
                await self.ctx.cancel(external_id, reason)

    # ------------------------------------------------------------------ lifecycle

    async def dispatch_changed(self, dispatch: Dispatch) -> None:
        external_id = dispatch.external_id
        if external_id is None:
            return
        event_id = event_id_of(external_id)
        states = {dispatch.state, *(t.state for t in dispatch.targets)}
        gave_up = bool(states & _GAVE_UP) or (
            "cancelled" in states and external_id not in self._cancelling
        )
        if not gave_up or event_id in self._opted_out:
            return
        self._opted_out.add(event_id)
        why = ", ".join(
            f"{t.asset_id} {t.state}" for t in dispatch.targets if t.state in _GAVE_UP
        ) or str(dispatch.state)
        if dispatch.superseded_by:
            why += f" (by dispatch {dispatch.superseded_by})"
        self.ctx.log.warning(
            "OpenADR event %s: dispatch %s %s; opting out", event_id, dispatch.dispatch_id, why
        )
        await self.client.created_event(
            request_id=utils.generate_id(),
            event_id=event_id,
            opt_type=OPT_OUT,
            modification_number=self._events.get(event_id, 0),
        )

    # ------------------------------------------------------------------ reports

    async def _site_mw(self, site_id: str) -> float:
        """The site's MW now: the sum of its assets' latest samples (telemetry report)."""
        total = 0.0
        for asset in self.ctx.assets:
            if asset.site_id == site_id:
                sample = await self.ctx.latest(asset.asset_id)
                if sample is not None:
                    total += sample.mw
        return round(total, 6)
