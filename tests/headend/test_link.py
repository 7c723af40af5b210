"""The agent link: registration, refusals, presence and stream end, over real gRPC."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import datetime
from pathlib import Path

import grpc
import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    BESS_3,
    NOT_IN_INVENTORY,
    PV_1,
    SITE_A,
    SITE_A_ASSETS,
    WAIT_S,
    ConnectAgent,
    Observer,
    RawAgent,
    agents_by_asset,
    eventually,
    make_config,
    make_exploding_observer_plugin,
    sample,
)

from der_sdk.models import Allocation, LocalDispatchReport, Session, utc_now
from der_sdk.plugins import Plugins
from der_sdk.wire import codec, pb
from der_sdk_headend import Headend
from der_sdk_headend.service import STREAM_WINDOW_BYTES


async def test_register_accepted_shows_every_served_asset_connected_with_the_same_peer(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    ack = await agent.register(SITE_A_ASSETS)

    assert ack.accepted
    assert list(ack.accepted_asset_ids) == list(SITE_A_ASSETS)
    assert not ack.refused
    rows = await agents_by_asset(http)
    assert len(rows) == 4, "one row per configured asset"
    peers = {rows[a]["peer"] for a in SITE_A_ASSETS}
    assert len(peers) == 1 and next(iter(peers)).startswith("ipv4:127.0.0.1:")
    for asset_id in SITE_A_ASSETS:
        row = rows[asset_id]
        assert row["connected"] is True
        assert row["agent_id"] == "gw-1"
        assert row["headend_id"] == headend.config.headend_id, "held by this headend"
        assert row["site_name"] == "North Yard"
        assert row["last_seen"] is not None
        assert [s["disconnected_at"] for s in row["sessions"]] == [None]
    assert rows[PV_1]["connected"] is False
    assert rows[PV_1]["headend_id"] is None
    assert rows[PV_1]["sessions"] == []


async def test_register_refuses_assets_not_in_inventory_or_outside_the_site_and_records_it(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    ack = await agent.register([BESS_1, NOT_IN_INVENTORY, PV_1])

    assert ack.accepted
    assert list(ack.accepted_asset_ids) == [BESS_1]
    refused = {r.asset_id: r.reason for r in ack.refused}
    assert refused[NOT_IN_INVENTORY] == "not in the inventory"
    assert "belongs to site" in refused[PV_1]
    events = await headend.storage.events(kind="registration_refused")
    assert {e.asset_id for e in events} == {NOT_IN_INVENTORY, PV_1}
    assert all(e.data["agent_id"] == "gw-1" for e in events)

    # Nothing is written for a refused asset: no session, no telemetry.
    tack = await agent.telemetry(1, [sample(PV_1, seconds=1), sample(BESS_1, seconds=1)])
    assert tack.seq == 1
    rows = await agents_by_asset(http)
    assert rows[PV_1]["connected"] is False and rows[PV_1]["sessions"] == []
    assert (await http.get(f"/telemetry/{PV_1}")).status_code == 404
    assert await headend.storage.telemetry_history(PV_1) == []
    assert len(await headend.storage.telemetry_history(BESS_1)) == 1
    dropped = await headend.storage.events(kind="telemetry_dropped")
    assert [e.asset_id for e in dropped] == [PV_1]


async def test_register_with_nothing_accepted_gets_a_refusing_ack_then_permission_denied(
    headend: Headend, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    ack = await agent.register([NOT_IN_INVENTORY])

    assert not ack.accepted
    assert [r.asset_id for r in ack.refused] == [NOT_IN_INVENTORY]
    code, details = await agent.outcome()
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert NOT_IN_INVENTORY in details
    assert headend.agents_connected == 0


async def test_register_for_an_unknown_site_refuses_every_asset(
    connect_agent: ConnectAgent,
) -> None:
    agent = await connect_agent()
    ack = await agent.register([BESS_1], site_id="00000000-0000-4000-8000-00000000abcd")

    assert not ack.accepted
    assert "is not in the inventory" in ack.refused[0].reason
    code, _ = await agent.outcome()
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_first_message_must_be_register(connect_agent: ConnectAgent) -> None:
    agent = await connect_agent()
    await agent.send(codec.agent_heartbeat("gw-1", utc_now(), 1.0))

    code, details = await agent.outcome()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Register" in details


async def test_a_stream_silent_past_the_register_deadline_is_aborted(
    headend: Headend, connect_agent: ConnectAgent
) -> None:
    link = headend._link
    assert link is not None
    link._register_timeout_s = 0.2  # the default is 10 s; the behaviour is the same
    agent = await connect_agent()
    await agent.call.wait_for_connection()

    code, details = await agent.outcome()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "within" in details


async def test_stream_end_closes_sessions_and_marks_assets_disconnected(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent, observer: Observer
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)

    assert await agent.end() == grpc.StatusCode.OK
    rows = await agents_by_asset(http)
    for asset_id in SITE_A_ASSETS:
        assert rows[asset_id]["connected"] is False
        assert rows[asset_id]["peer"] is None
        assert rows[asset_id]["last_seen"] is not None, "last seen is kept after disconnect"
        (session,) = rows[asset_id]["sessions"]
        assert session["disconnected_at"] is not None
    assert headend.agents_connected == 0
    assert "der_agent_disconnected" in observer.names()


async def test_a_dropped_connection_closes_sessions_too(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1])
    await agent.channel.close()  # no half-close: the connection just goes away

    async def disconnected() -> bool:
        rows = await agents_by_asset(http)
        return rows[BESS_1]["connected"] is False and all(
            s["disconnected_at"] is not None for s in rows[BESS_1]["sessions"]
        )

    await eventually(disconnected, "the dropped stream's session is closed")


async def test_an_asset_registering_on_a_new_stream_is_taken_over_from_the_old_one(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    old = await connect_agent()
    await old.register([BESS_1, BESS_2], agent_id="gw-old")
    new = await connect_agent()
    await new.register([BESS_1], agent_id="gw-new")

    rows = await agents_by_asset(http)
    assert rows[BESS_1]["agent_id"] == "gw-new"
    assert rows[BESS_2]["agent_id"] == "gw-old", "the old stream keeps what it still serves"
    newest, older = rows[BESS_1]["sessions"]
    assert newest["agent_id"] == "gw-new" and newest["disconnected_at"] is None
    assert older["agent_id"] == "gw-old" and older["disconnected_at"] is not None

    # The old stream no longer serves BESS_1: its samples for it are dropped.
    await old.telemetry(1, [sample(BESS_1, mw=9.0)])
    assert await headend.storage.telemetry_history(BESS_1) == []

    # The old stream ending does not disconnect the asset the new stream holds.
    await old.end()
    rows = await agents_by_asset(http)
    assert rows[BESS_1]["connected"] is True
    assert rows[BESS_2]["connected"] is False


async def test_heartbeat_is_recorded_once_per_served_asset(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1, BESS_2])
    await agent.send(codec.agent_heartbeat("gw-1", utc_now(), 42.0))

    async def recorded() -> bool:
        responses = [await http.get(f"/heartbeat/{a}") for a in (BESS_1, BESS_2)]
        return all(r.status_code == 200 for r in responses)

    await eventually(recorded, "both served assets have a heartbeat")
    beat = (await http.get(f"/heartbeat/{BESS_2}")).json()
    assert beat["agent_id"] == "gw-1" and beat["uptime_s"] == 42.0
    history = (await http.get(f"/heartbeat/{BESS_1}/history")).json()
    assert len(history) == 1
    missing = await http.get(f"/heartbeat/{BESS_3}")
    assert missing.status_code == 404
    assert missing.json()["detail"] == f"no heartbeat received yet for asset {BESS_3}"


async def test_a_heartbeat_with_its_clock_out_of_range_is_stored_with_ours_and_stalls_nothing(
    http: httpx.AsyncClient, connect_agent: ConnectAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1])
    beat = codec.agent_heartbeat("gw-1", utc_now(), 7.0)
    beat.heartbeat.ts_us = 2**62  # about the year 146,000: no datetime holds it
    before = utc_now()
    await agent.send(beat)

    async def recorded() -> bool:
        return (await http.get(f"/heartbeat/{BESS_1}")).status_code == 200

    await eventually(recorded, "the heartbeat is stored")
    stored = (await http.get(f"/heartbeat/{BESS_1}")).json()
    assert stored["uptime_s"] == 7.0
    assert datetime.fromisoformat(stored["ts"]) >= before
    health = await http.get("/healthz")
    assert health.status_code == 200, health.json()
    warning = next(r for r in caplog.records if "out of range" in r.getMessage())
    assert "gw-1" in warning.getMessage() and "headend's clock" in warning.getMessage()


async def _connect_send_dispatch_and_end(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    """One agent's life that fires every observer hook once."""
    agent = await connect_agent()
    await agent.register([BESS_1])
    await agent.telemetry(1, [sample(BESS_1)])
    assert (await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 1.0})).status_code == 202
    await agent.recv_kind("setpoint")
    await agent.end()


async def test_observer_hooks_see_connect_telemetry_dispatch_and_disconnect(
    http: httpx.AsyncClient, connect_agent: ConnectAgent, observer: Observer
) -> None:
    await _connect_send_dispatch_and_end(http, connect_agent)

    names = observer.names()
    assert names == [
        "der_agent_connected",
        "der_telemetry_received",
        "der_dispatch_validated",
        "der_agent_disconnected",
    ]
    connected = observer.calls[0][1]
    assert [a.asset_id for a in connected["assets"]] == [BESS_1]
    assert connected["sessions"][0].asset_id == BESS_1
    assert observer.calls[2][1]["dispatch"].targets[0].asset_id == BESS_1


async def test_an_observer_that_raises_is_logged_by_name_and_the_others_still_see_everything(
    http: httpx.AsyncClient,
    connect_agent: ConnectAgent,
    observer: Observer,
    plugins: Plugins,
    caplog: pytest.LogCaptureFixture,
) -> None:
    exploded: list[str] = []
    # Registered after the recording observer, so pluggy orders it first.
    plugins.register(
        make_exploding_observer_plugin(exploded), "exploding", package="der-sdk-exploding"
    )
    with caplog.at_level(logging.ERROR, logger="der.plugins"):
        await _connect_send_dispatch_and_end(http, connect_agent)

    hooks = [
        "der_agent_connected",
        "der_telemetry_received",
        "der_dispatch_validated",
        "der_agent_disconnected",
    ]
    assert observer.names() == exploded == hooks
    assert [r.getMessage() for r in caplog.records if r.name == "der.plugins"] == [
        f"observer {hook} of plugin 'exploding' (der-sdk-exploding) raised; "
        "the other observers were called and the caller carries on"
        for hook in hooks
    ]
    stored = (await http.get(f"/telemetry/{BESS_1}/history")).json()
    assert len(stored) == 1, "ingest carried on past the failing observer"


async def test_an_agent_gone_while_its_sessions_are_stored_leaves_none_open(
    headend: Headend,
    http: httpx.AsyncClient,
    connect_agent: ConnectAgent,
    observer: Observer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = headend.storage
    original = storage.open_session
    writing = asyncio.Event()
    release = asyncio.Event()

    async def slow_open_session(session: Session) -> None:
        writing.set()
        await release.wait()
        await original(session)

    monkeypatch.setattr(storage, "open_session", slow_open_session)
    agent = await connect_agent()
    await agent.send(
        codec.agent_register(
            agent_id="gw-1", site_id=SITE_A, assets={BESS_1: "sim"}, sdk_version="t", plugins={}
        )
    )
    await asyncio.wait_for(writing.wait(), WAIT_S)
    rows = await agents_by_asset(http)
    assert rows[BESS_1]["connected"] is False, "not connected before its session is stored"
    await agent.channel.close()
    release.set()

    async def closed_on_record() -> bool:
        sessions = await storage.recent_sessions(BESS_1)
        return len(sessions) == 1 and sessions[0].disconnected_at is not None

    await eventually(closed_on_record, "the half-registered session is closed")
    assert headend.assets_connected == 0
    # gRPC may cancel the handler before or after the stalled write is released: either
    # the agent was never announced, or it was announced and then announced as gone.
    assert observer.names() in (
        [],
        ["der_agent_connected", "der_agent_disconnected"],
    ), "connect and disconnect hooks stay paired"


NOT_AN_AGENT_MESSAGE = b"\xff" * 8  # field 31 with a varint that never ends
"""Bytes that do not parse as ``AgentMessage`` (a hostile or broken peer)."""


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_first_message_that_is_not_an_agent_message_ends_the_stream_invalid_argument(
    headend: Headend, connect_agent: ConnectAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await connect_agent()
    await agent.send(NOT_AN_AGENT_MESSAGE)

    code, details = await agent.outcome()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "the first message must be Register; got a message of 8 bytes that does not parse "
        "as der.v1.AgentMessage"
    )
    assert _errors(caplog) == [], "no traceback for bad input"
    (warning,) = [r for r in caplog.records if "does not parse" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "127.0.0.1" in warning.getMessage()
    assert headend.agents_connected == 0


async def test_bytes_that_do_not_parse_after_register_end_the_stream_invalid_argument(
    headend: Headend,
    http: httpx.AsyncClient,
    connect_agent: ConnectAgent,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1], agent_id="gw-garbage")
    await agent.send(NOT_AN_AGENT_MESSAGE)

    code, details = await agent.outcome()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "a message of 8 bytes that does not parse as der.v1.AgentMessage"
    assert _errors(caplog) == [], "no traceback for bad input"
    (warning,) = [r for r in caplog.records if "does not parse" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "agent gw-garbage" in warning.getMessage()

    async def disconnected() -> bool:
        return (await agents_by_asset(http))[BESS_1]["connected"] is False

    await eventually(disconnected, "the refused stream's session is closed")


async def test_the_register_ack_says_telemetry_by_column_is_read_and_such_a_batch_is_stored(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    ack = await agent.register([BESS_1, BESS_2])
    assert ack.telemetry_columns
    batch = [
        sample(a, seconds=s, mw=float(s), status="idle") for s in (1, 2) for a in (BESS_1, BESS_2)
    ]
    stored = await agent.telemetry(1, batch, columns=True)
    assert (stored.seq, stored.stored_through) == (1, 1)
    history = (await http.get(f"/telemetry/{BESS_2}/history")).json()
    assert [(h["mw"], h["status"]) for h in history] == [(2.0, "idle"), (1.0, "idle")]


async def test_a_telemetry_batch_larger_than_the_streams_window_is_stored_whole(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    """A batch several times the stream's flow-control window (STREAM_WINDOW_BYTES)
    arrives in as many window updates as it needs."""
    agent = await connect_agent()
    await agent.register([BESS_1])
    batch = [sample(BESS_1, seconds=s, mw=float(s)) for s in range(1000)]
    assert codec.agent_telemetry(1, batch).ByteSize() > 4 * STREAM_WINDOW_BYTES
    stored = await agent.telemetry(1, batch)
    assert (stored.seq, stored.stored_through) == (1, 1)
    history = (await http.get(f"/telemetry/{BESS_1}/history", params={"limit": 2000})).json()
    assert sorted(h["mw"] for h in history) == [float(s) for s in range(1000)]


async def test_a_stream_waiting_for_its_next_message_keeps_no_reference_to_its_last_one(
    connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a batch is handled, nothing in the headend or gRPC still refers to the bytes
    it came in (grpc aio's request iterator kept the last message until the next one)."""
    read: list[bytes] = []
    parse = codec.parse_agent_message

    def keeping(raw: bytes) -> pb.AgentMessage:
        read.append(raw)
        return parse(raw)

    monkeypatch.setattr(codec, "parse_agent_message", keeping)
    agent = await connect_agent()
    await agent.register([BESS_1])
    stored = await agent.telemetry(1, [sample(BESS_1, seconds=s) for s in range(50)])
    assert stored.stored_through == 1
    assert parse(read[-1]).telemetry.seq == 1

    async def only_ours() -> bool:
        return sys.getrefcount(read[-1]) == 2  # the list's, and getrefcount's argument

    await eventually(only_ours, "the handled batch's bytes are no longer referred to")


async def test_a_wider_stream_window_set_by_its_variable_still_stores_a_large_batch_whole(
    inventory_path: Path, plugins: Plugins
) -> None:
    """``HEADEND_STREAM_WINDOW_KB`` (for agents clearing a backlog over a WAN link)."""
    config = make_config(inventory_path, HEADEND_STREAM_WINDOW_KB="64")
    assert config.stream_window_kb == 64
    headend = Headend(config, plugins=plugins)
    await headend.start()
    channel = grpc.aio.insecure_channel(headend.grpc_addr)
    try:
        agent = RawAgent(channel)
        await agent.register([BESS_1])
        batch = [sample(BESS_1, seconds=s, mw=float(s)) for s in range(1000)]
        stored = await agent.telemetry(1, batch)
        assert (stored.seq, stored.stored_through) == (1, 1)
    finally:
        await channel.close()
        await headend.stop()


async def test_telemetry_columns_that_do_not_fit_together_end_the_stream_naming_the_column(
    headend: Headend,
    http: httpx.AsyncClient,
    connect_agent: ConnectAgent,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1], agent_id="gw-columns")
    message = codec.agent_telemetry(7, [sample(BESS_1), sample(BESS_1, seconds=1)], columns=True)
    del message.telemetry.columns.mw[1]
    await agent.send(message)

    code, details = await agent.outcome()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "telemetry batch 7: telemetry columns: mw has 1 values for 2 samples"
    assert _errors(caplog) == [], "no traceback for bad input"
    assert (await http.get(f"/telemetry/{BESS_1}/history")).json() == []


async def test_an_event_local_report_and_ack_with_clocks_out_of_range_are_kept_with_ours(
    http: httpx.AsyncClient, connect_agent: ConnectAgent, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer whose clock is out of any datetime's range must not break its stream: each
    message is kept with the headend's clock and acknowledged, so the agent is never
    caught resending it on every reconnect."""
    agent = await connect_agent()
    await agent.register([BESS_1])
    out_of_range = 2**62  # about the year 146,000: no datetime holds it

    event = codec.agent_event(
        codec.AgentEventRecord(event_id="e-far", ts=utc_now(), kind="k", message="far")
    )
    event.event.ts_us = out_of_range
    await agent.send(event)
    assert (await agent.recv_kind("event_ack")).event_id == "e-far"

    report = codec.agent_local_dispatch(
        LocalDispatchReport(
            command_id="local-far", mw=0.2, ts=utc_now(), status="applied", asset_id=BESS_1
        )
    )
    report.local_dispatch.ts_us = out_of_range
    await agent.send(report)
    assert (await agent.recv_kind("local_dispatch_ack")).command_id == "local-far"

    created = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.4})
    setpoint = await agent.recv_kind("setpoint")
    ack = codec.agent_setpoint_ack(
        setpoint.command_id, "applied", [Allocation(asset_id=BESS_1, mw=0.4)]
    )
    ack.setpoint_ack.ts_us = out_of_range
    await agent.send(ack)
    assert (await agent.recv_kind("outcome_ack")).command_id == setpoint.command_id

    dispatch = (await http.get(f"/dispatch/{created.json()['dispatch_id']}")).json()
    assert dispatch["state"] == "applied"
    assert (await agent.telemetry(1, [sample(BESS_1)])).seq == 1  # the stream is alive
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warned = [r.getMessage() for r in caplog.records if "headend's clock" in r.getMessage()]
    assert len(warned) == 3, warned
