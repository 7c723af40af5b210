"""The Asset page's trends: server-side downsampling (bucket math, bounds, empty ranges)
and ``GET /console/assets/{id}/trend``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from headend_kit import BESS_1, PV_1, SITE_A, SITE_B, ConnectAgent, bearer

from der_sdk.asset_types import BessDetails, PvDetails
from der_sdk.models import TelemetrySample
from der_sdk_headend import Headend
from der_sdk_headend.console import trend
from der_sdk_headend.console.trend import (
    downsample,
    numeric_detail_fields,
    parse_range,
    read_trend,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float, mw: float, asset_id: str = BESS_1, **details: object) -> TelemetrySample:
    return TelemetrySample(
        asset_id=asset_id,
        site_id=SITE_A,
        ts=T0 + timedelta(seconds=seconds),
        mw=mw,
        mw_setpoint=mw + 1,
        details=dict(details),
    )


def test_samples_land_in_buckets_with_min_max_and_average() -> None:
    # one hour in at most 600 points: buckets of 6 s
    samples = [at(0, 1.0), at(5.9, 3.0), at(6, 10.0), at(20, -2.0)]
    got = downsample(BESS_1, samples, T0, T0 + timedelta(hours=1), max_points=600)

    assert got.bucket_s == 6.0
    origin = T0.timestamp()
    assert got.t == [origin, origin + 6, origin + 18]
    assert got.series["mw"].min == [1.0, 10.0, -2.0]
    assert got.series["mw"].max == [3.0, 10.0, -2.0]
    assert got.series["mw"].avg == [2.0, 10.0, -2.0]
    assert got.series["mw_setpoint"].avg == [3.0, 11.0, -1.0]
    assert got.samples == 4 and not got.sampled


def test_bucket_width_is_whole_seconds_and_at_least_one() -> None:
    short = downsample(BESS_1, [], T0, T0 + timedelta(seconds=30), max_points=1000)
    assert short.bucket_s == 1.0
    odd = downsample(BESS_1, [], T0, T0 + timedelta(minutes=15), max_points=600)
    assert odd.bucket_s == 2.0  # 1.5 s rounded up: 450 buckets


def test_a_dense_week_is_bounded_by_the_point_count() -> None:
    week = timedelta(days=7)
    samples = [at(i * 61.0, float(i % 7)) for i in range(int(week.total_seconds() // 61))]
    got = downsample(BESS_1, samples, T0, T0 + week, max_points=1000)

    assert len(got.t) <= 1000
    assert all(len(s.avg) == len(got.t) for s in got.series.values())
    assert got.samples == len(samples)
    assert got.t == sorted(got.t)


def test_an_empty_range_has_no_points_but_the_core_series() -> None:
    got = downsample(BESS_1, [], T0, T0 + timedelta(hours=1))

    assert got.t == [] and got.samples == 0
    assert set(got.series) == {"mw", "mw_setpoint"}
    assert got.series["mw"].avg == []


def test_samples_outside_the_range_are_left_out_end_exclusive() -> None:
    end = T0 + timedelta(minutes=15)
    samples = [at(-1, 5.0), at(0, 1.0), at(900, 7.0)]
    got = downsample(BESS_1, samples, T0, end, max_points=100)

    assert got.samples == 1 and got.series["mw"].max == [1.0]


def test_numeric_details_are_series_and_text_or_flags_are_not() -> None:
    samples = [
        at(0, 1.0, soc_pct=50.0, inverter_state="on", alarm=True),
        at(1, 1.0, soc_pct=60, extra_kw=3.5),
        at(2, 1.0),
    ]
    got = downsample(
        BESS_1,
        samples,
        T0,
        T0 + timedelta(seconds=60),
        max_points=10,
        details=["soc_pct", "soh_pct"],
    )

    assert list(got.series) == ["mw", "mw_setpoint", "soc_pct", "extra_kw"]
    assert got.series["soc_pct"].avg == [pytest.approx(55.0)]
    assert got.series["extra_kw"].max == [3.5]


def test_the_types_numeric_detail_fields() -> None:
    assert "soc_pct" in numeric_detail_fields(BessDetails)
    assert numeric_detail_fields(BessDetails)[0] == "soc_pct"
    pv = numeric_detail_fields(PvDetails)
    assert "irradiance_wm2" in pv and "inverter_state" not in pv
    assert numeric_detail_fields(None) == []


def test_point_counts_outside_the_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="points: 5000"):
        downsample(BESS_1, [], T0, T0 + timedelta(hours=1), max_points=5000)


def test_ranges_are_named_or_start_end() -> None:
    assert parse_range("1h", None, None, T0) == (T0 - timedelta(hours=1), T0)
    assert parse_range(None, T0 - timedelta(days=2), T0, T0 + timedelta(days=9)) == (
        T0 - timedelta(days=2),
        T0,
    )
    with pytest.raises(ValueError, match="range: '2y'"):
        parse_range("2y", None, None, T0)
    with pytest.raises(ValueError, match="is not before end"):
        parse_range(None, T0, T0, T0)
    with pytest.raises(ValueError, match="give range"):
        parse_range(None, None, None, T0)


async def test_a_long_range_is_read_per_bucket_and_says_it_is_sampled(
    headend: Headend, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [at(i * 10.0, float(i)) for i in range(600)]  # 100 minutes
    await headend.storage.append_telemetry(samples)
    monkeypatch.setattr(trend, "DIRECT_LIMIT", 100)
    monkeypatch.setattr(trend, "PER_BUCKET_LIMIT", 2)
    end = T0 + timedelta(minutes=100)

    got = await read_trend(headend.storage, BESS_1, T0, end, max_points=50)

    assert got.sampled and got.bucket_s == 120.0 and len(got.t) == 50
    assert got.samples == 100, "two newest samples of each of the 50 buckets"
    assert got.series["mw"].max[0] == 11.0  # bucket 0 holds samples 0..11


async def test_the_trend_endpoint_returns_what_was_ingested(
    headend: Headend, http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register([PV_1], site_id=SITE_B)
    now = datetime.now(UTC)
    batch = [
        TelemetrySample(
            asset_id=PV_1,
            site_id=SITE_B,
            ts=now - timedelta(seconds=60 - i),
            mw=float(i),
            details={"irradiance_wm2": 500.0 + i},
        )
        for i in range(10)
    ]
    await agent.telemetry(1, batch)
    await headend.ingest.close()  # stored

    response = await http.get(f"/console/assets/{PV_1}/trend", params={"range": "15m"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["samples"] == 10 and len(body["t"]) <= 600
    assert "irradiance_wm2" in body["series"]
    assert max(v for v in body["series"]["mw"]["max"] if v is not None) == 9.0


async def test_the_trend_endpoint_refuses_bad_queries(http: httpx.AsyncClient) -> None:
    missing = await http.get("/console/assets/00000000-0000-4000-8000-0000000000ff/trend?range=1h")
    assert missing.status_code == 404
    bad = await http.get(f"/console/assets/{BESS_1}/trend", params={"range": "2y"})
    assert bad.status_code == 400 and "range" in bad.text
    many = await http.get(f"/console/assets/{BESS_1}/trend", params={"range": "1h", "points": 5000})
    assert many.status_code == 400
    custom = await http.get(
        f"/console/assets/{BESS_1}/trend",
        params={"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"},
    )
    assert custom.status_code == 200 and custom.json()["bucket_s"] == 144.0


async def test_the_trend_needs_a_token(
    auth_headend: Headend, auth_http: httpx.AsyncClient, role_tokens: dict[str, str]
) -> None:
    url = f"/console/assets/{BESS_1}/trend?range=1h"
    assert (await auth_http.get(url)).status_code == 401
    assert (await auth_http.get(url, headers=bearer(role_tokens["viewer"]))).status_code == 200
