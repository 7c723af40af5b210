"""The message bus contract (:mod:`der_sdk.bus.contract`) as tests a bus plugin author
subclasses.

Subclass it in a test module, name the subclass ``Test...`` so pytest collects it, and set
``url`` (or override :meth:`BusConformance.make_bus`, for example to skip when the server
is missing)::

    from der_sdk.testing import BusConformance

    class TestMyBus(BusConformance):
        url = "mybus://127.0.0.1:4222"
        expected_name = "mybus"

Every test opens its buses in a namespace of its own (``conf-`` and random hex) and
destroys it afterwards, so the suite can run against a server other tests share. Waits
are short (presence entries live ``presence_max_age_s``, unacknowledged batches come back
after ``ack_wait_s``) and bounded: the whole suite takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from der_sdk.bus.contract import (
    BusOptions,
    BusUnavailableError,
    CommandFailedError,
    CommandTimeoutError,
    MessageBus,
    MessageTooLargeError,
    NoResponderError,
    PresenceChange,
    PresenceConflictError,
    PresenceWatch,
    StreamConsumer,
    StreamFullError,
    StreamMessage,
    open_bus,
)
from der_sdk.errors import DerSdkError
from der_sdk.plugins import Plugins, load_plugins

__all__ = ["BusConformance", "OpenBus"]

OpenBus = Callable[..., Awaitable[MessageBus]]
"""``await open_bus(**options)``: a connected bus in the test's namespace, with
:class:`BusOptions` fields overridden (``telemetry_max_messages=3``); closed afterwards."""


async def _next(iterator: Any, timeout_s: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(anext(iterator), timeout_s)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}", pytrace=False)


class BusConformance:
    """The bus contract, as tests.

    **Class attributes** (set ``url`` or override ``make_bus``):

    ``url: str``
        The bus URL of the backend under test.
    ``expected_name: str | None``
        When set, the bus's ``name`` must equal it.
    ``presence_max_age_s: float = 1.0``
        The presence age the tests use.
    ``ack_wait_s: float = 1.0``
        The acknowledgement wait the tests use.
    ``expiry_slack_s: float = 2.0``
        How long after an entry's age has passed its expiry may take to show.

    **Hooks** (override them):

    ``def load_plugins(self) -> Plugins``
        Where the backend for ``url`` is found. Default: ``der_sdk.load_plugins()``.
    ``def make_bus(self, options: BusOptions) -> MessageBus``
        A new, **unconnected** bus. Default: :func:`der_sdk.bus.open_bus` for ``url``.

    Fixtures for your own tests: ``open_bus`` (:data:`OpenBus`), ``bus`` and ``peer``
    (two connected buses in one namespace: two replicas).
    """

    url: ClassVar[str] = ""
    expected_name: ClassVar[str | None] = None
    presence_max_age_s: ClassVar[float] = 1.0
    ack_wait_s: ClassVar[float] = 1.0
    expiry_slack_s: ClassVar[float] = 2.0

    # ------------------------------------------------------------------ hooks

    def load_plugins(self) -> Plugins:
        return load_plugins()

    def make_bus(self, options: BusOptions) -> MessageBus:
        if not self.url:
            raise DerSdkError(
                f"{type(self).__name__}: set the class attribute url (for example "
                "'nats://127.0.0.1:4222') or override make_bus()"
            )
        return open_bus(self.url, self.load_plugins(), options)

    # ------------------------------------------------------------------ fixtures

    @pytest_asyncio.fixture
    async def open_bus(self) -> AsyncIterator[OpenBus]:
        namespace = f"conf-{secrets.token_hex(5)}"
        opened: list[MessageBus] = []

        async def open_one(**overrides: Any) -> MessageBus:
            fields: dict[str, Any] = {
                "namespace": namespace,
                "presence_max_age_s": self.presence_max_age_s,
                "telemetry_ack_wait_s": self.ack_wait_s,
                **overrides,
            }
            bus = self.make_bus(BusOptions(**fields))
            await bus.connect()
            opened.append(bus)
            return bus

        try:
            yield open_one
        finally:
            if opened:
                cleaner = next((b for b in opened if b.state != "closed"), None)
                if cleaner is None:  # every bus was closed by the test: open one to clean up
                    cleaner = await open_one()
                await cleaner.destroy()
            for bus in opened:
                await bus.close()

    @pytest_asyncio.fixture
    async def bus(self, open_bus: OpenBus) -> MessageBus:
        return await open_bus()

    @pytest_asyncio.fixture
    async def peer(self, open_bus: OpenBus, bus: MessageBus) -> MessageBus:
        return await open_bus()

    # ------------------------------------------------------------------ lifecycle

    async def test_reports_its_name_and_state(self, bus: MessageBus) -> None:
        assert isinstance(bus.name, str) and bus.name, "set MessageBus.name"
        if self.expected_name is not None:
            assert bus.name == self.expected_name
        assert bus.max_message_bytes > 0
        states = [bus.state]
        await bus.close()
        states.append(bus.state)
        await bus.close()  # idempotent
        assert states == ["connected", "closed"]

    async def test_calls_after_close_raise_bus_unavailable(self, bus: MessageBus) -> None:
        await bus.close()
        with pytest.raises(BusUnavailableError):
            await bus.telemetry.publish(b"late")
        with pytest.raises(BusUnavailableError):
            await bus.send_command("somebody", b"late")
        with pytest.raises(BusUnavailableError):
            await bus.presence.claim("asset-1", b"late")

    async def test_names_outside_the_rules_are_refused_naming_them(self, bus: MessageBus) -> None:
        with pytest.raises(ValueError, match=r"replica id 'a\.b'"):
            await bus.send_command("a.b", b"")
        with pytest.raises(ValueError, match=r"topic 'x\.\.y'"):
            await bus.broadcast("x..y", b"")
        with pytest.raises(ValueError, match="presence key 'a b'"):
            await bus.presence.claim("a b", b"")
        with pytest.raises(ValueError, match="namespace"):
            BusOptions(namespace="a.b")
        with pytest.raises(ValueError, match="presence_max_age_s"):
            BusOptions(presence_max_age_s=0)

    # ------------------------------------------------------------------ commands

    async def test_a_command_reaches_the_replica_that_serves_it_and_returns_its_reply(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        received: list[bytes] = []

        async def handle(payload: bytes) -> bytes:
            received.append(payload)
            return b"took " + payload

        await bus.serve_commands("replica-b", handle)
        assert await peer.send_command("replica-b", b"d1", timeout_s=2) == b"took d1"
        assert await bus.send_command("replica-b", b"d2", timeout_s=2) == b"took d2"
        assert received == [b"d1", b"d2"]

    async def test_a_command_for_a_replica_no_one_serves_raises_no_responder_at_once(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NoResponderError, match="replica-gone"):
            await peer.send_command("replica-gone", b"d1", timeout_s=3)
        assert loop.time() - started < 1.5, "no responder must be known without the timeout"

        async def handle(payload: bytes) -> bytes:
            return b"ok"

        served = await bus.serve_commands("replica-b", handle)
        assert await peer.send_command("replica-b", b"d1", timeout_s=2) == b"ok"
        await served.close()
        with pytest.raises(NoResponderError):
            await peer.send_command("replica-b", b"d2", timeout_s=3)

    async def test_a_failing_handler_reaches_the_sender_as_command_failed(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        async def handle(payload: bytes) -> bytes:
            raise RuntimeError("asset not on this stream")

        await bus.serve_commands("replica-b", handle)
        with pytest.raises(CommandFailedError, match="asset not on this stream"):
            await peer.send_command("replica-b", b"d1", timeout_s=2)

    async def test_a_slow_handler_gives_command_timeout_and_still_finishes(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        release = asyncio.Event()
        finished: list[bytes] = []

        async def handle(payload: bytes) -> bytes:
            await release.wait()
            finished.append(payload)
            return b"late"

        await bus.serve_commands("replica-b", handle)
        with pytest.raises(CommandTimeoutError):
            await peer.send_command("replica-b", b"d1", timeout_s=0.3)
        release.set()
        for _ in range(100):
            if finished:
                break
            await asyncio.sleep(0.02)
        assert finished == [b"d1"], "a sender giving up must not cancel the handler"

    # ------------------------------------------------------------------ presence

    async def test_presence_claim_is_seen_by_every_replica_with_a_revision(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        assert await peer.presence.get("agent-1") is None
        revision = await bus.presence.claim("agent-1", b"replica-a")
        entry = await peer.presence.get("agent-1")
        assert entry is not None and (entry.value, entry.revision) == (b"replica-a", revision)
        await bus.presence.claim("agent-2", b"replica-a")
        assert sorted(await peer.presence.entries()) == ["agent-1", "agent-2"]
        assert bus.presence.max_age_s == self.presence_max_age_s

    async def test_refresh_and_release_act_only_at_the_holders_revision(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        first = await bus.presence.claim("agent-1", b"replica-a")
        refreshed = await bus.presence.refresh("agent-1", b"replica-a", first)
        assert refreshed > first
        with pytest.raises(PresenceConflictError, match="agent-1"):
            await bus.presence.refresh("agent-1", b"replica-a", first)

        moved = await peer.presence.claim("agent-1", b"replica-b")  # the agent moved to B
        with pytest.raises(PresenceConflictError):
            await bus.presence.refresh("agent-1", b"replica-a", refreshed)
        assert await bus.presence.release("agent-1", refreshed) is False
        entry = await bus.presence.get("agent-1")
        assert entry is not None and entry.value == b"replica-b", "A must not delete B's claim"

        assert await peer.presence.release("agent-1", moved) is True
        assert await bus.presence.get("agent-1") is None
        with pytest.raises(PresenceConflictError, match="gone"):
            await peer.presence.refresh("agent-1", b"replica-b", moved)

    async def test_presence_entries_expire_after_max_age_unless_refreshed(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        await bus.presence.claim("agent-dead", b"replica-a")  # its replica stops refreshing
        revision = await peer.presence.claim("agent-live", b"replica-b")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.presence_max_age_s + self.expiry_slack_s
        while loop.time() < deadline and await bus.presence.get("agent-dead") is not None:
            await asyncio.sleep(self.presence_max_age_s / 4)
            revision = await peer.presence.refresh("agent-live", b"replica-b", revision)
        assert await bus.presence.get("agent-dead") is None, "the unrefreshed entry expired"
        assert sorted(await bus.presence.entries()) == ["agent-live"]

    async def test_a_watch_starts_from_the_table_then_sees_puts_deletes_and_expiries(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        held = await bus.presence.claim("agent-1", b"replica-a")
        watch: PresenceWatch = await peer.presence.watch()
        try:
            assert list(watch.initial) == ["agent-1"]
            assert watch.initial["agent-1"].revision == held

            second = await bus.presence.claim("agent-2", b"replica-a")
            change: PresenceChange = await _next(watch, 2, "the put of agent-2")
            assert (change.kind, change.key) == ("put", "agent-2")
            assert change.entry is not None and change.entry.revision == second

            assert await bus.presence.release("agent-2", second)
            change = await _next(watch, 2, "the delete of agent-2")
            assert (change.kind, change.key, change.entry) == ("delete", "agent-2", None)

            timeout = self.presence_max_age_s + self.expiry_slack_s
            change = await _next(watch, timeout, "the expiry of agent-1")
            assert (change.kind, change.key, change.entry) == ("expired", "agent-1", None)
        finally:
            await watch.close()
        assert [c async for c in watch] == [], "iteration ends once the watch is closed"

    # ------------------------------------------------------------------ telemetry

    async def _fetch_all(
        self, consumer: StreamConsumer, count: int, timeout_s: float = 3.0
    ) -> list[StreamMessage]:
        """Fetch until ``count`` batches came or ``timeout_s`` passed."""
        got: list[StreamMessage] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(got) < count and loop.time() < deadline:
            got += await consumer.fetch(
                count - len(got), timeout_s=max(deadline - loop.time(), 0.1)
            )
        return got

    async def test_a_published_batch_is_delivered_once_and_gone_after_its_ack(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        acks = [await bus.telemetry.publish(f"batch-{i}".encode()) for i in range(3)]
        assert [a.sequence for a in acks] == sorted({a.sequence for a in acks})
        assert not any(a.duplicate for a in acks)
        assert (await peer.telemetry.backlog()).messages == 3

        consumer = await peer.telemetry.consumer()
        messages = await self._fetch_all(consumer, 3)
        assert [m.data for m in messages] == [b"batch-0", b"batch-1", b"batch-2"]
        assert [m.sequence for m in messages] == [a.sequence for a in acks]
        assert [m.deliveries for m in messages] == [1, 1, 1]
        for message in messages:
            await message.ack()
        assert await consumer.fetch(10, timeout_s=self.ack_wait_s + 0.5) == []
        backlog = await bus.telemetry.backlog()
        assert (backlog.messages, backlog.bytes) == (0, 0)

    async def test_a_second_publish_with_the_same_msg_id_is_stored_once(
        self, bus: MessageBus
    ) -> None:
        first = await bus.telemetry.publish(b"batch", msg_id="agent-1:7")
        again = await bus.telemetry.publish(b"batch", msg_id="agent-1:7")
        assert (again.sequence, again.duplicate) == (first.sequence, True)
        other = await bus.telemetry.publish(b"batch", msg_id="agent-1:8")
        assert not other.duplicate and other.sequence > first.sequence
        assert (await bus.telemetry.backlog()).messages == 2

    async def test_an_unacked_batch_is_delivered_to_another_consumer_after_the_ack_wait(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        await bus.telemetry.publish(b"batch-0")
        crashed = await bus.telemetry.consumer()  # a writer that dies mid-batch
        (first,) = await self._fetch_all(crashed, 1)
        await crashed.close()

        survivor = await peer.telemetry.consumer()
        assert await survivor.fetch(1, timeout_s=0.2) == [], "not before the ack wait"
        (again,) = await self._fetch_all(survivor, 1, timeout_s=self.ack_wait_s + 3)
        assert (again.data, again.sequence, again.deliveries) == (b"batch-0", first.sequence, 2)
        await again.ack()
        assert (await peer.telemetry.backlog()).messages == 0

    async def test_nak_delivers_a_batch_again_and_in_progress_holds_it(
        self, bus: MessageBus
    ) -> None:
        await bus.telemetry.publish(b"batch-0")
        consumer = await bus.telemetry.consumer()
        (message,) = await self._fetch_all(consumer, 1)
        await message.nak()
        (again,) = await self._fetch_all(consumer, 1)
        assert (again.data, again.deliveries) == (b"batch-0", 2)

        for _ in range(3):  # working longer than the ack wait, reporting progress
            await asyncio.sleep(self.ack_wait_s / 2)
            await again.in_progress()
        assert await consumer.fetch(1, timeout_s=self.ack_wait_s / 2) == []
        await again.ack()

    async def test_consumers_share_the_work_each_batch_to_one_of_them(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        for i in range(10):
            await bus.telemetry.publish(f"batch-{i}".encode())
        one, two = await bus.telemetry.consumer(), await peer.telemetry.consumer()
        first = await one.fetch(4, timeout_s=2)
        second = await self._fetch_all(two, 10 - len(first))
        seen = [m.data for m in first + second]
        assert sorted(seen) == sorted(f"batch-{i}".encode() for i in range(10))
        for message in first + second:
            await message.ack()

    async def test_a_full_stream_refuses_a_batch_until_writers_free_space(
        self, open_bus: OpenBus
    ) -> None:
        bus = await open_bus(telemetry_max_messages=3)
        for i in range(3):
            await bus.telemetry.publish(f"batch-{i}".encode())
        with pytest.raises(StreamFullError, match="full"):
            await bus.telemetry.publish(b"batch-3")
        backlog = await bus.telemetry.backlog()
        assert (backlog.messages, backlog.max_messages) == (3, 3), "nothing stored, no drop"

        consumer = await bus.telemetry.consumer()
        (oldest,) = await consumer.fetch(1, timeout_s=2)
        assert oldest.data == b"batch-0", "the stored batches are kept, oldest first"
        await oldest.ack()
        await bus.telemetry.publish(b"batch-3")
        rest = await self._fetch_all(consumer, 3)
        assert [m.data for m in rest] == [b"batch-1", b"batch-2", b"batch-3"]

    async def test_the_byte_limit_refuses_a_batch_too(self, open_bus: OpenBus) -> None:
        bus = await open_bus(telemetry_max_bytes=8 * 1024)
        stored = 0
        with pytest.raises(StreamFullError):
            for _ in range(20):
                await bus.telemetry.publish(b"x" * 1000)
                stored += 1
        backlog = await bus.telemetry.backlog()
        assert 2 <= stored == backlog.messages < 9
        assert backlog.bytes <= backlog.max_bytes == 8 * 1024

    async def test_a_payload_over_the_message_size_is_refused(self, bus: MessageBus) -> None:
        with pytest.raises(MessageTooLargeError):
            await bus.telemetry.publish(b"x" * (bus.max_message_bytes + 1))
        await bus.telemetry.publish(b"x" * bus.max_message_bytes)

    async def test_stored_batches_outlive_the_bus_that_published_them(
        self, open_bus: OpenBus, bus: MessageBus
    ) -> None:
        ack = await bus.telemetry.publish(b"batch-0", msg_id="agent-1:1")
        await bus.close()
        writer = await open_bus()
        (message,) = await self._fetch_all(await writer.telemetry.consumer(), 1)
        assert (message.data, message.sequence) == (b"batch-0", ack.sequence)
        await message.ack()

    # ------------------------------------------------------------------ fan-out

    async def _until_live(self, publisher: MessageBus, topic: str, *subscriptions: Any) -> None:
        """Broadcast probes until every subscription got one: fan-out is at most once, and
        NATS may miss what another connection broadcasts in the first milliseconds after a
        subscription."""
        waiting = list(subscriptions)
        for _ in range(50):
            await publisher.broadcast(topic, b"probe")
            for subscription in list(waiting):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(anext(subscription), 0.05)
                    waiting.remove(subscription)
            if not waiting:
                return
        pytest.fail(f"{len(waiting)} subscription(s) of {topic!r} never got a probe")

    async def _messages(self, subscription: Any, count: int) -> list[bytes]:
        """The next ``count`` messages of ``subscription`` that are not probes."""
        got: list[bytes] = []
        while len(got) < count:
            message = await _next(subscription, 2, "a broadcast")
            if message != b"probe":
                got.append(message)
        return got

    async def test_a_broadcast_reaches_every_subscriber_in_order(
        self, bus: MessageBus, peer: MessageBus
    ) -> None:
        here = await bus.subscribe("telemetry.latest")
        there = await peer.subscribe("telemetry.latest")
        other_topic = await peer.subscribe("events")
        await self._until_live(peer, "telemetry.latest", here, there)
        for i in range(5):
            await peer.broadcast("telemetry.latest", f"sample-{i}".encode())
        expected = [f"sample-{i}".encode() for i in range(5)]
        assert await self._messages(here, 5) == expected, "the publisher's own subscription"
        assert await self._messages(there, 5) == expected, "another replica's subscription"
        await other_topic.close()
        assert [m async for m in other_topic] == [], "nothing for another topic"

        await there.close()
        await bus.broadcast("telemetry.latest", b"sample-5")
        assert await self._messages(here, 1) == [b"sample-5"]
        assert [m async for m in there if m != b"probe"] == [], "a closed subscription ends"

    async def test_close_ends_every_subscription_of_the_bus(self, bus: MessageBus) -> None:
        subscription = await bus.subscribe("events")
        watch = await bus.presence.watch()
        await bus.close()
        assert [m async for m in subscription] == []
        assert [c async for c in watch] == []
