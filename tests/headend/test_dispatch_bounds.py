"""No dispatch can lock an agent out.

``POST /dispatch`` refuses time fields beyond :data:`DISPATCH_HORIZON_S` with a 400 naming
the field and the bound; a record stored out of bounds by an older version is settled
``failed`` at start; and delivery on register is isolated per dispatch, so one dispatch
that cannot be built never keeps an agent from registering, storing telemetry and getting
its other commands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    BESS_3,
    SITE_A_ASSETS,
    WAIT_S,
    RawAgent,
    make_config,
    make_storage_plugin,
    sample,
)

from der_sdk.models import (
    DISPATCH_HORIZON_S,
    Dispatch,
    DispatchEvent,
    DispatchRequest,
    DispatchTarget,
    utc_now,
)
from der_sdk.plugins import Plugins, load_plugins
from der_sdk.storage.contract import open_storage
from der_sdk.storage.memory import MemoryStorage
from der_sdk.testing.services import require_tcp_service
from der_sdk_headend import Headend
from der_sdk_headend.dispatch import InvalidDispatchError

BOUND = str(DISPATCH_HORIZON_S)  # every refusal names it


def _offset_iso(at: datetime, hours: int) -> str:
    return at.astimezone(timezone(timedelta(hours=hours))).isoformat()


# ----------------------------------------------------------------------------- the API


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"duration_s": 1e12}, ("duration_s", BOUND)),
        ({"duration_s": DISPATCH_HORIZON_S + 0.5}, ("duration_s", BOUND)),
        ({"duration_s": -1}, ("duration_s", "> 0")),
        ({"ttl_s": 1e300}, ("ttl_s", BOUND)),
        ({"ttl_s": 0}, ("ttl_s", "> 0")),
        ({"expires_at": "9999-12-31T23:59:59-12:00"}, ("expires_at", BOUND)),
        ({"expires_at": "9999-12-31T23:59:59+14:00"}, ("expires_at", BOUND)),
        ({"expires_at": "0001-01-01T00:00:00+14:00"}, ("expires_at", "in the past")),
        ({"expires_at": "0001-01-01T00:00:00-12:00"}, ("expires_at", "in the past")),
        ({"expires_at": "one year past"}, ("expires_at", BOUND)),
    ],
)
async def test_a_time_field_out_of_bounds_is_refused_with_400_naming_the_field_and_bound(
    http: httpx.AsyncClient, body: dict[str, Any], named: tuple[str, ...]
) -> None:
    if body.get("expires_at") == "one year past":
        late = utc_now() + timedelta(seconds=DISPATCH_HORIZON_S + 60)
        body = {"expires_at": _offset_iso(late, -12)}
    response = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.3, **body})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    for words in named:
        assert words in detail, detail
    assert (await http.get("/dispatch/history")).json() == [], "nothing was recorded"


async def test_time_fields_at_their_bounds_are_accepted_in_any_time_zone(
    http: httpx.AsyncClient,
) -> None:
    for body in (
        {"duration_s": DISPATCH_HORIZON_S},
        {"ttl_s": DISPATCH_HORIZON_S},
        {"expires_at": _offset_iso(utc_now() + timedelta(days=364), 14)},
        {"expires_at": _offset_iso(utc_now() + timedelta(days=364), -12)},
    ):
        response = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.3, **body})
        assert response.status_code == 202, (body, response.text)
        record = response.json()
        if "expires_at" in body:
            given = datetime.fromisoformat(body["expires_at"])
            assert datetime.fromisoformat(record["expires_at"]) == given
            assert record["expires_at"].endswith("Z"), "stored in UTC"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e300])
@pytest.mark.parametrize("name", ["duration_s", "ttl_s"])
async def test_the_dispatcher_refuses_out_of_bounds_spans_in_requests_built_in_code(
    headend: Headend, name: str, value: float
) -> None:
    request = DispatchRequest(mw=0.3, asset_id=BESS_1, **{name: value})  # not decoded: no Meta
    with pytest.raises(InvalidDispatchError, match=f"{name} must be .* at most {BOUND} seconds"):
        await headend.dispatcher.create(request)
    assert await headend.storage.dispatch_history() == []


async def test_the_openapi_schema_declares_the_bounds_of_duration_s_and_ttl_s(
    http: httpx.AsyncClient,
) -> None:
    schema = (await http.get("/schema/openapi.json")).json()
    fields = schema["components"]["schemas"]["DispatchRequest"]["properties"]
    for name in ("duration_s", "ttl_s"):
        # Litestar puts the bound beside the oneOf of number and null (it applies to numbers
        # only) and leaves out gt=0, which the description states.
        assert fields[name]["maximum"] == DISPATCH_HORIZON_S, fields[name]
        assert f"more than 0 and at most {BOUND}" in fields[name]["description"]


# ----------------------------------------------------------------------------- storage


@dataclass
class Backend:
    """A storage backend a test writes records into before a headend starts on it."""

    url: str
    plugins: Plugins
    memory: MemoryStorage | None = None

    async def write(self, dispatches: Sequence[Dispatch]) -> None:
        storage = self.memory or open_storage(self.url, self.plugins)
        await storage.open()
        try:
            for dispatch in dispatches:
                event = DispatchEvent(
                    dispatch_id=dispatch.dispatch_id, state=dispatch.state, ts=dispatch.created_at
                )
                await storage.record_dispatch(dispatch, event)
        finally:
            if self.memory is None:
                await storage.close()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "memory":
        memory = MemoryStorage()
        plugin = make_storage_plugin("written", memory)
        plugins = load_plugins(entry_points=False, extra=[("written-storage", plugin)], env={})
        yield Backend("written://", plugins, memory)
    elif request.param == "sqlite":
        yield Backend(f"sqlite:///{tmp_path / 'der.db'}", load_plugins(entry_points=False, env={}))
    else:
        require_tcp_service("PostgreSQL", "127.0.0.1", 5432)
        postgres = pytest.importorskip("der_sdk_postgres.testing", reason="needs der-sdk-postgres")
        async with postgres.temporary_database() as url:
            yield Backend(url, load_plugins(env={}))


def _dispatch(
    dispatch_id: str,
    asset_id: str,
    *,
    state: str = "submitted",
    created_at: datetime | None = None,
    **fields: Any,
) -> Dispatch:
    """A per-asset dispatch record as the dispatcher stores it."""
    created_at = created_at or utc_now() - timedelta(minutes=1)
    target = DispatchTarget(asset_id=asset_id, mw=0.3, state=state)  # type: ignore[arg-type]
    if state == "sent":
        target.command_id = dispatch_id
    return Dispatch(
        dispatch_id=dispatch_id,
        mw=0.3,
        state=state,  # type: ignore[arg-type]
        created_at=created_at,
        updated_at=created_at,
        asset_id=asset_id,
        site_id=None,
        targets=[target],
        **fields,
    )


@pytest.fixture
async def started() -> AsyncIterator[list[Headend]]:
    headends: list[Headend] = []
    yield headends
    for headend in headends:
        await headend.stop()


async def _start(
    inventory_path: Path, backend: Backend, started: list[Headend]
) -> tuple[Headend, httpx.AsyncClient]:
    config = make_config(inventory_path, DATABASE_URL=backend.url)
    headend = Headend(config, plugins=backend.plugins)
    started.append(headend)
    await headend.start()
    return headend, httpx.AsyncClient(base_url=headend.http_url, timeout=WAIT_S)


async def _registers_stores_telemetry_and_gets(
    headend: Headend, http: httpx.AsyncClient, expected: set[str]
) -> None:
    """An agent for site A registers over gRPC, gets a setpoint for each of ``expected``
    (dispatch ids) and has its telemetry stored."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{headend.grpc_port}") as channel:
        agent = RawAgent(channel)
        ack = await agent.register(SITE_A_ASSETS)
        assert ack.accepted, ack
        commands = {(await agent.recv_kind("setpoint")).command_id for _ in expected}
        assert commands == expected
        telemetry_ack = await agent.telemetry(1, [sample(BESS_1, seconds=s) for s in range(3)])
        assert telemetry_ack.stored_through == 1
        assert await agent.end() == grpc.StatusCode.OK
    history = await http.get(f"/telemetry/{BESS_1}/history")
    assert len(history.json()) == 3, history.text


async def test_a_dispatch_stored_out_of_bounds_fails_at_start_and_the_agent_registers(
    inventory_path: Path, backend: Backend, started: list[Headend]
) -> None:
    await backend.write(
        [
            _dispatch("too-long", BESS_1, duration_s=1e12),  # the reported record
            _dispatch(
                "never-expires",
                BESS_3,
                state="sent",
                expires_at=datetime(9999, 12, 31, tzinfo=UTC),
            ),
            _dispatch("good", BESS_2, duration_s=600.0),
        ]
    )
    headend, http = await _start(inventory_path, backend, started)
    async with http:
        for dispatch_id, field in (("too-long", "duration_s"), ("never-expires", "expires_at")):
            record = (await http.get(f"/dispatch/{dispatch_id}")).json()
            assert record["state"] == "failed", record
            reason = record["targets"][0]["reason"]
            assert field in reason and BOUND in reason, reason
            assert "not delivered" in record["events"][-1]["detail"]
        still_open = [
            record["dispatch_id"]
            for state in ("submitted", "sent", "acked")
            for record in (await http.get(f"/dispatch/history?state={state}")).json()
        ]
        assert still_open == ["good"]

        await _registers_stores_telemetry_and_gets(headend, http, {"good"})
        assert (await http.get("/dispatch/good")).json()["state"] == "sent"


async def test_a_dispatch_that_cannot_be_built_fails_alone_once_and_the_agent_gets_the_rest(
    inventory_path: Path, started: list[Headend], caplog: pytest.LogCaptureFixture
) -> None:
    """Records within the bounds whose dates still overflow (made while a clock read the
    year 9999) stand for anything that goes wrong building one dispatch's commands, the
    first time (submitted) or again (sent)."""
    memory = MemoryStorage()
    plugins = load_plugins(
        entry_points=False, extra=[("written-storage", make_storage_plugin("written", memory))]
    )
    backend = Backend("written://", plugins, memory)
    year_9999 = datetime(9999, 12, 1, tzinfo=UTC)
    await backend.write(
        [
            _dispatch("good", BESS_2, duration_s=600.0),
            _dispatch("clock-off", BESS_1, created_at=year_9999, duration_s=DISPATCH_HORIZON_S),
            _dispatch(
                "clock-off-sent",
                BESS_3,
                state="sent",
                created_at=year_9999,
                duration_s=DISPATCH_HORIZON_S,
            ),
        ]
    )
    headend, http = await _start(inventory_path, backend, started)
    async with http:
        assert (await http.get("/dispatch/clock-off")).json()["state"] == "submitted"
        caplog.set_level(logging.ERROR, logger="der.headend.dispatch")

        await _registers_stores_telemetry_and_gets(headend, http, {"good"})
        for dispatch_id in ("clock-off", "clock-off-sent"):
            record = (await http.get(f"/dispatch/{dispatch_id}")).json()
            assert record["state"] == "failed", record
            assert "OverflowError" in record["targets"][0]["reason"], record

        # The next register sends only the unacknowledged good one again.
        await _registers_stores_telemetry_and_gets(headend, http, {"good"})
    logged = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(logged) == 2, "each failed dispatch is logged once, not on every register"
    assert {r.getMessage().split(":")[0] for r in logged} == {
        "dispatch clock-off",
        "dispatch clock-off-sent",
    }
