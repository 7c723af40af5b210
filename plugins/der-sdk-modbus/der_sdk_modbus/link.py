"""One Modbus TCP connection to one device, on pymodbus's asyncio client.

:class:`ModbusLink` turns every way a request can fail into a :class:`ModbusFault` with a
``kind`` and a message fit for a quality reason: ``connect`` (no connection),
``timeout`` (no response in time), ``exception`` (an exception response, codes 01-0B),
``disconnected`` (the connection dropped) and ``protocol`` (a response that does not match
the request). pymodbus's own reconnect loop and retries are switched off: the adapter
decides when to reconnect and what to retry. Timeouts are enforced here, so a device that
never answers costs one ``timeout_s`` and no pymodbus error log per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Final, Literal

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from der_sdk_modbus.points import Table

__all__ = ["EXCEPTION_NAMES", "FaultKind", "ModbusFault", "ModbusLink"]

EXCEPTION_NAMES: Final[dict[int, str]] = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
    0x07: "negative acknowledge",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}

FaultKind = Literal["connect", "timeout", "exception", "disconnected", "protocol"]


class ModbusFault(Exception):
    """A request or connection failed. ``code`` is the exception code of an exception
    response (``kind == "exception"``)."""

    def __init__(self, kind: FaultKind, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.kind: FaultKind = kind
        self.code = code

    @property
    def breaks_connection(self) -> bool:
        """Whether the connection must be opened again before the next request."""
        return self.kind != "exception"


def _cancel_requests() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def _raise_if_cancel_was_swallowed(before: int) -> None:
    """Re-raise a cancellation that arrived as pymodbus's answer did: on Python 3.11 its
    ``asyncio.wait_for`` then returns the answer and drops the cancellation, and a caller
    cancelled mid-request (the agent's timeout) would carry on as if it had not been."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


def describe_exception_code(code: int) -> str:
    """``"02 (illegal data address)"``."""
    return f"{code:02X} ({EXCEPTION_NAMES.get(code, 'unknown exception code')})"


class ModbusLink:
    """A connection to ``host:port`` addressing ``unit_id``; one request at a time.

    The caller serialises requests (the adapter holds a lock around each conversation).
    ``requests`` counts requests sent, for statistics and tests.
    """

    def __init__(self, host: str, port: int, unit_id: int, timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.timeout_s = timeout_s
        self.requests = 0
        self._client: AsyncModbusTcpClient | None = None
        self._in_flight = False

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port} unit {self.unit_id}"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        """Open a new connection (closing any old one).

        :raises ModbusFault: ``connect``, the device refused or did not answer in time.
        """
        self.close()
        client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            name=f"der-modbus {self.host}:{self.port}",
            # our own timeout (below) fires first; pymodbus's is only a backstop
            timeout=self.timeout_s + 1.0,
            retries=0,
            reconnect_delay=0,
            reconnect_delay_max=0,
            trace_connect=self._connection_changed,
        )
        cancelling = _cancel_requests()
        try:
            async with asyncio.timeout(self.timeout_s):
                connected = await client.connect()
                _raise_if_cancel_was_swallowed(cancelling)
        except TimeoutError:
            connected = False
        except asyncio.CancelledError:
            client.close()
            raise
        if not connected:
            client.close()
            raise ModbusFault(
                "connect",
                f"cannot connect to {self.host}:{self.port} within {self.timeout_s:g} s "
                "(refused or unreachable)",
            )
        self._client = client

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _connection_changed(self, connected: bool) -> None:
        """pymodbus reports the connection dropped: fail the request waiting on it now
        rather than when it times out."""
        if connected or not self._in_flight or self._client is None:
            return
        future: asyncio.Future[ModbusPDU] | None = getattr(
            self._client.ctx, "response_future", None
        )
        if future is not None and not future.done():
            future.set_exception(ConnectionException("the device closed the connection"))

    # ---------------------------------------------------------------- requests

    async def read(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        """``count`` registers (or bits) of ``table`` from ``address``.

        :raises ModbusFault: on every failure.
        """
        client = self._require()
        what = f"read {table} {address}..{address + count - 1}"
        if table == "holding":
            request = client.read_holding_registers(address, count=count, device_id=self.unit_id)
        elif table == "input":
            request = client.read_input_registers(address, count=count, device_id=self.unit_id)
        elif table == "coil":
            request = client.read_coils(address, count=count, device_id=self.unit_id)
        else:
            request = client.read_discrete_inputs(address, count=count, device_id=self.unit_id)
        response = await self._send(request, what)
        if table in ("coil", "discrete"):
            return [bool(bit) for bit in response.bits[:count]]
        registers = list(response.registers)
        if len(registers) != count:
            self.close()
            raise ModbusFault(
                "protocol", f"{what}: the response holds {len(registers)} registers, not {count}"
            )
        return registers

    async def write_registers(
        self, address: int, values: Sequence[int], function: int | None = None
    ) -> None:
        """Write holding registers: function 6 for one register unless ``function`` is 16,
        function 16 for several."""
        client = self._require()
        what = f"write holding {address}..{address + len(values) - 1}"
        if len(values) == 1 and function != 16:
            request = client.write_register(address, values[0], device_id=self.unit_id)
        else:
            request = client.write_registers(address, list(values), device_id=self.unit_id)
        await self._send(request, what)

    async def write_coil(self, address: int, value: bool, function: int | None = None) -> None:
        """Write one coil: function 5 unless ``function`` is 15."""
        client = self._require()
        what = f"write coil {address}"
        if function == 15:
            request = client.write_coils(address, [value], device_id=self.unit_id)
        else:
            request = client.write_coil(address, value, device_id=self.unit_id)
        await self._send(request, what)

    # ---------------------------------------------------------------- internals

    def _require(self) -> AsyncModbusTcpClient:
        client = self._client
        if client is None or not client.connected:
            raise ModbusFault("disconnected", f"not connected to {self.host}:{self.port}")
        return client

    async def _send(self, request: Awaitable[ModbusPDU], what: str) -> ModbusPDU:
        self.requests += 1
        self._in_flight = True
        cancelling = _cancel_requests()
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await request
                _raise_if_cancel_was_swallowed(cancelling)
        except asyncio.CancelledError:
            self.close()  # the answer may still come: start the next request afresh
            raise
        except TimeoutError:
            self.close()
            raise ModbusFault(
                "timeout", f"no response within {self.timeout_s:g} s to {what}"
            ) from None
        except ConnectionException:
            self.close()
            raise ModbusFault(
                "disconnected", f"connection to {self.host}:{self.port} lost during {what}"
            ) from None
        except ModbusIOException as exc:
            self.close()
            raise ModbusFault("protocol", f"{what}: {exc}") from None
        except ModbusException as exc:
            self.close()
            raise ModbusFault("protocol", f"{what}: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            self.close()
            raise ModbusFault("disconnected", f"{what}: {exc}") from None
        finally:
            self._in_flight = False
        if response.isError():
            code = response.exception_code
            raise ModbusFault(
                "exception",
                f"exception response {describe_exception_code(code)} to {what}",
                code=code,
            )
        return response
