"""The console's live stream (``GET /console/events``): ingest's samples and dispatch
changes reach an open stream, slow clients stay bounded, and only tokens get in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from headend_kit import BESS_1, BESS_2, PV_1, SITE_A, WAIT_S, ConnectAgent, bearer

from der_sdk.models import Dispatch, DispatchTarget, TelemetrySample
from der_sdk.wire import codec
from der_sdk_headend import Headend
from der_sdk_headend.audit import ANONYMOUS
from der_sdk_headend.console import events
from der_sdk_headend.console.events import LiveHub, Subscription

Event = tuple[str, str]


class SseReader:
    """Reads ``event:``/``data:`` pairs (and comments) off a streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> Event:
        name, data = "message", []
        async with asyncio.timeout(WAIT_S):
            async for line in self._lines:
                if line == "":
                    if data or name != "message":
                        return name, "\n".join(data)
                    continue
                if line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)
        raise AssertionError("the stream ended")

    async def until(self, name: str) -> Any:
        while True:
            event, data = await self.next()
            if event == name:
                return json.loads(data) if data[:1] in "[{" else data


@asynccontextmanager
async def stream(
    http: httpx.AsyncClient, headers: dict[str, str] | None = None, **params: str
) -> AsyncIterator[SseReader]:
    async with http.stream("GET", "/console/events", params=params, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseReader(response)


def now_sample(
    asset_id: str, mw: float, seconds: int = 0, site_id: str = SITE_A
) -> TelemetrySample:
    """A sample of ``asset_id`` taken now (plus ``seconds``): fresh enough for ingest."""
    return TelemetrySample(
        asset_id=asset_id,
        site_id=site_id,
        ts=datetime.now(UTC) + timedelta(seconds=seconds),
        mw=mw,
    )


async def test_an_ingested_sample_arrives_on_the_stream(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1, BESS_2])
    async with stream(http, assets=BESS_1) as sse:
        await agent.telemetry(1, [now_sample(BESS_1, 1.25), now_sample(BESS_2, 0.5)])
        samples = await sse.until("samples")

    assert [(s["asset_id"], s["mw"]) for s in samples] == [(BESS_1, 1.25)]


async def test_samples_are_coalesced_per_asset_latest_wins(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1])
    async with stream(http, sites=SITE_A) as sse:
        for seq in range(1, 21):
            await agent.telemetry(seq, [now_sample(BESS_1, seq / 10, seconds=seq)])
        seen: list[float] = []
        while not seen or seen[-1] != 2.0:
            seen += [s["mw"] for s in await sse.until("samples")]

    assert len(seen) < 20, "each flush sends the latest sample of an asset, not every one"


async def test_a_dispatch_state_change_arrives_on_the_stream(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_2])
    async with stream(http, dispatch="1") as sse:
        response = await http.post("/dispatch", json={"asset_id": BESS_2, "mw": 0.5})
        assert response.status_code == 202, response.text
        dispatch_id = response.json()["dispatch_id"]
        sent = await sse.until("dispatch")
        assert [(d["dispatch_id"], d["state"]) for d in sent] == [(dispatch_id, "sent")]

        setpoint = await agent.recv_kind("setpoint")
        await agent.send(
            codec.agent_setpoint_ack(
                setpoint.command_id, "applied", [codec.Allocation(asset_id=BESS_2, mw=0.5)]
            )
        )
        applied = await sse.until("dispatch")

    assert [(d["dispatch_id"], d["state"]) for d in applied] == [(dispatch_id, "applied")]


async def test_a_stream_for_other_assets_gets_no_dispatch_of_this_one(
    headend: Headend, http: httpx.AsyncClient
) -> None:
    async with stream(http, assets=PV_1, dispatch="1") as sse:
        response = await http.post("/dispatch", json={"asset_id": BESS_2, "mw": 0.5})
        assert response.status_code == 202
        response = await http.post("/dispatch", json={"asset_id": PV_1, "mw": 1.0})
        assert response.status_code == 202
        got = await sse.until("dispatch")

    assert [d["asset_id"] for d in got] == [PV_1]


async def test_a_client_that_does_not_read_stays_bounded_and_gets_resync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attached: list[object] = []
    hub = LiveHub(attach=attached.append)
    monkeypatch.setattr(events, "SLOW_CLIENT_S", 3600.0)
    client = hub.connect(Subscription(assets=None, dispatch=True, dispatch_all=True), ANONYMOUS)
    try:
        base = datetime.now(UTC)
        for i in range(20_000):  # 50 assets, 400 samples each, never read
            hub.offer_sample(
                TelemetrySample(asset_id=f"asset-{i % 50}", site_id=SITE_A, ts=base, mw=float(i))
            )
            if i % 1000 == 0:
                hub.flush()
        hub.flush()
        assert client.pending == 50, "one sample per asset is held, the latest"
        assert json.loads(client.samples["asset-49"])["mw"] == 19_999.0

        for i in range(events.MAX_PENDING_DISPATCHES + 1):
            hub.offer_dispatch(_dispatch(f"d-{i}"))
        hub.flush()
        assert client.resync and client.pending == 0, "too much held: dropped to resync"
        for i in range(1000):
            hub.offer_dispatch(_dispatch(f"more-{i}"))
            hub.offer_sample(_at("asset-1", base))
        hub.flush()
        assert client.pending == 0, "a client dropped to resync gets nothing until it reads"

        taken = client.take()
        assert [e.event for e in taken] == ["resync"]
        hub.offer_sample(_at("asset-1", base))
        hub.flush()
        assert client.pending == 1, "after reading it gets updates again"
    finally:
        await hub.close()
    assert attached[0] == hub.offer_sample and attached[-1] is None


async def test_a_stalled_stream_holds_at_most_one_sample_per_asset(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1, BESS_2])
    async with http.stream("GET", "/console/events", params={"assets": "*"}) as response:
        assert response.status_code == 200
        for seq in range(1, 201):  # the stream is never read
            await agent.telemetry(
                seq, [now_sample(BESS_1, 1.0, seconds=seq), now_sample(BESS_2, 1.0, seconds=seq)]
            )
        (client,) = headend.live_hub.clients
        assert client.pending <= 2
    await asyncio.sleep(0.1)
    assert not headend.live_hub.clients, "a closed stream leaves the hub"
    assert headend.ingest.latest_listener is None, "no console: ingest pays nothing"


async def test_an_unauthenticated_stream_is_refused(
    auth_headend: Headend, auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    refused = await auth_http.get("/console/events")
    assert refused.status_code == 401
    wrong = await auth_http.get("/console/events", headers=bearer("der_wrong"))
    assert wrong.status_code == 401

    async with stream(auth_http, headers=bearer(role_tokens["viewer"]), assets=BESS_1) as sse:
        auth_headend.live_hub.offer_sample(now_sample(BESS_1, 0.75))
        samples = await sse.until("samples")
    assert samples[0]["mw"] == 0.75


async def test_unknown_ids_in_the_query_are_refused(http: httpx.AsyncClient) -> None:
    response = await http.get("/console/events", params={"assets": "nope"})
    assert response.status_code == 400
    assert "unknown asset id(s) nope" in response.text
    response = await http.get("/console/events", params={"dispatch": "maybe"})
    assert response.status_code == 400


async def test_the_stream_says_bye_when_the_headend_stops(
    headend: Headend, http: httpx.AsyncClient
) -> None:
    async with stream(http, assets=BESS_1) as sse:
        stopping = asyncio.create_task(headend.stop())
        reason = await sse.until("bye")
        await stopping
    assert "stopping" in reason


def _dispatch(dispatch_id: str) -> Dispatch:
    now = datetime.now(UTC)
    return Dispatch(
        dispatch_id=dispatch_id,
        asset_id=BESS_1,
        mw=1.0,
        targets=[DispatchTarget(asset_id=BESS_1, mw=1.0)],
        state="submitted",
        created_at=now,
        updated_at=now,
    )


def _at(asset_id: str, ts: datetime) -> TelemetrySample:
    return TelemetrySample(asset_id=asset_id, site_id=SITE_A, ts=ts, mw=1.0)


async def test_samples_other_replicas_stored_reach_the_stream_through_merge_latest(
    headend: Headend, http: httpx.AsyncClient
) -> None:
    async with stream(http, assets=BESS_2) as sse:
        taken = headend.ingest.merge_latest([now_sample(BESS_2, -0.25)])
        samples = await sse.until("samples")

    assert taken == 1
    assert [(s["asset_id"], s["mw"]) for s in samples] == [(BESS_2, -0.25)]


async def test_in_bus_mode_dispatches_changed_elsewhere_are_reread_from_storage(
    headend: Headend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "DISPATCH_POLL_S", 0.05)
    hub = LiveHub(attach=lambda _: None, storage=headend.storage, poll_dispatches=True)
    hub.flush_interval_s = 0.05
    client = hub.connect(
        Subscription(assets=frozenset(), dispatch=True, dispatch_all=True), ANONYMOUS
    )
    try:
        elsewhere = _dispatch("from-another-replica")
        await headend.storage.save_dispatch(elsewhere)  # as another replica would
        async with asyncio.timeout(WAIT_S):
            while not await client.wait(WAIT_S) or not client.dispatches:
                client.take()
        assert list(client.dispatches) == ["from-another-replica"]
        client.take()
        await asyncio.sleep(0.3)
        assert not client.dispatches, "an unchanged record is not sent again"
    finally:
        await hub.close()


async def test_a_revoked_token_ends_its_stream(
    auth_headend: Headend,
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "RECHECK_S", 0.1)
    viewer = auth_headend.rest_auth.identify(role_tokens["viewer"])
    assert viewer is not None
    async with stream(auth_http, headers=bearer(role_tokens["viewer"]), assets=BESS_1) as sse:
        revoked = await auth_http.delete(
            f"/tokens/{viewer.id}", headers=bearer(role_tokens["admin"])
        )
        assert revoked.status_code == 200, revoked.text
        reason = await sse.until("bye")
    assert "revoked" in reason
