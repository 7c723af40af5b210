"""The Modbus TCP client itself, against a scripted server in a thread of its own (so it
answers while the client's event loop is busy): answers are matched to their request, and
an answer that waited in the socket while the loop was busy is not a timeout."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from der_sdk_modbus.link import ModbusFault, ModbusLink

Answer = Callable[[int, int, int], bytes]
"""(transaction id, unit id, count) -> the frame to send back."""


def _registers(tid: int, unit: int, count: int) -> bytes:
    pdu = bytes([3, 2 * count]) + struct.pack(f">{count}H", *range(1, count + 1))
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


@pytest.fixture
def scripted() -> Iterator[Callable[..., int]]:
    """Start a one-connection server answering each read with ``answer(...)`` after
    ``delay_s`` (in two pieces 20 ms apart with ``split``); its port."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(answer: Answer, split: bool = False, delay_s: float = 0.0) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            with listener, listener.accept()[0] as conn:
                while len(request := conn.recv(12)) == 12:
                    tid, _, _, unit, _, _, count = struct.unpack(">HHHBBHH", request)
                    frame = answer(tid, unit, count)
                    time.sleep(delay_s)
                    if split:
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        conn.sendall(frame[:5])
                        time.sleep(0.02)
                        frame = frame[5:]
                    conn.sendall(frame)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(timeout=5)


def test_an_answer_that_waited_while_the_loop_was_busy_is_not_a_timeout(
    scripted: Callable[..., int],
) -> None:
    uvloop = pytest.importorskip("uvloop")  # it runs due timers before it reads sockets
    port = scripted(_registers, delay_s=0.05)

    async def scenario() -> list[int] | list[bool]:
        loop = asyncio.get_running_loop()
        link = ModbusLink("127.0.0.1", port, 1, timeout_s=0.2)
        await link.connect()
        busy, poke = socket.socketpair()

        def busy_reading_another_socket() -> None:
            loop.remove_reader(busy)
            time.sleep(0.5)  # past the timeout; the answer arrives meanwhile, unread

        try:
            read = asyncio.create_task(link.read("holding", 100, 3))
            await asyncio.sleep(0)  # the request is on the wire
            loop.add_reader(busy, busy_reading_another_socket)
            poke.send(b"x")
            return await read
        finally:
            link.close()
            busy.close()
            poke.close()

    assert uvloop.run(scenario()) == [1, 2, 3]


async def test_an_answer_to_another_transaction_is_a_protocol_fault_and_a_fresh_connection(
    scripted: Callable[..., int],
) -> None:
    port = scripted(lambda tid, unit, count: _registers(tid + 1, unit, count))
    link = ModbusLink("127.0.0.1", port, 1, timeout_s=1.0)
    await link.connect()
    with pytest.raises(ModbusFault) as raised:
        await link.read("holding", 100, 3)
    assert raised.value.kind == "protocol"
    assert "does not answer the request (transaction 1" in str(raised.value)
    assert not link.connected


async def test_an_answer_from_another_unit_is_a_protocol_fault(
    scripted: Callable[..., int],
) -> None:
    port = scripted(lambda tid, unit, count: _registers(tid, unit + 1, count))
    link = ModbusLink("127.0.0.1", port, 7, timeout_s=1.0)
    await link.connect()
    with pytest.raises(ModbusFault) as raised:
        await link.read("holding", 100, 3)
    assert raised.value.kind == "protocol" and "unit 8" in str(raised.value)


async def test_an_answer_split_across_segments_is_put_back_together(
    scripted: Callable[..., int],
) -> None:
    port = scripted(_registers, split=True)
    link = ModbusLink("127.0.0.1", port, 1, timeout_s=1.0)
    await link.connect()
    try:
        assert await link.read("holding", 100, 100) == list(range(1, 101))
        assert await link.read("holding", 100, 2) == [1, 2]
    finally:
        link.close()


async def test_each_request_gets_its_whole_timeout_from_when_it_was_sent(
    scripted: Callable[..., int],
) -> None:
    # one timer per connection, left armed for the first request's deadline: the second
    # request, sent later and answered after that deadline, is not timed out by it; the
    # third, never answered, times out its own timeout after it was sent
    answer_after_s = {1: 0.0, 2: 0.25, 3: 1.0}

    def answer(tid: int, unit: int, count: int) -> bytes:
        time.sleep(answer_after_s[tid])
        return _registers(tid, unit, count)

    port = scripted(answer)
    loop = asyncio.get_running_loop()
    link = ModbusLink("127.0.0.1", port, 1, timeout_s=0.3)
    await link.connect()
    try:
        assert await link.read("holding", 100, 2) == [1, 2]
        await asyncio.sleep(0.2)
        assert await link.read("holding", 100, 2) == [1, 2]  # answered 0.45 s after the first
        sent = loop.time()
        with pytest.raises(ModbusFault) as raised:
            await link.read("holding", 100, 2)
        took = loop.time() - sent
    finally:
        link.close()
    assert raised.value.kind == "timeout"
    assert 0.29 <= took < 0.6
