"""The agent stream's outbox: what the stream's writer drains, in order."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from der_sdk.wire import pb
from der_sdk_headend.presence import AgentStream
from der_sdk_headend.presence.registry import Outbox


def _ack(seq: int) -> pb.HeadendMessage:
    return pb.HeadendMessage(telemetry_ack=pb.TelemetryAck(seq=seq))


async def test_outbox_hands_messages_over_in_order_and_waits_for_the_next() -> None:
    outbox = Outbox()
    outbox.put_nowait(_ack(1))
    outbox.put_nowait(_ack(2))
    assert outbox.qsize() == 2
    assert (await outbox.get()) == _ack(1)
    assert (await outbox.get()) == _ack(2)
    assert outbox.empty()

    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    outbox.put_nowait(None)  # the writer's signal to end the stream
    assert await asyncio.wait_for(waiting, 1) is None


async def test_a_cancelled_get_loses_nothing_and_the_next_reader_gets_it() -> None:
    outbox = Outbox()
    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    outbox.put_nowait(_ack(7))
    assert (await asyncio.wait_for(outbox.get(), 1)) == _ack(7)


async def test_an_outbox_has_one_reader() -> None:
    outbox = Outbox()
    first = asyncio.create_task(outbox.get())
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="one reader"):
        await outbox.get()
    outbox.put_nowait(_ack(1))
    assert (await asyncio.wait_for(first, 1)) == _ack(1)


async def test_stream_send_and_end_go_through_its_outbox() -> None:
    stream = AgentStream(agent_id="gw-1", site_id="site-1", peer="ipv4:127.0.0.1:1")
    stream.send(_ack(3))
    stream.end()
    assert [await stream.outbox.get(), await stream.outbox.get()] == [_ack(3), None]
    with pytest.raises(AttributeError):
        stream.not_a_field = 1  # type: ignore[attr-defined]
