"""Quality never lies: every injected fault gives ``bad`` samples with the reason, never a
fresh timestamp on an old value, never a half-updated value, and polling recovers within
one poll of the fault clearing; one slow device does not hold up the others."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from der_sdk_modbus.link import ModbusLink
from der_sdk_modbus.simulator import ModbusSimServer
from modbus_kit import (
    ASSET,
    MakeAdapter,
    Recorder,
    Serve,
    eventually,
    good_sample,
    load_test_profile,
)

from der_sdk import hookimpl, load_plugins
from der_sdk.agent_config import parse_agent_config
from der_sdk.extensions import DevicePoint, DeviceProfile
from der_sdk.models import Asset, TelemetrySample, utc_now
from der_sdk_agent.agent import Agent

POLL_S = 0.1
IN_FLIGHT = timedelta(seconds=0.2)
TIMEOUT_S = 0.25

FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "delay": ({"delay_s": 1.0}, "no response within 0.25 s to read"),
    "exception": ({"code": 0x04}, "exception response 04 (server device failure)"),
    "drop": ({}, "no response within 0.25 s"),
    "disconnect": ({}, "lost during read"),
}


def _first_bad(samples: list[TelemetrySample]) -> TelemetrySample | None:
    return next((s for s in reversed(samples) if s.quality == "bad"), None)


@pytest.mark.parametrize("kind", sorted(FAULTS))
async def test_fault_gives_bad_quality_with_its_reason_then_recovers_within_one_poll(
    kind: str, serve: Serve, make_adapter: MakeAdapter
) -> None:
    settings, reason = FAULTS[kind]
    _device, server = await serve(["acme-bess@1.0.0"], ramp_s=0)
    adapter = make_adapter(
        server, profile="acme-bess", profile_version="1.0.0", timeout_s=TIMEOUT_S
    )
    await adapter.connect()
    before = await good_sample(adapter)
    async with Recorder(adapter) as rec:
        injected = utc_now()
        server.inject_fault(kind, **settings)
        bad = await eventually(lambda: asyncio.sleep(0, _first_bad(rec.since(injected))))
        assert reason in (bad.quality_reason or ""), bad.quality_reason
        assert bad.online is False and bad.details == {} and bad.mw_setpoint is None
        await eventually(  # a few more polls under the fault
            lambda: asyncio.sleep(0, len(rec.since(injected)) >= 5), within=5
        )
        server.clear_faults()
        cleared = utc_now()
        recovered = await eventually(
            lambda: asyncio.sleep(
                0, next((s for s in rec.since(cleared) if s.quality == "good"), None)
            ),
            within=3,
            what="a good sample after the fault cleared",
        )
    # a poll that started just before the clear may be answered just after it: fresh data
    # stamped a moment early, which is honest; nothing earlier may be good
    during = [s for s in rec.samples if injected <= s.ts < cleared - IN_FLIGHT]
    assert not [s for s in during if s.quality == "good"], "a value stamped during the fault"
    after = rec.since(cleared)
    assert after and after[0].quality == "good", (
        f"the first poll after the fault cleared was not good: {after[:1]}"
    )
    assert recovered.ts > before.ts


async def test_every_exception_code_is_reported_with_its_name(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    device, server = await serve(["acme-bess@1.0.0"])
    adapter = make_adapter(server, profile="acme-bess", profile_version="1.0.0")
    await adapter.connect()
    await good_sample(adapter)
    names = {
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
    for code, name in names.items():
        device.inject_fault("exception", code=code)

        async def bad(code: int = code) -> TelemetrySample | None:
            sample = await adapter.read()
            return (
                sample
                if f"exception response {code:02X}" in (sample.quality_reason or "")
                else None
            )

        sample = await eventually(bad, within=3, what=f"exception {code:02X}")
        assert f"{code:02X} ({name})" in (sample.quality_reason or "")
        device.clear_faults()
        await good_sample(adapter)


async def test_a_value_split_across_a_failed_read_is_never_emitted_half_updated(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    profile = DeviceProfile(
        name="counter",
        vendor="T",
        model="T",
        version="1",
        protocol="modbus",
        points={
            "count": DevicePoint(address=0, field="details.count", extra={"type": "uint32"}),
            "power": DevicePoint(address=2, unit="W", field="mw", extra={"type": "int16"}),
            "copy": DevicePoint(address=3, field="details.copy", extra={"type": "float64"}),
        },
    )
    device, server = await serve([profile])
    counter = iter(range(1, 10**9))

    def advance(_: object) -> None:  # every request sees a new counter in both values
        k = next(counter)
        device.set_raw(device.point("count"), k)
        device.set_raw(device.point("copy"), float(k))

    device.before_request = advance
    adapter = make_adapter(
        server, profile="counter", profiles={"counter": profile}, max_read_registers=4
    )
    # a 64-bit value is never split: 0..2 in one read, the float64 3..6 in the next
    assert [(b.start, b.count) for b in adapter.read_plan] == [(0, 3), (3, 4)]
    await adapter.connect()
    async with Recorder(adapter) as rec:
        await eventually(lambda: asyncio.sleep(0, len(rec.samples) > 10))
        device.inject_fault("exception", code=0x04, addresses=(3, 7))  # the float64's read
        await eventually(lambda: asyncio.sleep(0, _first_bad(rec.samples)))
        await asyncio.sleep(3 * POLL_S)
        device.clear_faults()
        cleared = utc_now()
        await eventually(
            lambda: asyncio.sleep(0, [s for s in rec.since(cleared) if s.quality == "good"])
        )
    good = [s for s in rec.samples if s.quality == "good"]
    assert len(good) > 5
    for sample in good:  # both values from the same poll: the copy read right after
        assert sample.details["copy"] == sample.details["count"] + 1, sample.details
    for sample in rec.samples:
        if sample.quality == "bad":
            assert sample.details == {}
    for request in device.recent:  # no read ever covered part of the float64
        if request.function == 3 and request.address < 7 and request.address + request.count > 3:
            assert request.address <= 3 and request.address + request.count >= 7, request


# --------------------------------------------------------------------------- reconnect


async def test_reconnects_with_backoff_while_unreachable_and_recovers_when_back(
    serve: Serve, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    device, server = await serve(["acme-bess@1.0.0"])
    port = server.port
    adapter = make_adapter(
        server, profile="acme-bess", profile_version="1.0.0", reconnect_max_s=0.8
    )
    attempts: list[float] = []
    original = ModbusLink.connect

    async def counting(link: ModbusLink) -> None:
        attempts.append(asyncio.get_running_loop().time())
        await original(link)

    monkeypatch.setattr(ModbusLink, "connect", counting)
    await adapter.connect()
    await good_sample(adapter)
    await server.stop()
    server.disconnect_all()
    async with Recorder(adapter, every_s=0.05) as rec:
        await eventually(
            lambda: asyncio.sleep(
                0,
                any("next connection attempt in" in (s.quality_reason or "") for s in rec.samples),
            ),
            within=5,
            what="the adapter to back off",
        )
        started, polls_before, attempts_before = utc_now(), adapter.polls, len(attempts)
        await eventually(lambda: asyncio.sleep(0, adapter.polls - polls_before >= 12), within=5)
        assert len(attempts) - attempts_before < adapter.polls - polls_before  # backing off
        assert all(s.quality == "bad" for s in rec.since(started))
        assert any("cannot connect to 127.0.0.1" in (s.quality_reason or "") for s in rec.samples)
        back = ModbusSimServer(device, port=port)
        await back.start()
        try:
            recovered = utc_now()
            await eventually(
                lambda: asyncio.sleep(0, [s for s in rec.since(recovered) if s.quality == "good"]),
                within=3,
                what="recovery after the device came back",
            )
        finally:
            await back.stop()


# --------------------------------------------------------------------------- read() timing


async def _polled_every_5_s(serve: Serve, make_adapter: MakeAdapter) -> tuple[Any, Any]:
    """A device and its adapter (not connected), polled every 5 s: no poll of its own
    cadence comes within a test."""
    device, server = await serve(["acme-bess@1.0.0"])
    adapter = make_adapter(
        server, profile="acme-bess", profile_version="1.0.0", poll_interval_s=5.0, timeout_s=1.0
    )
    return device, adapter


async def test_each_poll_is_reported_once_and_a_slow_poll_is_not_waited_for(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    device, adapter = await _polled_every_5_s(serve, make_adapter)
    await adapter.connect()
    first = await adapter.read()
    second = await adapter.read()  # the poller was idle: it polls now, no 5 s wait
    assert first.quality == second.quality == "good" and second.ts > first.ts

    device.inject_fault("delay", delay_s=0.4)
    loop = asyncio.get_running_loop()
    asking = asyncio.create_task(adapter.read())  # asks for a poll now; the device is slow
    await eventually(lambda: asyncio.sleep(0, adapter.polls >= 3), what="the slow poll")
    started = loop.time()
    again = await adapter.read()  # that poll is still running: no waiting for it
    assert loop.time() - started < 0.3
    assert again.quality == "uncertain" and again.ts == second.ts
    assert "no new reading since" in (again.quality_reason or "")
    slow = await asking  # the one who asked gets the slow poll's fresh reading
    assert slow.quality == "good" and slow.ts > second.ts
    device.clear_faults()


async def test_polls_move_ahead_of_reads_at_the_same_cadence_so_reads_wait_for_nothing(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    _device, server = await serve(["acme-bess@1.0.0"])
    interval = 0.2
    adapter = make_adapter(
        server, profile="acme-bess", profile_version="1.0.0", poll_interval_s=interval
    )
    await adapter.connect()
    loop = asyncio.get_running_loop()
    # reads at the poll interval, at the phase where the poller's own ticks would land
    next_at = loop.time() + interval
    samples = []
    for _ in range(12):
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        next_at += interval
        read_at = datetime.now(UTC)
        sample = await adapter.read()
        samples.append((read_at, sample))
    assert all(s.quality == "good" for _, s in samples)
    assert len({s.ts for _, s in samples}) == len(samples)  # a new poll for every read
    assert adapter.reads_waited <= 4  # the first reads, until the poller moved ahead
    # the later reads got a poll made just before them, at most half an interval before
    # (not one an interval old); a loaded machine may delay a timer now and then
    ahead = timedelta(seconds=interval / 2 + 0.05)
    fresh = [read_at - ahead <= sample.ts <= read_at for read_at, sample in samples[4:]]
    assert sum(fresh) >= len(fresh) - 2, fresh
    assert adapter.polls <= len(samples) + 3  # no extra polls for that


async def test_a_slow_device_does_not_hold_up_the_other_assets_of_a_gateway(
    serve: Serve,
) -> None:
    acme = load_test_profile("acme-bess.yaml")
    site = "11111111-1111-4111-8111-111111111111"
    assets = [
        Asset(asset_id=f"aaaaaaaa-0000-4000-8000-00000000000{i}", site_id=site, name=f"B{i}")
        for i in (1, 2, 3)
    ]
    servers = [await serve([acme], ramp_s=0) for _ in assets]
    slow_device = servers[0][0]
    slow_device.inject_fault("delay", delay_s=0.3)  # answers, but slowly
    config = parse_agent_config(
        "telemetry_interval_s: 0.1\nassets:\n"
        + "".join(
            f"  {a.asset_id}:\n    adapter: modbus\n    options: {{host: 127.0.0.1, "
            f"port: {srv.port}, profile: acme-bess, poll_interval_s: 0.1, timeout_s: 1.0, "
            "retries: 0}\n"
            for a, (_, srv) in zip(assets, servers, strict=True)
        )
    )
    pack = SimpleNamespace(der_device_profiles=hookimpl(lambda: [acme]))
    plugins = load_plugins(extra=[("modbus-test-profiles", pack)])
    agent = Agent(
        agent_id="gw",
        site_id=site,
        assets=assets,
        headend="127.0.0.1:9",
        config=config,
        plugins=plugins,
    )
    loop = asyncio.get_running_loop()
    stamps: dict[str, list[datetime]] = {a.asset_id: [] for a in assets}
    durations: list[float] = []
    try:
        await agent.sample_once()  # connects every adapter
        for _ in range(15):
            started = loop.time()
            for sample in await agent.sample_once():
                if sample.quality == "good":
                    stamps[sample.asset_id].append(sample.ts)
            durations.append(loop.time() - started)
            await asyncio.sleep(0.1)
    finally:
        await agent.stop()
    slow, *fast = (len(set(stamps[a.asset_id])) for a in assets)
    assert all(n >= 12 for n in fast), (slow, fast)  # a fresh reading almost every time
    assert slow <= 9, (slow, fast)  # about one in three
    # a sample took the fast devices' time, not the slow device's 0.3 s
    assert sorted(durations)[len(durations) // 2] < 0.15, durations
    assert ASSET.asset_id not in stamps


async def test_read_nowait_gives_each_new_poll_once_and_none_until_the_next(
    serve: Serve, make_adapter: MakeAdapter
) -> None:
    _device, adapter = await _polled_every_5_s(serve, make_adapter)
    assert adapter.read_nowait() is None  # not connected
    await adapter.connect()  # returns once the first poll is in
    ready = adapter.read_nowait()
    assert ready is not None and ready.quality == "good"
    assert adapter.read_nowait() is None  # returned once: the next poll is 5 s away
    fresh = await adapter.read()  # read() polls now (the poller was idle) and waits for it
    assert fresh.quality == "good" and fresh.ts > ready.ts
    assert adapter.read_nowait() is None
