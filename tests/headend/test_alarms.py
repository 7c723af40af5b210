"""Alarms at the headend (docs/alarms.md): device conditions sent by agents as events over
the real gRPC link, acknowledged over REST, de-bounced, comms loss, metrics and the hook."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    SITE_A,
    SITE_A_ASSETS,
    WAIT_S,
    Observer,
    RawAgent,
    bearer,
    eventually,
    make_config,
    make_observer_plugin,
)
from prometheus_client.parser import text_string_to_metric_families

from der_sdk.plugins import load_plugins
from der_sdk.testing.services import require_tcp_service
from der_sdk.wire import codec
from der_sdk_headend import Headend
from der_sdk_headend.alarms import comms

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
DEBOUNCE_S = 0.5
COMMS_LOSS_S = 0.3


def condition(
    kind: str,
    code: str,
    *,
    asset_id: str = BESS_1,
    seconds: float = 0.0,
    severity: str = "major",
    text: str = "",
    event_id: str | None = None,
) -> codec.AgentEventRecord:
    """A ``condition_raised`` / ``condition_cleared`` event as the agent sends it."""
    return codec.AgentEventRecord(
        event_id=event_id or str(uuid.uuid4()),
        ts=T0 + timedelta(seconds=seconds),
        kind=f"condition_{kind}",
        message=text or f"{code} {kind}",
        asset_id=asset_id,
        data={"code": code, "severity": severity},
    )


async def send(agent: RawAgent, event: codec.AgentEventRecord) -> None:
    """Send ``event`` and wait for its acknowledgement (it is stored, alarm applied)."""
    await agent.send(codec.agent_event(event))
    ack = await agent.recv_kind("event_ack")
    assert ack.event_id == event.event_id


async def alarms(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await http.get("/alarms", params=params)
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows


def changes(observer: Observer) -> list[tuple[str, str, int]]:
    """``der_alarm_changed`` calls: (change, code, raise_count)."""
    return [
        (c["change"], c["alarm"].code, c["alarm"].raise_count)
        for name, c in observer.calls
        if name == "der_alarm_changed"
    ]


@pytest.fixture
def headend_env() -> dict[str, str]:
    """Short de-bounce and comms-loss times for the ``headend`` fixture."""
    return {
        "HEADEND_ALARM_DEBOUNCE_S": str(DEBOUNCE_S),
        "HEADEND_COMMS_LOSS_ALARM_S": str(COMMS_LOSS_S),
    }


@pytest.fixture
async def channel(headend: Headend) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{headend.grpc_port}")
    yield ch
    await ch.close()


async def registered(
    channel: grpc.aio.Channel, assets: tuple[str, ...] = SITE_A_ASSETS
) -> RawAgent:
    agent = RawAgent(channel)
    await agent.register(assets)
    return agent


# --------------------------------------------------------------------------- raise, clear


async def test_a_raised_condition_is_an_active_alarm_and_its_clear_clears_it(
    headend: Headend,
    http: httpx.AsyncClient,
    channel: grpc.aio.Channel,
    observer: Observer,
) -> None:
    agent = await registered(channel)
    await send(agent, condition("raised", "inverter_trip", text="inverter tripped on DC fault"))

    (alarm,) = await alarms(http)
    assert alarm["asset_id"] == BESS_1 and alarm["site_id"] == SITE_A
    assert (alarm["code"], alarm["severity"], alarm["state"]) == (
        "inverter_trip",
        "major",
        "active",
    )
    assert alarm["text"] == "inverter tripped on DC fault"
    assert alarm["raised_at"] == "2026-01-05T08:00:00Z"
    assert alarm["cleared_at"] is None and alarm["acknowledged_at"] is None
    assert alarm["raise_count"] == 1
    assert (await http.get(f"/alarms/{alarm['alarm_id']}")).json() == alarm

    await send(agent, condition("cleared", "inverter_trip", seconds=60))
    (cleared,) = await alarms(http)
    assert cleared["alarm_id"] == alarm["alarm_id"]
    assert cleared["state"] == "cleared"
    assert cleared["cleared_at"] == "2026-01-05T08:01:00Z"
    assert cleared["text"] == "inverter tripped on DC fault", "the clear keeps what happened"
    # The events themselves are in the record too.
    stored = await headend.storage.events(asset_id=BESS_1)
    assert [e.kind for e in stored] == ["condition_cleared", "condition_raised"]
    # Told to plugins: raised at once, cleared once it stayed cleared for the de-bounce time.
    assert changes(observer) == [("raised", "inverter_trip", 1)]

    async def told_cleared() -> bool:
        return changes(observer)[-1][0] == "cleared"

    await eventually(told_cleared, "the clear is told after the de-bounce time")
    assert changes(observer) == [("raised", "inverter_trip", 1), ("cleared", "inverter_trip", 1)]


async def test_a_raise_after_the_de_bounce_time_opens_a_new_alarm(
    http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    agent = await registered(channel)
    await send(agent, condition("raised", "over_temp", severity="warning"))
    await send(agent, condition("cleared", "over_temp", seconds=10))
    await send(agent, condition("raised", "over_temp", seconds=10 + DEBOUNCE_S + 1))

    newer, older = await alarms(http)
    assert (newer["state"], older["state"]) == ("active", "cleared")
    assert newer["alarm_id"] != older["alarm_id"]
    assert newer["raise_count"] == older["raise_count"] == 1
    assert await alarms(http, state="active") == [newer]


async def test_a_raise_while_active_changes_nothing_unless_its_severity_changes(
    http: httpx.AsyncClient, channel: grpc.aio.Channel, observer: Observer
) -> None:
    agent = await registered(channel)
    await send(agent, condition("raised", "low_soc", severity="warning", text="SoC 4 %"))
    await send(agent, condition("raised", "low_soc", seconds=1, severity="warning", text="SoC 4 %"))
    await send(
        agent, condition("raised", "low_soc", seconds=2, severity="critical", text="SoC 1 %")
    )

    (alarm,) = await alarms(http)
    assert (alarm["severity"], alarm["text"], alarm["raise_count"]) == ("critical", "SoC 1 %", 1)
    assert changes(observer) == [("raised", "low_soc", 1), ("updated", "low_soc", 1)]


async def test_a_condition_without_a_code_or_severity_or_served_asset_is_stored_but_no_alarm(
    headend: Headend,
    http: httpx.AsyncClient,
    channel: grpc.aio.Channel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = await registered(channel, (BESS_1,))
    bad = [
        condition("raised", "trip", severity="fatal"),
        condition("raised", ""),
        condition("raised", "x" * 101),
        condition("raised", "trip", asset_id=BESS_2),  # not served by this stream
    ]
    with caplog.at_level(logging.WARNING, logger="der.headend.alarms"):
        for event in bad:
            await send(agent, event)  # acknowledged all the same
    assert await alarms(http) == []
    assert len(await headend.storage.events(kind="condition_raised")) == len(bad)
    warnings = [r.getMessage() for r in caplog.records if r.name == "der.headend.alarms"]
    assert len(warnings) == len(bad)
    assert "data.severity 'fatal' is not one of info, warning, major, critical" in warnings[0]
    assert "data.code '' is not a string of 1 to 100 characters" in warnings[1]
    assert "names no asset its agent serves" in warnings[3]


# --------------------------------------------------------------------------- duplicates


async def test_an_event_sent_again_changes_the_alarm_once_on_any_stream(
    headend: Headend, http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    raised = condition("raised", "inverter_trip")
    cleared = condition("cleared", "inverter_trip", seconds=0.1)
    agent = await registered(channel)
    await send(agent, raised)
    await send(agent, cleared)
    await agent.end()

    # The agent did not hear the acks (lost with the link): it sends both again on its
    # next stream, where the headend has not seen them (events_seen is per stream).
    again = await registered(channel)
    await send(again, raised)
    await send(again, cleared)
    await send(again, raised)

    (alarm,) = await alarms(http, code="inverter_trip")
    assert alarm["state"] == "cleared"
    assert alarm["raise_count"] == 1, "the raise sent again did not re-raise the alarm"


async def test_an_alarm_write_that_fails_holds_the_event_back_until_it_is_stored_once(
    headend: Headend,
    http: httpx.AsyncClient,
    channel: grpc.aio.Channel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = headend.storage
    original = storage.update_alarm
    failures: list[str] = []

    async def fails_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append("storage down")
            raise ConnectionError("storage down")
        return await original(*args, **kwargs)

    monkeypatch.setattr(storage, "update_alarm", fails_once)
    agent = await registered(channel)
    await send(agent, condition("raised", "inverter_trip"))  # acknowledged after the retry

    assert failures == ["storage down"]
    (alarm,) = await alarms(http)
    assert (alarm["state"], alarm["raise_count"]) == ("active", 1)
    stored = await storage.events(kind="condition_raised")
    assert len(stored) == 1, "the event was stored once, after its alarm"


# --------------------------------------------------------------------------- flapping


async def test_a_flapping_condition_is_one_alarm_with_its_raise_count_and_no_storm(
    http: httpx.AsyncClient, channel: grpc.aio.Channel, observer: Observer
) -> None:
    agent = await registered(channel)
    flaps = 40
    for i in range(flaps):  # 40 raises and clears within one second
        await send(agent, condition("raised", "grid_fault", seconds=i * 0.025))
        await send(agent, condition("cleared", "grid_fault", seconds=i * 0.025 + 0.01))

    (alarm,) = await alarms(http)
    assert alarm["state"] == "cleared"
    assert alarm["raise_count"] == flaps
    assert alarm["raised_at"] == "2026-01-05T08:00:00Z", "the first raise stays the alarm's start"

    async def settled() -> bool:
        return len(changes(observer)) >= 2

    await eventually(settled, "the settled clear is told")
    assert changes(observer) == [("raised", "grid_fault", 1), ("cleared", "grid_fault", flaps)]


# --------------------------------------------------------------------------- acknowledge


async def test_an_operator_acknowledges_an_alarm_once_and_the_trail_says_who(
    auth_headend: Headend,
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    observer: Observer,
) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{auth_headend.grpc_port}")
    try:
        agent = RawAgent(channel)
        await agent.register(SITE_A_ASSETS)
        await send(agent, condition("raised", "inverter_trip", asset_id=BESS_2))
    finally:
        await channel.close()
    viewer, operator = bearer(role_tokens["viewer"]), bearer(role_tokens["operator"])
    (alarm,) = (await auth_http.get("/alarms", headers=viewer)).json()
    alarm_id = alarm["alarm_id"]

    refused = await auth_http.post(f"/alarms/{alarm_id}/ack", headers=viewer)
    assert refused.status_code == 403, refused.text
    assert (await auth_http.get(f"/alarms/{alarm_id}", headers=viewer)).json() == alarm

    acked = await auth_http.post(f"/alarms/{alarm_id}/ack", headers=operator)
    assert acked.status_code == 200, acked.text
    body = acked.json()
    assert "test operator" in body["acknowledged_by"]
    assert body["acknowledged_at"] is not None and body["state"] == "active"
    assert "Already-Acknowledged" not in acked.headers

    again = await auth_http.post(f"/alarms/{alarm_id}/ack", headers=bearer(role_tokens["admin"]))
    assert again.status_code == 200
    assert again.headers["Already-Acknowledged"] == "true"
    assert again.json() == body, "the first acknowledgement is kept"

    listed = await auth_http.get("/alarms", params={"acknowledged": "true"}, headers=viewer)
    assert [a["alarm_id"] for a in listed.json()] == [alarm_id]
    assert (await auth_http.get("/alarms?acknowledged=false", headers=viewer)).json() == []

    trail = (
        await auth_http.get(
            "/audit", params={"action": "alarm.ack"}, headers=bearer(role_tokens["admin"])
        )
    ).json()
    assert [(r["outcome"], r["details"]["alarm_id"]) for r in trail] == [
        ("already", alarm_id),
        ("ok", alarm_id),
    ]
    assert trail[1]["actor"]["role"] == "operator"
    assert [c for c, _, _ in changes(observer)] == ["raised", "acknowledged"]


async def test_rest_refuses_bad_filters_by_name_and_unknown_alarms_with_404(
    http: httpx.AsyncClient,
) -> None:
    for params, named in (
        ({"state": "open"}, "`state`"),
        ({"severity": "fatal"}, "`severity`"),
        ({"acknowledged": "maybe"}, "`acknowledged`"),
        ({"limit": "0"}, "`limit`"),
    ):
        response = await http.get("/alarms", params=params)
        assert response.status_code == 400, (params, response.text)
        assert named in response.text, response.text
    state_error = (await http.get("/alarms", params={"state": "open"})).text
    assert "'open'" in state_error and "active, cleared" in state_error
    for response in (
        await http.get("/alarms/no-such-alarm"),
        await http.post("/alarms/no-such-alarm/ack"),
    ):
        assert response.status_code == 404, response.text
        assert "no-such-alarm" in response.text


async def test_alarms_filter_by_site_asset_severity_and_page_with_after(
    http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    agent = await registered(channel)
    for i, asset in enumerate(SITE_A_ASSETS):
        await send(
            agent, condition("raised", f"code{i}", asset_id=asset, seconds=i, severity="info")
        )
    await send(agent, condition("raised", "fire", asset_id=BESS_1, seconds=9, severity="critical"))

    everything = await alarms(http)
    assert [a["code"] for a in everything] == ["fire", "code2", "code1", "code0"]
    assert [a["code"] for a in await alarms(http, severity="critical")] == ["fire"]
    assert [a["code"] for a in await alarms(http, asset_id=BESS_1)] == ["fire", "code0"]
    assert len(await alarms(http, site_id=SITE_A)) == 4
    first = await alarms(http, limit=2)
    rest = await alarms(http, limit=2, after=first[-1]["alarm_id"])
    assert first + rest == everything


# --------------------------------------------------------------------------- comms loss


async def test_an_agent_away_past_the_grace_time_raises_comms_loss_cleared_when_it_is_back(
    headend: Headend, http: httpx.AsyncClient, channel: grpc.aio.Channel, observer: Observer
) -> None:
    agent = await registered(channel, (BESS_1, BESS_2))
    await agent.end()

    async def raised() -> bool:
        return len(await alarms(http, code="comms_loss", state="active")) == 2

    await eventually(raised, "comms_loss is raised for both assets")
    rows = await alarms(http, code="comms_loss")
    assert sorted(a["asset_id"] for a in rows) == sorted([BESS_1, BESS_2])
    assert {a["severity"] for a in rows} == {"major"}

    back = await registered(channel, (BESS_1, BESS_2))

    async def cleared() -> bool:
        return await alarms(http, code="comms_loss", state="active") == []

    await eventually(cleared, "comms_loss clears when the agent is back")
    assert len(await alarms(http, code="comms_loss")) == 2, "the same alarms, cleared"
    await back.end()


async def test_a_comms_loss_clear_that_fails_is_tried_again(
    headend: Headend,
    http: httpx.AsyncClient,
    channel: grpc.aio.Channel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(comms, "RETRY_S", 0.05)
    agent = await registered(channel, (BESS_1,))
    await agent.end()

    async def raised() -> bool:
        return len(await alarms(http, code="comms_loss", state="active")) == 1

    await eventually(raised, "comms_loss is raised")
    storage = headend.storage
    original = storage.update_alarm
    failures: list[str] = []

    async def fails_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append("storage down")
            raise ConnectionError("storage down")
        return await original(*args, **kwargs)

    monkeypatch.setattr(storage, "update_alarm", fails_once)
    await registered(channel, (BESS_1,))

    async def cleared() -> bool:
        return await alarms(http, code="comms_loss", state="active") == []

    await eventually(cleared, "the clear is tried again and succeeds")
    assert failures == ["storage down"]


async def test_an_agent_back_within_the_grace_time_raises_no_comms_loss(
    http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    agent = await registered(channel, (BESS_1,))
    await agent.end()
    await registered(channel, (BESS_1,))
    await asyncio.sleep(COMMS_LOSS_S * 3)
    assert await alarms(http, code="comms_loss") == []


# --------------------------------------------------------------------------- metrics


async def test_metrics_count_active_alarms_by_severity(
    http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    agent = await registered(channel)
    await send(agent, condition("raised", "a", severity="critical"))
    await send(agent, condition("raised", "b", asset_id=BESS_2, severity="critical"))
    await send(agent, condition("raised", "c", severity="warning"))
    await send(agent, condition("cleared", "c", seconds=1))

    text = (await http.get("/metrics")).text
    values = {
        s.labels["severity"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "der_alarms_active"
    }
    assert values == {"info": 0, "warning": 0, "major": 0, "critical": 2}


# --------------------------------------------------------------------------- restarts


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A storage that outlives a headend: an SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'der.db'}"
        return
    require_tcp_service("PostgreSQL", "127.0.0.1", 5432)
    postgres = pytest.importorskip("der_sdk_postgres.testing", reason="needs der-sdk-postgres")
    async with postgres.temporary_database() as url:
        yield url


async def test_alarms_survive_restarts_of_headend_and_agent_with_nothing_duplicated(
    inventory_path: Path, database_url: str, observer: Observer
) -> None:
    plugins = load_plugins(env={}, extra=[("test-observer", make_observer_plugin(observer))])
    config = make_config(
        inventory_path,
        DATABASE_URL=database_url,
        HEADEND_ALARM_DEBOUNCE_S=str(DEBOUNCE_S),
        HEADEND_COMMS_LOSS_ALARM_S="3600",
    )
    raised = condition("raised", "inverter_trip", text="trip")

    async def run(scenario: Any) -> Any:
        headend = Headend(config, plugins=plugins)
        await headend.start()
        try:
            async with httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S) as http:
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{headend.grpc_port}")
                try:
                    return await scenario(http, await registered(channel))
                finally:
                    await channel.close()
        finally:
            await headend.stop()

    async def first(http: httpx.AsyncClient, agent: RawAgent) -> dict[str, Any]:
        await send(agent, raised)
        (alarm,) = await alarms(http)
        acked = await http.post(f"/alarms/{alarm['alarm_id']}/ack")
        assert acked.status_code == 200
        body: dict[str, Any] = acked.json()
        return body

    before = await run(first)

    async def after_restart(http: httpx.AsyncClient, agent: RawAgent) -> None:
        # The agent's ack was lost: it sends the raise again; and a restarted agent's
        # adapter raises its active condition anew, with a new event id.
        await send(agent, raised)
        await send(agent, condition("raised", "inverter_trip", seconds=30, text="trip"))
        assert await alarms(http) == [before], "the same alarm, acknowledged, nothing new"
        await send(agent, condition("cleared", "inverter_trip", seconds=60))
        await send(agent, raised)  # sent again after the clear: still applied once

    await run(after_restart)

    async def finally_cleared(http: httpx.AsyncClient, agent: RawAgent) -> None:
        (alarm,) = await alarms(http)
        assert (alarm["alarm_id"], alarm["state"], alarm["raise_count"]) == (
            before["alarm_id"],
            "cleared",
            1,
        )
        assert alarm["acknowledged_by"] == before["acknowledged_by"]

    await run(finally_cleared)
    assert [c for c, _, _ in changes(observer)] == ["raised", "acknowledged"]


async def test_a_comms_loss_raised_before_a_restart_clears_when_the_agent_is_back_after(
    inventory_path: Path, database_url: str
) -> None:
    config = make_config(
        inventory_path, DATABASE_URL=database_url, HEADEND_COMMS_LOSS_ALARM_S=str(COMMS_LOSS_S)
    )
    for back in (False, True):
        headend = Headend(config, plugins=load_plugins(env={}))
        await headend.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{headend.grpc_port}")
        try:
            async with httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S) as http:
                agent = await registered(channel, (BESS_1,))
                if not back:
                    await agent.end()

                    async def raised() -> bool:
                        return len(await alarms(http, code="comms_loss", state="active")) == 1

                    await eventually(raised, "comms_loss is raised")
                    continue

                async def cleared() -> bool:
                    rows = await alarms(http, code="comms_loss")
                    return [r["state"] for r in rows] == ["cleared"]

                await eventually(cleared, "the comms_loss of before the restart clears")
        finally:
            await channel.close()
            await headend.stop()


# --------------------------------------------------------------------------- the docs

DOC = Path(__file__).resolve().parents[2] / "docs" / "alarms.md"
DOC_ALARM_ID = "5c0e3f0b9d9e4c38a8a3f2f4e1d2c3b4"


async def test_the_curl_examples_of_the_alarms_doc_answer_as_it_says(
    http: httpx.AsyncClient, channel: grpc.aio.Channel
) -> None:
    text = DOC.read_text()
    agent = await registered(channel)
    await send(agent, condition("raised", "inverter_trip", text="inverter tripped on DC fault"))
    (alarm,) = await alarms(http)
    block = re.search(r"```json\n(.*?)```", text, flags=re.S)
    assert block is not None
    shown = json.loads(block[1])
    assert list(shown[0]) == list(alarm), "the doc shows every field, in order"

    commands = re.findall(r"^curl (.*)$", text, flags=re.M)
    assert len(commands) == 5
    for command in commands:
        method = "POST" if command.startswith("-X POST ") else "GET"
        url = command.removeprefix("-X POST ").strip('"').replace("$H", "")
        response = await http.request(method, url.replace(DOC_ALARM_ID, alarm["alarm_id"]))
        assert response.status_code == 200, (command, response.text)
    acked = (await http.get(f"/alarms/{alarm['alarm_id']}")).json()
    assert acked["acknowledged_at"] is not None, "the doc's POST acknowledged it"

    quoted = re.search(r"``(query parameter `state`: [^`]*?)``", text)
    assert quoted is not None
    refused = await http.get("/alarms", params={"state": "open"})
    assert refused.json()["detail"] == quoted[1]
    metrics = (await http.get("/metrics")).text
    for line in re.findall(r"^(der_alarms_active\{severity=\"\w+\"\}) ", text, flags=re.M):
        assert line in metrics
