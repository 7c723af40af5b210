"""One Modbus TCP connection to one device: a lean client on an asyncio protocol.

:class:`ModbusLink` turns every way a request can fail into a :class:`ModbusFault` with a
``kind`` and a message fit for a quality reason: ``connect`` (no connection),
``timeout`` (no response in time), ``exception`` (an exception response, codes 01-0B),
``disconnected`` (the connection dropped) and ``protocol`` (a response that does not match
the request). It never reconnects or retries on its own: the adapter decides when to
reconnect and what to retry. A device that never answers costs one ``timeout_s`` per
request.

Why not pymodbus's client (which the plugin used before, and whose server the simulator
still uses): the adapter sends one request at a time and needs only functions 1-6, 15 and
16, and pymodbus's general transaction machinery (framer, PDU objects, a lock, a
``wait_for`` and trace hooks per request) cost more CPU than the whole rest of a poll.
Here a request is one ``struct.pack`` and one ``write``; its answer is matched by
transaction id, protocol id and unit id and decoded with one ``struct.unpack``, and one
timer per connection, set again only when it fires early, replaces a timeout context per
request. Modbus TCP framing (MBAP header plus PDU) is all there is to it.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Final, Literal, cast

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


class _Lost(Exception):
    """The connection closed while a request waited for its answer."""


class _Expired(Exception):
    """No answer within the timeout."""


_MBAP: Final = struct.Struct(">HHHB")  # transaction id, protocol id, length, unit id
_REQUEST: Final = struct.Struct(">HHHBBHH")  # MBAP, function, address, count or value
_READ_FUNCTION: Final[dict[str, int]] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
_WORDS: dict[int, struct.Struct] = {}


def _words(count: int) -> struct.Struct:
    codec = _WORDS.get(count)
    if codec is None:
        codec = _WORDS[count] = struct.Struct(f">{count}H")
    return codec


_LATE_S: Final = 0.05
"""How late a request's timer may fire before the loop is taken to have been too busy to
read an answer that may be waiting."""


_TABLE_OF: Final[dict[int, str]] = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}


def _what(function: int, address: int, word: int) -> str:
    """The request in words, for a fault's message (made only when one is raised):
    ``read holding 40074..40192``, ``write holding 40100..40101``, ``write coil 3``."""
    if function <= 4:
        return f"read {_TABLE_OF[function]} {address}..{address + word - 1}"
    if function in (5, 15):
        return f"write coil {address}"
    count = word if function == 16 else 1
    return f"write holding {address}..{address + count - 1}"


def _expire(waiter: asyncio.Future[bytes], due: float, again: bool = True) -> None:
    """The request's time is up. When the timer fires late (the event loop was busy for a
    while), the answer may be in the socket unread: uvloop runs due timers before it polls
    for I/O, so the request gets one more moment (a 1 ms timer, after that poll) before it
    times out, rather than failing because of the agent's load rather than the device."""
    if waiter.done():
        return
    loop = waiter.get_loop()
    if again and loop.time() - due > _LATE_S:
        loop.call_later(0.001, _expire, waiter, due, False)
        return
    waiter.set_exception(_Expired())


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole Modbus TCP frames (MBAP header on) at the start of ``data``, and the
    bytes after them (the start of a frame still arriving)."""
    frames = []
    while len(data) >= 7:
        end = 6 + (data[4] << 8 | data[5])
        if len(data) < end:
            break
        frames.append(data[:end])
        data = data[end:]
    return frames, data


class _Protocol(asyncio.Protocol):
    """Frames the byte stream into MBAP frames and hands the awaited one over."""

    __slots__ = ("buffer", "closed", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[bytes] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        if len(data) >= 7 and len(data) == 6 + (data[4] << 8 | data[5]):
            frames = [data]  # one whole answer, as nearly always: nothing to slice
        else:
            frames, self.buffer = split_frames(data)
        for frame in frames:
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(frame)
            # else: an answer nobody waits for (its request timed out); dropped

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Lost())


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
        self._protocol: _Protocol | None = None
        self._tid = 0
        # one timer per connection rather than one per request (see _send)
        self._due = 0.0  # when the request under way times out
        self._timer: asyncio.TimerHandle | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port} unit {self.unit_id}"

    @property
    def connected(self) -> bool:
        protocol = self._protocol
        return protocol is not None and not protocol.closed

    async def connect(self) -> None:
        """Open a new connection (closing any old one).

        :raises ModbusFault: ``connect``, the device refused or did not answer in time.
        """
        self.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        except (TimeoutError, OSError):
            raise ModbusFault(
                "connect",
                f"cannot connect to {self.host}:{self.port} within {self.timeout_s:g} s "
                "(refused or unreachable)",
            ) from None
        self._protocol = protocol
        self._tid = 0

    def close(self) -> None:
        """Close the connection; a request waiting for its answer fails at once."""
        protocol, self._protocol = self._protocol, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if protocol is None:
            return
        protocol.closed = True
        waiter = protocol.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Lost())
        if protocol.transport is not None:
            protocol.transport.close()

    # ---------------------------------------------------------------- requests

    async def read(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        """``count`` registers (or bits) of ``table`` from ``address``.

        :raises ModbusFault: on every failure.
        """
        function = _READ_FUNCTION[table]
        body = await self._send(function, address, count, b"")
        size = body[1] if len(body) > 1 else 0
        if function <= 2:
            held = min(size, len(body) - 2) * 8
            if held < count:
                self.close()
                raise ModbusFault(
                    "protocol",
                    f"{_what(function, address, count)}: the response holds {held} bits, "
                    f"not {count}",
                )
            return [bool(body[2 + (i >> 3)] >> (i & 7) & 1) for i in range(count)]
        held = min(size, len(body) - 2) // 2
        if held != count:
            self.close()
            raise ModbusFault(
                "protocol",
                f"{_what(function, address, count)}: the response holds {held} registers, "
                f"not {count}",
            )
        return list(_words(count).unpack_from(body, 2))

    async def write_registers(
        self, address: int, values: Sequence[int], function: int | None = None
    ) -> None:
        """Write holding registers: function 6 for one register unless ``function`` is 16,
        function 16 for several."""
        if len(values) == 1 and function != 16:
            await self._send(6, address, values[0], b"")
            return
        count = len(values)
        data = bytes([2 * count]) + _words(count).pack(*values)
        await self._send(16, address, count, data)

    async def write_coil(self, address: int, value: bool, function: int | None = None) -> None:
        """Write one coil: function 5 unless ``function`` is 15."""
        if function == 15:
            await self._send(15, address, 1, bytes([1, 1 if value else 0]))
        else:
            await self._send(5, address, 0xFF00 if value else 0x0000, b"")

    # ---------------------------------------------------------------- internals

    def _check_due(self, protocol: _Protocol) -> None:
        """The connection's timer fired: time out the request under way if it is due."""
        self._timer = None
        waiter = protocol.waiter
        if protocol is not self._protocol or waiter is None or waiter.done():
            return  # no request under way: the next one sets the timer again
        loop = waiter.get_loop()
        due = self._due
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check_due, protocol)
        else:
            _expire(waiter, due)

    async def _send(self, function: int, address: int, word: int, data: bytes) -> bytes:
        """Send one request (function, address, count or value, then ``data``); the
        response PDU (function code first) once it is a match and no exception."""
        protocol = self._protocol
        if protocol is None or protocol.closed or protocol.transport is None:
            raise ModbusFault("disconnected", f"not connected to {self.host}:{self.port}")
        self.requests += 1
        tid = self._tid = self._tid % 0xFFFF + 1
        unit = self.unit_id
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        protocol.waiter = waiter
        protocol.transport.write(
            _REQUEST.pack(tid, 0, 6 + len(data), unit, function, address, word) + data
        )
        # The timer is not made and cancelled per request: one is left armed for the
        # earliest deadline, and when it fires it times out the request under way if that
        # one is due, is set again for it if it is not, and lapses if none is under way
        # (about one timer per poll instead of two made and two cancelled).
        self._due = due = loop.time() + self.timeout_s
        timer = self._timer
        if timer is None or timer.when() > due:  # (later only if timeout_s was lowered)
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(due, self._check_due, protocol)
        try:
            frame = await waiter
        except asyncio.CancelledError:
            self.close()  # the answer may still come: start the next request afresh
            raise
        except _Expired:
            self.close()
            raise ModbusFault(
                "timeout",
                f"no response within {self.timeout_s:g} s to {_what(function, address, word)}",
            ) from None
        except _Lost:
            self.close()
            raise ModbusFault(
                "disconnected",
                f"connection to {self.host}:{self.port} lost during "
                f"{_what(function, address, word)}",
            ) from None
        finally:
            protocol.waiter = None
        if len(frame) < 8:
            self.close()
            raise ModbusFault(
                "protocol",
                f"{_what(function, address, word)}: a response of {len(frame)} bytes, too short",
            )
        answer_tid, protocol_id, _, answer_unit = _MBAP.unpack_from(frame)
        if answer_tid != tid or protocol_id != 0 or (unit and answer_unit != unit):
            self.close()
            raise ModbusFault(
                "protocol",
                f"{_what(function, address, word)}: the response (transaction {answer_tid}, "
                f"protocol {protocol_id}, "
                f"unit {answer_unit}) does not answer the request (transaction {tid}, "
                f"protocol 0, unit {unit})",
            )
        answered = frame[7]
        if answered == function:
            return frame[7:]
        if answered == function | 0x80 and len(frame) >= 9:
            code = frame[8]
            raise ModbusFault(
                "exception",
                f"exception response {describe_exception_code(code)} to "
                f"{_what(function, address, word)}",
                code=code,
            )
        self.close()
        raise ModbusFault(
            "protocol",
            f"{_what(function, address, word)}: the response is for function {answered}, "
            f"not {function}",
        )
