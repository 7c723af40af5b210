"""Telemetry ingest: acknowledged only after storage, latest and history over REST,
schema evolution in ``details``, bad samples never break the stream."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import grpc
import httpx
import pytest
from headend_kit import (
    BESS_1,
    BESS_2,
    BESS_3,
    PV_1,
    SITE_A_ASSETS,
    WAIT_S,
    ConnectAgent,
    Observer,
    RawAgent,
    make_config,
    sample,
)

from der_sdk.models import TelemetrySample
from der_sdk.plugins import Plugins
from der_sdk.wire import codec, pb
from der_sdk_headend import Headend


async def test_telemetry_batch_is_acked_after_storage_commits(
    headend: Headend, connect_agent: ConnectAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = headend.storage
    original = storage.append_telemetry
    release = asyncio.Event()

    async def gated_append(samples: Sequence[TelemetrySample]) -> int:
        await release.wait()
        return await original(samples)

    monkeypatch.setattr(storage, "append_telemetry", gated_append)
    agent = await connect_agent()
    await agent.register([BESS_1])
    await agent.send(codec.agent_telemetry(7, [sample(BESS_1)]))

    ack_task = asyncio.create_task(agent.recv_kind("telemetry_ack"))
    done, _ = await asyncio.wait({ack_task}, timeout=0.3)
    assert not done, "no acknowledgement while storage has not committed"
    release.set()
    ack = await ack_task
    assert ack.seq == 7
    assert len(await storage.telemetry_history(BESS_1)) == 1


async def test_a_batch_storage_fails_to_store_is_held_retried_then_acked_and_nothing_is_lost(
    headend: Headend,
    connect_agent: ConnectAgent,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = headend.storage
    original = storage.append_telemetry
    failures = [RuntimeError("disk full"), RuntimeError("disk full")]

    async def failing_twice(samples: Sequence[TelemetrySample]) -> int:
        if failures:
            raise failures.pop()
        return await original(samples)

    monkeypatch.setattr(storage, "append_telemetry", failing_twice)
    agent = await connect_agent()
    await agent.register([BESS_1])
    await agent.send(codec.agent_telemetry(1, [sample(BESS_1, seconds=1)]))
    first = (await agent.recv_kind("telemetry_ack")).seq
    second = await agent.telemetry(2, [sample(BESS_1, seconds=2)])

    assert (first, second.seq, second.stored_through) == (1, 2, 2)
    assert len(await storage.telemetry_history(BESS_1)) == 2
    failed = [r for r in caplog.records if "writing telemetry failed" in r.getMessage()]
    assert len(failed) == 1, "one log line when writes start failing, not one per retry"
    assert not any(r.exc_info for r in caplog.records), "no traceback per failed batch"


async def test_telemetry_is_served_as_latest_and_history_newest_first(
    http: httpx.AsyncClient, connect_agent: ConnectAgent, observer: Observer
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    await agent.telemetry(1, [sample(BESS_1, seconds=s, mw=float(s)) for s in (1, 2)])
    await agent.telemetry(2, [sample(BESS_1, seconds=3, mw=3.0, details={"soc_pct": 61.5})])
    # An older sample arriving late is stored but does not replace the latest.
    await agent.telemetry(3, [sample(BESS_1, seconds=0, mw=0.0)])

    latest = (await http.get(f"/telemetry/{BESS_1}")).json()
    assert latest["mw"] == 3.0
    assert latest["ts"] == "2025-01-31T12:00:03Z"
    assert latest["details"] == {"soc_pct": 61.5}
    assert latest["quality"] == "good"
    history = (await http.get(f"/telemetry/{BESS_1}/history")).json()
    assert [row["mw"] for row in history] == [3.0, 2.0, 1.0, 0.0]
    window = await http.get(
        f"/telemetry/{BESS_1}/history",
        params={"start": "2025-01-31T12:00:01", "end": "2025-01-31T12:00:03Z", "limit": 1},
    )
    assert [row["mw"] for row in window.json()] == [2.0], "start inclusive, end exclusive"
    received = [c for n, c in observer.calls if n == "der_telemetry_received"]
    assert [len(c["samples"]) for c in received] == [2, 1, 1]


async def test_unknown_newer_details_fields_are_kept_and_missing_optional_ones_tolerated(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1])
    details = {"soc_pct": 55, "cell_balancing_state": "active", "fire_zone": {"ok": True}}
    await agent.telemetry(1, [sample(BESS_1, details=details)])

    latest = (await http.get(f"/telemetry/{BESS_1}")).json()
    assert latest["quality"] == "good"
    assert latest["details"] == {
        "soc_pct": 55.0,
        "cell_balancing_state": "active",
        "fire_zone": {"ok": True},
    }


async def test_a_bad_details_field_keeps_the_sample_as_uncertain_with_the_reason(
    http: httpx.AsyncClient, connect_agent: ConnectAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1])
    await agent.telemetry(1, [sample(BESS_1, details={"soc_pct": "full", "soh_pct": 97})])

    latest = (await http.get(f"/telemetry/{BESS_1}")).json()
    assert latest["quality"] == "uncertain"
    assert "details.soc_pct" in latest["quality_reason"]
    assert latest["details"] == {"soh_pct": 97.0}
    warning = next(r for r in caplog.records if "details.soc_pct" in r.getMessage())
    assert BESS_1 in warning.getMessage()


async def test_a_sample_that_does_not_decode_is_skipped_and_the_rest_stored(
    http: httpx.AsyncClient, connect_agent: ConnectAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1, BESS_2])
    broken = codec.sample_to_pb(sample(BESS_2, seconds=1))
    broken.details_json = b"[not json"
    good = codec.sample_to_pb(sample(BESS_1, seconds=1))
    await agent.send(pb.AgentMessage(telemetry=pb.TelemetryBatch(seq=1, samples=[broken, good])))

    ack = await agent.recv_kind("telemetry_ack")
    assert ack.seq == 1
    assert (await http.get(f"/telemetry/{BESS_1}")).status_code == 200
    missing = await http.get(f"/telemetry/{BESS_2}")
    assert missing.json()["detail"] == f"no telemetry received yet for asset {BESS_2}"
    assert any(BESS_2 in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


async def test_telemetry_for_an_unknown_asset_is_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/telemetry/nope")
    assert response.status_code == 404
    assert response.json()["detail"] == "unknown asset nope"
    assert (await http.get("/telemetry/nope/history")).status_code == 404


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"start": "yesterday"}, "start"),
        ({"end": "2025-13-01"}, "end"),
        ({"limit": 0}, "limit"),
        ({"limit": 10_001}, "limit"),
        ({"limit": "many"}, "limit"),
    ],
)
async def test_bad_history_parameters_are_400_naming_the_parameter(
    http: httpx.AsyncClient, query: dict[str, object], named: str
) -> None:
    response = await http.get(f"/telemetry/{PV_1}/history", params=query)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert f"parameter `{named}`" in detail
    assert "ParamType" not in detail


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
async def test_non_finite_mw_and_setpoint_are_kept_as_bad_naming_the_field_never_null(
    storage: str,
    tmp_path: Path,
    inventory_path: Path,
    plugins: Plugins,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "memory://" if storage == "memory" else f"sqlite:///{tmp_path / 'der.db'}"
    server = Headend(make_config(inventory_path, DATABASE_URL=url), plugins=plugins)
    await server.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
            httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as http,
        ):
            agent = RawAgent(channel)
            await agent.register(SITE_A_ASSETS)
            samples = [
                sample(BESS_1, mw=math.nan, mw_setpoint=1.0, quality_reason="from the meter"),
                sample(BESS_2, mw=0.5, mw_setpoint=math.inf),
                sample(BESS_3, mw=-math.inf, details={"soh_pct": 97.0}),
            ]
            await agent.telemetry(1, samples)

            for asset_id, mw, setpoint, reason in [
                (BESS_1, 0.0, 1.0, "from the meter; mw: expected a finite number, got nan"),
                (BESS_2, 0.5, None, "mw_setpoint: expected a finite number, got inf"),
                (BESS_3, 0.0, None, "mw: expected a finite number, got -inf"),
            ]:
                latest = await http.get(f"/telemetry/{asset_id}")
                history = await http.get(f"/telemetry/{asset_id}/history")
                assert history.json() == [latest.json()]
                row = latest.json()
                assert (row["mw"], row["mw_setpoint"]) == (mw, setpoint)
                assert (row["quality"], row["quality_reason"]) == ("bad", reason)
            assert (await http.get(f"/telemetry/{BESS_3}")).json()["details"] == {"soh_pct": 97.0}
    finally:
        await server.stop()
    warnings = [r for r in caplog.records if "a finite number" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING] * 3, "one per asset"
    assert any(BESS_2 in r.getMessage() and "mw_setpoint" in r.getMessage() for r in warnings)


async def test_non_finite_details_spelled_nan_or_infinity_keep_the_sample_as_bad_without_them(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([BESS_1])
    message = codec.sample_to_pb(sample(BESS_1, mw=1.5))
    # What Python's json.dumps writes for NaN and ±inf, and a number beyond a double.
    message.details_json = (
        b'{"soc_pct": NaN, "soh_pct": 97, "dc_voltage_v": Infinity,'
        b' "energy_mwh": -1e999, "cells": {"min_v": NaN}}'
    )
    await agent.send(pb.AgentMessage(telemetry=pb.TelemetryBatch(seq=1, samples=[message])))
    await agent.recv_kind("telemetry_ack")

    row = (await http.get(f"/telemetry/{BESS_1}")).json()
    assert row["mw"] == 1.5
    assert row["details"] == {"soh_pct": 97.0}
    assert row["quality"] == "bad"
    assert row["quality_reason"] == (
        "details.soc_pct: expected a finite number, got nan; "
        "details.dc_voltage_v: expected a finite number, got inf; "
        "details.energy_mwh: expected a finite number, got -inf; "
        "details.cells: holds a non-finite number"
    )
