"""The ``ieee2030.5`` program source: an IEEE 2030.5 / CSIP aggregator client.

Each poll walks the server as the standard lays it out: DeviceCapability → EndDeviceList
(registering a configured end device the server does not list) → each EndDevice's
FunctionSetAssignments → DERProgramLists (also one linked from the DeviceCapability itself,
as FunctionSetAssignmentsBase allows) → each DERProgram's DERControlList and
DefaultDERControl. The open controls of each end device are resolved by precedence
(:func:`~der_sdk_ieee2030_5.controls.resolve`) and each window where a control wins
becomes one scheduled dispatch of the end device's site or asset. Responses go to each
control's ``replyTo``; real power is mirrored to a MirrorUsagePoint per end device.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from envoy_schema.server.schema.sep2.der import (
    DefaultDERControl,
    DERControlListResponse,
    DERProgramListResponse,
    DERProgramResponse,
)
from envoy_schema.server.schema.sep2.device_capability import DeviceCapabilityResponse
from envoy_schema.server.schema.sep2.end_device import (
    EndDeviceListResponse,
    EndDeviceRequest,
    EndDeviceResponse,
)
from envoy_schema.server.schema.sep2.event import EventStatusType
from envoy_schema.server.schema.sep2.function_set_assignments import (
    FunctionSetAssignmentsListResponse,
)
from envoy_schema.server.schema.sep2.metering import Reading, ReadingType
from envoy_schema.server.schema.sep2.metering_mirror import (
    MirrorMeterReadingRequest,
    MirrorUsagePointRequest,
)
from envoy_schema.server.schema.sep2.response import Response, ResponseType
from envoy_schema.server.schema.sep2.types import (
    AccumulationBehaviourType,
    CommodityType,
    DataQualifierType,
    DateTimeIntervalType,
    FlowDirectionType,
    KindType,
    ServiceKind,
    UomType,
)

from der_sdk.errors import DerSdkError
from der_sdk.models import Asset, Dispatch
from der_sdk.programs import ProgramContext, ProgramDispatch, ProgramRefusedError, ProgramSource
from der_sdk_ieee2030_5.controls import Control, Mapped, map_control, resolve
from der_sdk_ieee2030_5.http import Sep2Client, Sep2Error, build_ssl_context
from der_sdk_ieee2030_5.identity import certificate_lfdi, sfdi_of_lfdi
from der_sdk_ieee2030_5.options import EndDeviceOptions, Ieee20305Options

__all__ = ["Ieee20305Source", "external_id", "parse_external_id"]

STARTED_STATES = frozenset({"active", "applied"})
REFUSED_STATES: dict[str, ResponseType] = {
    "rejected": ResponseType.REJECTED_INVALID_EVENT,
    "failed": ResponseType.REJECTED_INVALID_EVENT,
    "expired": ResponseType.REJECTED_EVENT_RECEIVED_LATE,
}
MIRROR_ROLE_DER = "49"  # isMirror | isDER | isSubmeter: one asset
MIRROR_ROLE_SITE = "03"  # isMirror | isPremisesAggregationPoint: a site


def external_id(lfdi: str, mrid: str, part: int) -> str:
    """The dispatch's ``external_id``: ``<LFDI>/<DERControl mRID>``, ``#<n>`` for the
    n-th later window of a control interrupted by one of higher precedence."""
    return f"{lfdi}/{mrid}" + (f"#{part}" if part else "")


def parse_external_id(value: str) -> tuple[str, str, int] | None:
    """``(lfdi, mrid, part)`` of an :func:`external_id`, or ``None``."""
    lfdi, sep, rest = value.partition("/")
    if not sep:
        return None
    mrid, _, part = rest.partition("#")
    return lfdi, mrid, int(part) if part.isdigit() else 0


@dataclass
class EndDevice:
    """One configured end device and what the server said about it."""

    options: EndDeviceOptions
    lfdi: str
    sfdi: int
    assets: list[Asset]
    href: str | None = None
    mirror_href: str | None = None
    controls: dict[str, Control] = field(default_factory=dict)
    """The controls last read, by mRID."""
    last_part: dict[str, int] = field(default_factory=dict)
    """The index of each control's last window, by mRID."""


class Ieee20305Source(ProgramSource):
    """See the module. ``clock`` gives the server's time in seconds (tests move it)."""

    def __init__(
        self,
        context: ProgramContext,
        options: Ieee20305Options,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = context
        self.options = options
        self.clock = clock
        self._closed = asyncio.Event()
        self._client: Sep2Client | None = None
        self._devices: list[EndDevice] = []
        self._posted: set[tuple[str, str, int]] = set()
        self._made: set[str] = set()
        """Ids of the dispatches this source made (supersede among them is internal)."""
        self._cancelling: set[str] = set()
        """Ids of the dispatches this source cancelled, or had replaced (their control
        changed): their ``cancelled`` is not an operator's opt-out."""
        self._requested: dict[str, tuple[ProgramDispatch, str]] = {}
        """The last request for each external id, and the dispatch it made."""
        self._poll_s = options.poll_interval_s
        self._post_s = options.mirror_interval_s
        self._mirror_failed = False
        self._unreachable = False

    # ------------------------------------------------------------------ life

    async def run(self) -> None:
        try:
            self._client = await self._connect()
            self._devices = await asyncio.to_thread(self._configured_devices)
        except DerSdkError as exc:
            self.ctx.report_health(False, str(exc))
            await self._closed.wait()
            return
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._every(lambda: self._poll_s, self.poll_once))
                tasks.create_task(self._every(lambda: self._post_s, self.mirror_once))
        finally:
            await self._client.aclose()

    async def close(self) -> None:
        self._closed.set()

    async def _every(
        self, interval: Callable[[], float], step: Callable[[], Awaitable[None]]
    ) -> None:
        while not self._closed.is_set():
            await step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), interval())

    async def _connect(self) -> Sep2Client:
        opts = self.options
        if opts.server_url.startswith("https:"):
            try:
                context = await asyncio.to_thread(build_ssl_context, opts.cert, opts.key, opts.ca)
            except (OSError, ValueError) as exc:
                raise DerSdkError(
                    f"cannot load the TLS files (cert {opts.cert}, key {opts.key}, ca {opts.ca}):"
                    f" {exc}"
                ) from None
            return Sep2Client(opts.server_url, verify=context, timeout_s=opts.timeout_s)
        return Sep2Client(opts.server_url, verify=False, timeout_s=opts.timeout_s)

    def _configured_devices(self) -> list[EndDevice]:
        """The end devices with their LFDI, SFDI and assets (reads the certificate)."""
        scope = {a.asset_id: a for a in self.ctx.assets}
        devices = []
        for opts in self.options.end_devices:
            lfdi = opts.lfdi
            if lfdi is None:
                assert self.options.cert is not None  # the options checked it
                lfdi = certificate_lfdi(Path(self.options.cert))
            if opts.asset_id is not None:
                assets = [scope[opts.asset_id]] if opts.asset_id in scope else []
            else:
                assets = [a for a in scope.values() if a.site_id == opts.site_id]
            if not assets:
                raise DerSdkError(
                    f"end device {lfdi}: {opts.target} is not in program {self.ctx.program}'s scope"
                )
            devices.append(EndDevice(opts, lfdi, opts.sfdi or sfdi_of_lfdi(lfdi), assets))
        return devices

    # ------------------------------------------------------------------ poll

    async def poll_once(self) -> None:
        """Read the server once and bring the dispatches in line; report health."""
        assert self._client is not None
        try:
            await self._poll(self._client)
        except Sep2Error as exc:
            self.ctx.log.warning("program %s: %s", self.ctx.program, exc)
            self._unreachable = exc.unreachable
            self.ctx.report_health(
                False, f"{exc}; the dispatches already made keep running on schedule"
            )
        else:
            self._unreachable = False
            self.ctx.report_health(True, f"polled {self.options.server_url}")

    async def _poll(self, client: Sep2Client) -> None:
        dcap = await client.get(self.options.server_url, DeviceCapabilityResponse)
        rates = [dcap.pollRate or 0]
        if dcap.EndDeviceListLink is None:
            raise Sep2Error(f"{client.base_url}: the DeviceCapability has no EndDeviceListLink")
        end_devices = await self._end_devices(client, dcap.EndDeviceListLink.href)
        shared = [dcap.DERProgramListLink.href] if dcap.DERProgramListLink else []
        for device in self._devices:
            end_device = end_devices[device.lfdi]
            lists = list(shared)
            if end_device.FunctionSetAssignmentsListLink is not None:
                _, fsas = await client.get_all(
                    end_device.FunctionSetAssignmentsListLink.href,
                    FunctionSetAssignmentsListResponse,
                    lambda page: page.FunctionSetAssignments,
                )
                lists += [f.DERProgramListLink.href for f in fsas if f.DERProgramListLink]
            controls: dict[str, Control] = {}
            for href in dict.fromkeys(lists):
                first, programs = await client.get_all(
                    href, DERProgramListResponse, lambda page: page.DERProgram
                )
                rates.append(first.pollRate or 0)
                for program in programs:
                    for control in await self._program_controls(client, program):
                        controls.setdefault(control.mrid, control)
            await self._apply(device, controls)
            if device.mirror_href is None and dcap.MirrorUsagePointListLink is not None:
                await self._create_mirror(client, device, dcap.MirrorUsagePointListLink.href)
        self._poll_s = max(self.options.poll_interval_s, *rates)

    async def _end_devices(
        self, client: Sep2Client, list_href: str
    ) -> dict[str, EndDeviceResponse]:
        """Each configured end device as the server has it, by LFDI; a configured one the
        server does not list is registered (POST to the EndDeviceList) and read back.

        The list's items are used as they are (they are whole EndDevices): some servers
        answer the list but not a GET of one of its EndDevices.
        """
        _, listed = await client.get_all(
            list_href, EndDeviceListResponse, lambda page: page.EndDevice
        )
        by_lfdi = {(e.lFDI or "").upper(): e for e in listed}
        by_sfdi = {e.sFDI: e for e in listed}
        found: dict[str, EndDeviceResponse] = {}
        for device in self._devices:
            server_side = by_lfdi.get(device.lfdi) or by_sfdi.get(device.sfdi)
            if server_side is None:
                server_side = await self._register(client, list_href, device)
            device.href = client.url(server_side.href or list_href)
            found[device.lfdi] = server_side
        return found

    async def _register(
        self, client: Sep2Client, list_href: str, device: EndDevice
    ) -> EndDeviceResponse:
        if not device.options.register:
            raise Sep2Error(
                f"{client.url(list_href)} does not list end device {device.lfdi}"
                f" ({device.options.target}) and register is off"
            )
        request = EndDeviceRequest(
            lFDI=device.lfdi, sFDI=device.sfdi, changedTime=int(self.clock()), enabled=True
        )
        location = await client.post(list_href, request)
        if location is None:
            raise Sep2Error(f"POST {client.url(list_href)}: registered, but no Location")
        self.ctx.log.info(
            "program %s: registered end device %s (%s) at %s",
            self.ctx.program,
            device.lfdi,
            device.options.target,
            location,
        )
        return await client.get(location, EndDeviceResponse)

    async def _program_controls(
        self, client: Sep2Client, program: DERProgramResponse
    ) -> list[Control]:
        if program.DefaultDERControlLink is not None:
            # Read so that a broken link shows in the log; between controls the asset
            # returns to the headend's default (docs/programs.md, "not mapped").
            with contextlib.suppress(Sep2Error):
                await client.get(program.DefaultDERControlLink.href, DefaultDERControl)
        if program.DERControlListLink is None:
            return []
        _, items = await client.get_all(
            program.DERControlListLink.href, DERControlListResponse, lambda page: page.DERControl
        )
        return [
            Control(
                mrid=item.mRID.upper(),
                program_mrid=program.mRID,
                primacy=program.primacy,
                creation_time=item.creationTime,
                start=item.interval.start,
                duration=item.interval.duration,
                status=item.EventStatus_.currentStatus,
                base=item.DERControlBase_,
                href=item.href,
                reply_to=item.replyTo,
                response_required=int(item.responseRequired or "0", 16),
                description=item.description or program.description,
            )
            for item in items
        ]

    # ------------------------------------------------------------------ controls

    async def _apply(self, device: EndDevice, controls: dict[str, Control]) -> None:
        now = int(self.clock())
        previous, device.controls = device.controls, controls
        mapped: list[tuple[Control, Mapped]] = []
        for control in controls.values():
            if control.end <= now and control.mrid not in previous:
                continue  # long over: nothing to do or say
            await self._respond(device, control, ResponseType.EVENT_RECEIVED)
            if control.status == EventStatusType.Cancelled or (
                control.status == EventStatusType.CancelledWithRandomization
            ):
                await self._stop(device, control, ResponseType.EVENT_CANCELLED, "cancelled")
                continue
            if control.status == EventStatusType.Superseded:
                await self._stop(device, control, ResponseType.EVENT_SUPERSEDED, "superseded")
                continue
            result = map_control(control.base, device.assets)
            if isinstance(result, Mapped):
                mapped.append((control, result))
            elif control.end > now:
                self.ctx.log.info(
                    "program %s: DERControl %s not mapped: %s",
                    self.ctx.program,
                    control.mrid,
                    result.reason,
                )
                await self._respond(
                    device, control, ResponseType.REJECTED_CONTROL_PARAM_NOT_APPLICABLE
                )
        for mrid, control in previous.items():
            if mrid not in controls:
                await self._stop(device, control, ResponseType.EVENT_CANCELLED, "removed")
        resolution = resolve([c for c, _ in mapped], now)
        wanted: set[str] = set()
        for control, result in mapped:
            if control.mrid in resolution.superseded_by:
                winner = controls.get(resolution.superseded_by[control.mrid], control)
                code = (
                    ResponseType.EVENT_SUPERSEDED
                    if winner.program_mrid == control.program_mrid
                    else ResponseType.EVENT_ABORTED_DUE_TO_ALTERNATE_PROGRAM_EVENT
                )
                await self._stop(device, control, code, f"superseded by DERControl {winner.mrid}")
                continue
            windows = resolution.windows.get(control.mrid, [])
            device.last_part[control.mrid] = len(windows) - 1
            for part, (start, end) in enumerate(windows):
                key = external_id(device.lfdi, control.mrid, part)
                wanted.add(key)
                await self._schedule(device, control, result, key, start, end)
        await self._drop_unwanted(device, wanted, now)

    async def _schedule(
        self, device: EndDevice, control: Control, result: Mapped, key: str, start: int, end: int
    ) -> None:
        request = ProgramDispatch(
            external_id=key,
            mw=result.mw,
            start_at=datetime.fromtimestamp(start, UTC),
            duration_s=float(end - start),
            reason=f"IEEE 2030.5 DERControl {control.mrid} ({result.via}"
            + (f", {control.description}" if control.description else "")
            + ")",
            asset_id=device.options.asset_id,
            site_id=device.options.site_id,
        )
        before = self._requested.get(key)
        if before is not None and before[0] != request:
            self._cancelling.add(before[1])  # the headend replaces it
        try:
            dispatch = await self.ctx.schedule(request)
        except ProgramRefusedError as exc:
            self.ctx.log.warning("program %s: %s: %s", self.ctx.program, key, exc)
            code = (
                ResponseType.USER_CHOSE_OPT_OUT
                if exc.kind == "held"
                else ResponseType.REJECTED_INVALID_EVENT
            )
            await self._respond(device, control, code)
            return
        self._made.add(dispatch.dispatch_id)
        self._requested[key] = (request, dispatch.dispatch_id)

    async def _drop_unwanted(self, device: EndDevice, wanted: set[str], now: int) -> None:
        """Cancel this device's open dispatches that no longer stand for a window."""
        for dispatch in await self.ctx.open_dispatches():
            key = dispatch.external_id or ""
            parsed = parse_external_id(key)
            if parsed is None or parsed[0] != device.lfdi or key in wanted:
                continue
            ends = _end_of(dispatch)
            if ends is not None and ends <= now:
                continue  # finishing on its own
            self._cancelling.add(dispatch.dispatch_id)
            await self.ctx.cancel(key, "no longer in force on the IEEE 2030.5 server")

    async def _stop(
        self, device: EndDevice, control: Control, code: ResponseType, why: str
    ) -> None:
        """Cancel every window of ``control`` still open, and say ``code`` once."""
        stopped = False
        for dispatch in await self.ctx.open_dispatches():
            parsed = parse_external_id(dispatch.external_id or "")
            if parsed is not None and parsed[:2] == (device.lfdi, control.mrid):
                assert dispatch.external_id is not None
                self._cancelling.add(dispatch.dispatch_id)
                await self.ctx.cancel(
                    dispatch.external_id, f"IEEE 2030.5 DERControl {control.mrid} {why}"
                )
                stopped = True
        if stopped or control.end > int(self.clock()):
            await self._respond(device, control, code)

    # ------------------------------------------------------------------ lifecycle

    async def dispatch_changed(self, dispatch: Dispatch) -> None:
        parsed = parse_external_id(dispatch.external_id or "")
        if parsed is None:
            return
        lfdi, mrid, part = parsed
        device = next((d for d in self._devices if d.lfdi == lfdi), None)
        control = device.controls.get(mrid) if device else None
        if device is None or control is None:
            return  # from before a restart: the next poll reads the control again
        code = self.response_for(dispatch, last=part == device.last_part.get(mrid, 0))
        if code is not None:
            await self._respond(device, control, code)

    def response_for(self, dispatch: Dispatch, *, last: bool) -> ResponseType | None:
        """The Response a change of ``dispatch`` calls for (``None``: nothing to say).

        Started when a window runs; completed when the control's last window completes;
        opted out when an operator took the asset (a manual dispatch superseded it, or
        a cancel this source did not make); refused states as "cannot comply".
        """
        if dispatch.state in STARTED_STATES:
            return ResponseType.EVENT_STARTED
        if dispatch.state == "completed":
            return ResponseType.EVENT_COMPLETED if last else None
        if dispatch.state == "superseded":
            if dispatch.superseded_by in self._made:
                return None
            return ResponseType.USER_CHOSE_OPT_OUT
        if dispatch.state == "cancelled":
            if dispatch.dispatch_id in self._cancelling:
                return None
            return ResponseType.USER_CHOSE_OPT_OUT
        return REFUSED_STATES.get(dispatch.state)

    async def _respond(self, device: EndDevice, control: Control, code: ResponseType) -> None:
        """POST a Response to the control's ``replyTo``, once per status."""
        if control.reply_to is None or control.response_required == 0:
            return
        seen = (device.lfdi, control.mrid, int(code))
        if seen in self._posted:
            return
        self._posted.add(seen)
        assert self._client is not None
        response = Response(
            createdDateTime=int(self.clock()),
            endDeviceLFDI=device.lfdi,
            status=code,
            subject=control.mrid,
        )
        try:
            await self._client.post(control.reply_to, response)
        except Sep2Error as exc:
            self._posted.discard(seen)  # said again on the next change or poll
            self.ctx.log.warning("program %s: response %s: %s", self.ctx.program, code.name, exc)

    # ------------------------------------------------------------------ mirror

    async def _create_mirror(self, client: Sep2Client, device: EndDevice, href: str) -> None:
        """POST the end device's MirrorUsagePoint; a server that refuses it costs the
        mirrored readings only (logged once, tried again each poll), not the controls."""
        try:
            device.mirror_href = await client.post(href, self._mirror_usage_point(device))
        except Sep2Error as exc:
            if not self._mirror_failed:
                self.ctx.log.warning("program %s: mirror: %s", self.ctx.program, exc)
            self._mirror_failed = True

    def _mirror_usage_point(self, device: EndDevice) -> MirrorUsagePointRequest:
        role = MIRROR_ROLE_DER if device.options.asset_id else MIRROR_ROLE_SITE
        return MirrorUsagePointRequest(
            mRID=_mrid(device.lfdi, "mup"),
            description=f"der-sdk {device.options.target}",
            roleFlags=role,
            serviceCategoryKind=ServiceKind.ELECTRICITY,
            status=1,
            deviceLFDI=device.lfdi,
            postRate=int(self.options.mirror_interval_s),
            mirrorMeterReadings=[_power_reading(device, None)],
        )

    async def mirror_once(self) -> None:
        """POST each end device's real power (the sum of its assets' latest) to its
        MirrorUsagePoint. This runs at the mirror interval, usually more often than the
        server's pollRate allows polling, so it also tells a server that went away (with
        nothing to post, it reads the DeviceCapability)."""
        if self._client is None:
            return
        try:
            posted = False
            for device in self._devices:
                reading = await self._power_now(device)
                if device.mirror_href is not None and reading is not None:
                    await self._client.post(device.mirror_href, _power_reading(device, reading))
                    posted = True
            if not posted:
                await self._client.get(self.options.server_url, DeviceCapabilityResponse)
        except Sep2Error as exc:
            if exc.unreachable:
                self._unreachable = True
                self.ctx.report_health(
                    False, f"{exc}; the dispatches already made keep running on schedule"
                )
            elif not self._mirror_failed:
                self.ctx.log.warning("program %s: mirror: %s", self.ctx.program, exc)
            self._mirror_failed = True
        else:
            self._mirror_failed = False
            if self._unreachable:
                self._unreachable = False
                self.ctx.report_health(True, f"{self.options.server_url} answers again")

    async def _power_now(self, device: EndDevice) -> Reading | None:
        samples = [await self.ctx.latest(a.asset_id) for a in device.assets]
        present = [s for s in samples if s is not None]
        if not present:
            return None
        return Reading(
            value=round(sum(s.mw for s in present) * 1e6),
            timePeriod=DateTimeIntervalType(
                start=int(max(s.ts for s in present).timestamp()), duration=int(self._post_s)
            ),
        )


def _power_reading(device: EndDevice, reading: Reading | None) -> MirrorMeterReadingRequest:
    """The MirrorMeterReading of real power: W, signed as der-sdk signs MW (+ export or
    discharge), hence flow direction reverse (received from the customer)."""
    return MirrorMeterReadingRequest(
        mRID=_mrid(device.lfdi, "power"),
        description="Real power",
        reading=reading,
        readingType=ReadingType(
            commodity=CommodityType.ELECTRICITY_SECONDARY_METERED_VALUE,
            kind=KindType.POWER,
            dataQualifier=DataQualifierType.AVERAGE,
            flowDirection=FlowDirectionType.REVERSE,
            uom=UomType.REAL_POWER_WATT,
            powerOfTenMultiplier=0,
            accumulationBehaviour=AccumulationBehaviourType.INSTANTANEOUS,
        ),
    )


def _mrid(lfdi: str, what: str) -> str:
    return hashlib.sha256(f"{lfdi}:{what}".encode()).hexdigest()[:32].upper()


def _end_of(dispatch: Dispatch) -> int | None:
    if dispatch.start_at is None or dispatch.duration_s is None:
        return None
    return int(dispatch.start_at.timestamp() + dispatch.duration_s)
