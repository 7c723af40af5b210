"""What the NATS bus does beyond the contract's suite: durability across a client
reconnect, the server-side shape of the stream and bucket, limits applied to what exists,
and clear errors for a server it cannot use."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest
from der_sdk_nats import NatsBus, NatsSettings, check_server_version
from der_sdk_nats.settings import redact
from nats.js import api
from nats_kit import OpenNatsBus, own_nats_server

from der_sdk.bus import BusOptions, BusUnavailableError, open_bus
from der_sdk.bus.contract import BusError
from der_sdk.errors import DerSdkError
from der_sdk.plugins import load_plugins
from der_sdk.testing import TcpProxy, wait_until


async def _state_is(bus: NatsBus, state: str) -> bool:
    return bus.state == state


def _proxy_to(nats_url: str) -> TcpProxy:
    """A TCP proxy in front of the test NATS server, to cut the link."""
    host, _, port = (
        NatsSettings.from_url(nats_url).servers[0].removeprefix("nats://").rpartition(":")
    )
    return TcpProxy(host, int(port))


async def test_acknowledged_batches_survive_a_client_reconnect(
    open_nats_bus: OpenNatsBus, nats_url: str
) -> None:
    async with _proxy_to(nats_url) as proxy:
        # one attempt at start, but reconnects for ever once connected
        replica = await open_nats_bus(f"nats://{proxy.addr}?reconnect_wait=0.1&connect_attempts=1")
        writer = await open_nats_bus()

        async def handle(payload: bytes) -> bytes:
            return b"took " + payload

        await replica.serve_commands("replica-a", handle)
        acked = [await replica.telemetry.publish(f"before-{i}".encode()) for i in range(5)]

        proxy.cut()
        await wait_until(lambda: _state_is(replica, "reconnecting"), "the bus to see the cut")
        with pytest.raises(BusUnavailableError, match="reconnecting"):
            await replica.telemetry.publish(b"during")
        await asyncio.sleep(0.6)  # several failed attempts
        assert replica.state == "reconnecting", "the bus keeps trying"
        proxy.heal()
        await wait_until(lambda: _state_is(replica, "connected"), "the bus to reconnect")

        acked += [await replica.telemetry.publish(f"after-{i}".encode()) for i in range(5)]
        consumer = await writer.telemetry.consumer()
        got = []
        for _ in range(20):
            got += await consumer.fetch(10, timeout_s=0.5)
            if len(got) >= 10:
                break
        assert [m.sequence for m in got] == [a.sequence for a in acked]
        assert [m.data for m in got][:5] == [f"before-{i}".encode() for i in range(5)]
        for message in got:
            await message.ack()
        assert (await writer.telemetry.backlog()).messages == 0, "'during' was never stored"
        assert await writer.send_command("replica-a", b"d1") == b"took d1", (
            "the replica serves its commands again after the reconnect"
        )


async def test_consumers_subscriptions_and_watches_carry_on_after_a_reconnect(
    open_nats_bus: OpenNatsBus, nats_url: str
) -> None:
    async with _proxy_to(nats_url) as proxy:
        replica = await open_nats_bus(f"nats://{proxy.addr}?reconnect_wait=0.1")
        other = await open_nats_bus()
        consumer = await replica.telemetry.consumer()
        latest = await replica.subscribe("telemetry.latest")
        watch = await replica.presence.watch()

        proxy.cut()
        await wait_until(lambda: _state_is(replica, "reconnecting"), "the bus to see the cut")
        proxy.heal()
        await wait_until(lambda: _state_is(replica, "connected"), "the bus to reconnect")

        await other.telemetry.publish(b"batch")
        (message,) = await consumer.fetch(1, timeout_s=3)
        assert message.data == b"batch"
        await message.ack()
        await other.broadcast("telemetry.latest", b"sample")
        assert await asyncio.wait_for(anext(latest), 3) == b"sample"
        revision = await other.presence.claim("agent-1", b"replica-b")
        change = await asyncio.wait_for(anext(watch), 3)
        assert (change.kind, change.key) == ("put", "agent-1")
        assert change.entry is not None and change.entry.revision == revision


async def test_the_stream_is_a_file_backed_work_queue_that_discards_new(
    open_nats_bus: OpenNatsBus,
) -> None:
    bus = await open_nats_bus(
        telemetry_max_messages=500, telemetry_max_bytes=1_000_000, presence_max_age_s=7
    )
    assert bus._js is not None
    stream = (await bus._js.stream_info(bus.stream_name)).config
    assert stream.storage == api.StorageType.FILE
    assert stream.retention == api.RetentionPolicy.WORK_QUEUE
    assert stream.discard == api.DiscardPolicy.NEW
    assert (stream.max_msgs, stream.max_bytes) == (500, 1_000_000)
    bucket = (await bus._js.stream_info(f"KV_{bus.bucket_name}")).config
    assert bucket.storage == api.StorageType.FILE
    assert bucket.max_age == 7
    assert bucket.max_msgs_per_subject == 1


async def test_a_fetch_that_finds_nothing_returns_empty_however_short_its_wait(
    open_nats_bus: OpenNatsBus,
) -> None:
    """nats-py ends some short fetches with a plain ``asyncio.TimeoutError`` (its wait
    ran out between the no-wait probe and the long poll) rather than its own
    ``TimeoutError``. That once escaped ``fetch`` and ended the stream writers for good,
    so a replica stored nothing while its stream filled (about one short fetch in ten
    does it here)."""
    bus = await open_nats_bus()
    consumer = await bus.telemetry.consumer()
    waits = [0.0005, 0.001, 0.002, 0.003] * 75
    for wait in waits:
        assert await consumer.fetch(16, timeout_s=wait) == []
    await consumer.close()


async def test_new_limits_apply_to_an_existing_stream_and_bucket(
    open_nats_bus: OpenNatsBus,
) -> None:
    first = await open_nats_bus(telemetry_max_messages=5, presence_max_age_s=10)
    await first.telemetry.publish(b"kept")
    second = await open_nats_bus(telemetry_max_messages=3, presence_max_age_s=4)
    assert second._js is not None
    assert (await second.telemetry.backlog()).max_messages == 3
    bucket = (await second._js.stream_info(f"KV_{second.bucket_name}")).config
    assert bucket.max_age == 4
    assert (await second.telemetry.backlog()).messages == 1, "updating keeps what is stored"


async def test_replicas_beyond_a_single_server_are_refused_naming_the_stream(
    open_nats_bus: OpenNatsBus, nats_url: str
) -> None:
    with pytest.raises(BusError, match=r"NATS refused the telemetry stream 'test-\w+-telemetry'"):
        await open_nats_bus(f"{nats_url}?replicas=3")


async def test_a_server_without_jetstream_is_refused_clearly() -> None:
    async with own_nats_server() as port:
        bus = NatsBus.from_url(f"nats://127.0.0.1:{port}", BusOptions())
        with pytest.raises(BusError, match="has no JetStream"):
            await bus.connect()
        assert bus.state == "closed"


async def test_user_and_password_come_from_the_url(tmp_path: Path) -> None:
    store = tmp_path / "jetstream"
    async with own_nats_server(
        "-js", "-sd", str(store), "--user", "der", "--pass", "s3cret"
    ) as port:
        options = BusOptions(namespace=f"test-{secrets.token_hex(4)}")
        bus = NatsBus.from_url(f"nats://der:s3cret@127.0.0.1:{port}", options)
        await bus.connect()
        try:
            assert (await bus.telemetry.publish(b"batch")).sequence == 1
        finally:
            await bus.close()
        wrong = NatsBus.from_url(f"nats://der:nope@127.0.0.1:{port}?reconnect_wait=0.1", options)
        # the server says "Authorization Violation" and closes; the client may see only
        # the reset
        with pytest.raises(BusUnavailableError, match=f"NATS at nats://127.0.0.1:{port}") as caught:
            await wrong.connect()
        assert "nope" not in str(caught.value)
        assert wrong.state == "closed"


async def test_an_unreachable_server_fails_connect_naming_it() -> None:
    from der_sdk.testing import free_port

    port = free_port()
    bus = NatsBus.from_url(f"nats://127.0.0.1:{port}?connect_attempts=1", BusOptions())
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BusUnavailableError, match=f"127.0.0.1:{port}"):
        await bus.connect()
    assert loop.time() - started < 5


def test_the_nats_scheme_opens_a_nats_bus() -> None:
    bus = open_bus("nats://127.0.0.1:4222", load_plugins(), BusOptions(namespace="x"))
    assert isinstance(bus, NatsBus) and bus.options.namespace == "x"
    assert load_plugins().bus_backends.provider("nats") == "der-sdk-nats"


def test_the_url_gives_servers_credentials_and_parameters() -> None:
    settings = NatsSettings.from_url(
        "nats://der:p%40ss@a.example:4223,b.example?name=headend-1&replicas=3&request_timeout=2"
    )
    assert settings.servers == ("nats://a.example:4223", "nats://b.example:4222")
    assert (settings.user, settings.password, settings.token) == ("der", "p@ss", None)
    assert (settings.name, settings.replicas, settings.request_timeout) == ("headend-1", 3, 2.0)
    assert NatsSettings.from_url("nats://t0ken@h").token == "t0ken"
    assert redact("nats://der:p%40ss@a:4222?x=1") == "nats://***@a:4222?x=1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h", "not a NATS URL"),
        ("nats://h?replica=3", "unknown parameter 'replica'"),
        ("nats://h?replicas=0", "replicas=0 must be at least 1"),
        ("nats://h?request_timeout=soon", "request_timeout='soon' is not a number"),
        ("nats://h:port", "no valid port"),
        ("nats://a,,b", "names no server"),
    ],
)
def test_a_bad_url_is_refused_naming_the_part(url: str, message: str) -> None:
    with pytest.raises(DerSdkError, match=message):
        NatsSettings.from_url(url)


def test_servers_older_than_2_9_are_refused() -> None:
    check_server_version("2.9.10")
    check_server_version("2.10.1")
    with pytest.raises(BusError, match=r"2.8.4 is too old: der-sdk-nats needs 2.9.0"):
        check_server_version("2.8.4")


async def test_acknowledged_batches_survive_a_nats_server_kill(tmp_path: Path) -> None:
    store = str(tmp_path / "jetstream")
    options = BusOptions(namespace="durable")
    async with own_nats_server("-js", "-sd", store) as port:
        publisher = NatsBus.from_url(f"nats://127.0.0.1:{port}", options)
        await publisher.connect()
        acked = [await publisher.telemetry.publish(f"batch-{i}".encode()) for i in range(20)]
        await publisher.close()
    # the server was killed with SIGKILL; a new one starts on the same file store
    async with own_nats_server("-js", "-sd", store) as port:
        writer = NatsBus.from_url(f"nats://127.0.0.1:{port}", options)
        await writer.connect()
        try:
            consumer = await writer.telemetry.consumer()
            got = []
            for _ in range(20):
                got += await consumer.fetch(20, timeout_s=0.5)
                if len(got) >= 20:
                    break
            assert [m.sequence for m in got] == [a.sequence for a in acked]
            assert [m.data for m in got] == [f"batch-{i}".encode() for i in range(20)]
        finally:
            await writer.close()
