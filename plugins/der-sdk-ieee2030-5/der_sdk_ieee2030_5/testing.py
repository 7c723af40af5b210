"""A **test double** of an IEEE 2030.5 utility server, for tests and demos only.

It is not a utility server and does not try to be one: plain HTTP on loopback, no TLS, no
access control, one FunctionSetAssignments per end device holding every program. It
speaks the resources this plugin uses, every document built from envoy-schema's models
(the same maintained schema the client reads), so that the client's walk, its responses
and its mirrored readings can be tested where no independent server can show them. The
end-to-end tests against an independent server are in ``tests/test_gridappsd_e2e.py``.

Drive it from Python: :meth:`Sep2TestServer.add_program`, :meth:`add_control`,
:meth:`set_status`; read what the client said in :attr:`responses` and :attr:`readings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import uvicorn
from envoy_schema.server.schema.sep2.der import (
    DERControlBase,
    DERControlListResponse,
    DERControlResponse,
    DERProgramListResponse,
    DERProgramResponse,
)
from envoy_schema.server.schema.sep2.device_capability import DeviceCapabilityResponse
from envoy_schema.server.schema.sep2.end_device import (
    EndDeviceListResponse,
    EndDeviceRequest,
    EndDeviceResponse,
)
from envoy_schema.server.schema.sep2.event import EventStatus, EventStatusType
from envoy_schema.server.schema.sep2.function_set_assignments import (
    FunctionSetAssignmentsListResponse,
    FunctionSetAssignmentsResponse,
)
from envoy_schema.server.schema.sep2.identification import ListLink
from envoy_schema.server.schema.sep2.metering_mirror import (
    MirrorMeterReadingRequest,
    MirrorUsagePointRequest,
)
from envoy_schema.server.schema.sep2.response import Response as Sep2Response
from envoy_schema.server.schema.sep2.types import DateTimeIntervalType
from litestar import Litestar, Request, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.response import Response
from pydantic_xml import BaseXmlModel

__all__ = ["Sep2TestServer"]

SEP_XML = "application/sep+xml"

HttpRequest = Request[object, object, State]


@dataclass
class _Program:
    mrid: str
    primacy: int
    description: str
    controls: list[DERControlResponse] = field(default_factory=list)


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Sep2TestServer:
    """See the module. ``poll_rate`` is the ``pollRate`` it advertises (seconds)."""

    def __init__(self, *, poll_rate: int = 1) -> None:
        self.poll_rate = poll_rate
        self.programs: list[_Program] = []
        self.end_devices: list[EndDeviceRequest] = []
        self.responses: list[Sep2Response] = []
        self.mirrors: list[MirrorUsagePointRequest] = []
        self.readings: list[MirrorMeterReadingRequest] = []
        self.port = 0
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The DeviceCapability URL."""
        return f"http://127.0.0.1:{self.port}/dcap"

    # ------------------------------------------------------------------ test API

    def add_program(self, *, primacy: int, description: str) -> int:
        """A DERProgram every end device gets; its index."""
        index = len(self.programs)
        self.programs.append(_Program(f"{0xD0 + index:032X}", primacy, description))
        return index

    def add_control(
        self,
        program: int,
        *,
        mrid: str,
        start: int,
        duration: int,
        base: DERControlBase,
        created: int | None = None,
    ) -> DERControlResponse:
        """A DERControl in ``program`` asking for responses at ``/rsp``."""
        now = int(time.time())
        control = DERControlResponse(
            href=f"/derp/{program}/derc/{mrid}",
            mRID=mrid,
            description=f"test control {mrid}",
            creationTime=created if created is not None else now,
            EventStatus_=EventStatus(
                currentStatus=EventStatusType.Active if start <= now else EventStatusType.Scheduled,
                dateTime=now,
                potentiallySuperseded=False,
            ),
            interval=DateTimeIntervalType(start=start, duration=duration),
            DERControlBase_=base,
            replyTo="/rsp",
            responseRequired="03",
        )
        self.programs[program].controls.append(control)
        return control

    def set_status(self, program: int, mrid: str, status: EventStatusType) -> None:
        """Change a control's EventStatus (cancel it, supersede it)."""
        for control in self.programs[program].controls:
            if control.mRID == mrid:
                control.EventStatus_.currentStatus = status
                control.EventStatus_.dateTime = int(time.time())
                return
        raise KeyError(mrid)

    def statuses(self, mrid: str) -> list[int]:
        """The Response statuses posted for control ``mrid``, in order."""
        return [int(r.status or 0) for r in self.responses if r.subject == mrid]

    # ------------------------------------------------------------------ serving

    async def start(self, port: int | None = None) -> None:
        """Serve on 127.0.0.1 (``port``: the one it had before, to come back)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port if port is not None else self.port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app(), lifespan="off", log_level="warning", access_log=False, log_config=None
        )
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # noqa: ASYNC110 - uvicorn has no event for it
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving (the state stays: :meth:`start` again to come back)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server, self._task = None, None

    def _app(self) -> Litestar:
        def xml(model: BaseXmlModel, status: int = 200) -> Response[bytes]:
            body = model.to_xml(skip_empty=True, exclude_none=True)
            assert isinstance(body, bytes)
            return Response(body, media_type=SEP_XML, status_code=status)

        def created(location: str) -> Response[bytes]:
            return Response(b"", status_code=201, headers={"Location": location})

        def page(request: HttpRequest, items: list[object]) -> list[object]:
            start = int(request.query_params.get("s", 0))
            limit = int(request.query_params.get("l", 1))
            return items[start : start + limit]

        @get("/dcap", sync_to_thread=False)
        def dcap() -> Response[bytes]:
            return xml(
                DeviceCapabilityResponse(
                    href="/dcap",
                    pollRate=self.poll_rate,
                    EndDeviceListLink=ListLink(href="/edev", all_=len(self.end_devices)),
                    MirrorUsagePointListLink=ListLink(href="/mup", all_=len(self.mirrors)),
                )
            )

        def end_device(index: int) -> EndDeviceResponse:
            registered = self.end_devices[index]
            return EndDeviceResponse(
                href=f"/edev/{index}",
                lFDI=registered.lFDI,
                sFDI=registered.sFDI,
                changedTime=registered.changedTime,
                enabled=True,
                FunctionSetAssignmentsListLink=ListLink(href=f"/edev/{index}/fsa", all_=1),
            )

        @get("/edev", sync_to_thread=False)
        def edev_list(request: HttpRequest) -> Response[bytes]:
            items = [end_device(i) for i in range(len(self.end_devices))]
            shown = page(request, list(items))
            return xml(
                EndDeviceListResponse(
                    href="/edev",
                    all_=len(items),
                    results=len(shown),
                    pollRate=self.poll_rate,
                    EndDevice=shown,  # type: ignore[arg-type]
                )
            )

        @post("/edev")
        async def edev_register(request: HttpRequest) -> Response[bytes]:
            self.end_devices.append(EndDeviceRequest.from_xml(await request.body()))
            return created(f"/edev/{len(self.end_devices) - 1}")

        @get("/edev/{index:int}", sync_to_thread=False)
        def edev(index: FromPath[int]) -> Response[bytes]:
            return xml(end_device(index))

        @get("/edev/{index:int}/fsa", sync_to_thread=False)
        def fsa(index: FromPath[int]) -> Response[bytes]:
            assignment = FunctionSetAssignmentsResponse(
                href=f"/edev/{index}/fsa/0",
                mRID=f"{0xF5A0 + index:032X}",
                description="all programs",
                DERProgramListLink=ListLink(href="/derp", all_=len(self.programs)),
            )
            return xml(
                FunctionSetAssignmentsListResponse(
                    href=f"/edev/{index}/fsa",
                    all_=1,
                    results=1,
                    pollRate=self.poll_rate,
                    FunctionSetAssignments=[assignment],
                )
            )

        @get("/derp", sync_to_thread=False)
        def derp(request: HttpRequest) -> Response[bytes]:
            items = [
                DERProgramResponse(
                    href=f"/derp/{i}",
                    mRID=p.mrid,
                    description=p.description,
                    primacy=p.primacy,
                    DERControlListLink=ListLink(href=f"/derp/{i}/derc", all_=len(p.controls)),
                )
                for i, p in enumerate(self.programs)
            ]
            shown = page(request, list(items))
            return xml(
                DERProgramListResponse(
                    href="/derp",
                    all_=len(items),
                    results=len(shown),
                    pollRate=self.poll_rate,
                    DERProgram=shown,  # type: ignore[arg-type]
                )
            )

        @get("/derp/{index:int}/derc", sync_to_thread=False)
        def derc(index: FromPath[int], request: HttpRequest) -> Response[bytes]:
            items = self.programs[index].controls
            shown = page(request, list(items))
            return xml(
                DERControlListResponse(
                    href=f"/derp/{index}/derc",
                    all_=len(items),
                    results=len(shown),
                    DERControl=shown,  # type: ignore[arg-type]
                )
            )

        @post("/rsp")
        async def response(request: HttpRequest) -> Response[bytes]:
            self.responses.append(Sep2Response.from_xml(await request.body()))
            return created(f"/rsp/{len(self.responses) - 1}")

        @post("/mup")
        async def mup(request: HttpRequest) -> Response[bytes]:
            self.mirrors.append(MirrorUsagePointRequest.from_xml(await request.body()))
            return created(f"/mup/{len(self.mirrors) - 1}")

        @post("/mup/{index:int}")
        async def mup_reading(index: FromPath[int], request: HttpRequest) -> Response[bytes]:
            self.readings.append(MirrorMeterReadingRequest.from_xml(await request.body()))
            return Response(b"", status_code=201)

        return Litestar(
            [dcap, edev_list, edev_register, edev, fsa, derp, derc, response, mup, mup_reading],
            debug=False,
        )
