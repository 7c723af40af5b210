"""The simulator's Modbus TCP server: pymodbus's server with our own request handling.

pymodbus parses and frames requests; each parsed request is handed to
:class:`SimulatedDevice` of its unit id, which counts it, may apply an injected fault
(delay, exception response, no response, closed connection) and otherwise answers it
from its registers. A function the device does not serve (:data:`SERVED_FUNCTIONS`),
whether pymodbus knows it or not, is answered with exception 01 (illegal function) under
that function code + 0x80, as the Modbus specification asks; a served function whose
request does not parse gets exception 03 (illegal data value). Every request runs in a
task the server tracks, so stopping the server leaves nothing behind, and a delayed answer
never holds up other connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import SimData, SimDevice
from pymodbus.transaction import TransactionManager

from der_sdk_modbus.simulator.device import SERVED_FUNCTIONS, SimulatedDevice

__all__ = ["ModbusSimServer"]

log = logging.getLogger("der.modbus.sim")


_MBAP_SIZE = 7
"""Bytes of the Modbus TCP header before the function code."""


def _request_range(pdu: ModbusPDU) -> tuple[int, int]:
    """``(address, count)`` a request touches."""
    count = max(pdu.count, len(pdu.registers), len(pdu.bits), 1)
    return pdu.address, count


class _Handler(ServerRequestHandler):
    """One client connection. Replaces pymodbus's dispatch to its datastore."""

    server: _Server

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        try:
            used = TransactionManager.callback_data(self, data, addr)
        except ModbusIOException as exc:
            # pymodbus could not decode the request (a function it does not know, or a body
            # of the wrong size) and does not say which function it was: the function code
            # is the byte after the header of the frame, the first one in data.
            function = data[_MBAP_SIZE] if len(data) > _MBAP_SIZE else 0
            response = ExceptionResponse(
                function,
                exception_code=ExcCodes.ILLEGAL_VALUE
                if function in SERVED_FUNCTIONS
                else ExcCodes.ILLEGAL_FUNCTION,
                device_id=exc.dev_id or 0,
                transaction=exc.transaction_id or 0,
            )
            self.server_send(response, addr)  # type: ignore[no-untyped-call]
            return len(data)
        pdu, self.last_pdu = self.last_pdu, None
        if pdu is not None:
            self.server.owner.spawn(self._answer(pdu, addr))
        return used

    async def handle_request(self) -> None:  # pymodbus's path, unused: we answer in _answer
        return None

    async def _answer(self, pdu: ModbusPDU, addr: tuple[Any, ...] | None) -> None:
        owner = self.server.owner
        device = owner.device_for(pdu.dev_id)
        if device is None:
            self._send(
                pdu, ExceptionResponse(pdu.function_code, ExcCodes.GATEWAY_NO_RESPONSE), addr
            )
            return
        if pdu.function_code not in SERVED_FUNCTIONS:
            # pymodbus would answer diagnostics, device identification, FIFO and file
            # records with its own made-up data: a simulated DER does not implement them.
            self._send(pdu, ExceptionResponse(pdu.function_code, ExcCodes.ILLEGAL_FUNCTION), addr)
            return
        address, count = _request_range(pdu)
        fault = device.begin_request(pdu.function_code, address, count)
        if fault is not None:
            if fault.delay_s > 0:
                await asyncio.sleep(fault.delay_s)
            if fault.kind == "drop":
                return
            if fault.kind == "disconnect":
                self.close()
                return
            if fault.kind == "exception":
                self._send(pdu, ExceptionResponse(pdu.function_code, fault.code), addr)
                return
        response = await pdu.datastore_update(device, pdu.dev_id)  # type: ignore[arg-type]
        self._send(pdu, response, addr)

    def _send(self, request: ModbusPDU, response: ModbusPDU, addr: tuple[Any, ...] | None) -> None:
        if not self.transport:
            return  # the client went away while we were answering
        response.transaction_id = request.transaction_id
        response.dev_id = request.dev_id
        self.server_send(response, addr)  # type: ignore[no-untyped-call]


class _Server(ModbusTcpServer):
    def __init__(self, owner: ModbusSimServer, host: str, port: int) -> None:
        # pymodbus wants a datastore; ours is the SimulatedDevice each request goes to
        placeholder = SimDevice(id=0, simdata=SimData(0, count=1))
        super().__init__(placeholder, address=(host, port))
        self.owner = owner

    def callback_new_connection(self) -> _Handler:
        return _Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)  # type: ignore[no-untyped-call]


class ModbusSimServer:
    """Serves simulated devices over Modbus TCP, one per unit id.

    Use as ``async with ModbusSimServer({1: device}) as server:``; :attr:`port` is the
    bound port (pass ``port=0`` for a free one). Unit id 0 addresses the only device when
    there is one; an unknown unit id gets exception 0B (gateway target failed to respond).
    """

    def __init__(
        self,
        devices: Mapping[int, SimulatedDevice] | SimulatedDevice,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if isinstance(devices, SimulatedDevice):
            devices = {devices.unit_id: devices}
        self.devices = dict(devices)
        self.host = host
        self._port = port
        self._server: _Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None or self._server.transport is None:
            return self._port
        sockets = getattr(self._server.transport, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    def device_for(self, unit_id: int) -> SimulatedDevice | None:
        device = self.devices.get(unit_id)
        if device is None and unit_id in (0, 255) and len(self.devices) == 1:
            device = next(iter(self.devices.values()))
        return device

    async def start(self) -> None:
        if self._server is not None:
            return
        server = _Server(self, self.host, self._port)
        await server.serve_forever(background=True)
        if server.transport is None:
            raise OSError(f"cannot listen on {self.host}:{self._port}")
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def disconnect_all(self) -> int:
        """Close every client connection now; the number closed."""
        if self._server is None:
            return 0
        connections = list(self._server.active_connections.values())
        for connection in connections:
            connection.close()
        return len(connections)

    def inject_fault(self, kind: str, **settings: Any) -> None:
        """Start ``kind`` on every device (``disconnect`` also closes open connections)."""
        for device in self.devices.values():
            device.inject_fault(kind, **settings)  # type: ignore[arg-type]
        if kind == "disconnect":
            self.disconnect_all()

    def clear_faults(self) -> None:
        for device in self.devices.values():
            device.clear_faults()

    def spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __aenter__(self) -> ModbusSimServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
