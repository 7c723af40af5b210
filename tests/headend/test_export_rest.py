"""``GET /telemetry/export``: a range of stored telemetry streamed as CSV or Parquet for an
operator; what it refuses (role, range, unknown ids) is a 4xx that names the problem."""

from __future__ import annotations

import io
from datetime import timedelta

import httpx
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from headend_kit import BESS_1, BESS_2, PV_1, SITE_A, SITE_B, bearer, sample

from der_sdk.export.schema import ExportSchema, samples_from_table
from der_sdk.models import TelemetrySample
from der_sdk_headend.service import Headend

T0 = sample(BESS_1).ts
FROM, TO = T0.isoformat(), (T0 + timedelta(hours=1)).isoformat()


@pytest.fixture
async def stored(auth_headend: Headend) -> list[TelemetrySample]:
    samples = [
        *(sample(BESS_1, seconds=s, details={"soc_pct": 40.0 + s}) for s in range(0, 30, 3)),
        *(sample(BESS_2, seconds=s, mw=-0.5) for s in range(1, 30, 5)),
        sample(PV_1, SITE_B, seconds=7, details={"irradiance_wm2": 800.0, "new_field": "x"}),
        sample(BESS_1, seconds=7200),  # after the range
    ]
    await auth_headend.storage.append_telemetry(samples)
    return samples


def _read(response: httpx.Response) -> list[TelemetrySample]:
    if response.headers["content-type"].startswith("text/csv"):
        schema = ExportSchema.for_asset_types([]).arrow  # the core columns' types
        options = pa_csv.ConvertOptions(
            column_types={f.name: f.type for f in schema}, strings_can_be_null=True
        )
        table = pa_csv.read_csv(io.BytesIO(response.content), convert_options=options)
    else:
        table = pq.read_table(io.BytesIO(response.content))
    return samples_from_table(table)


def _in_range(stored: list[TelemetrySample], **match: str) -> list[TelemetrySample]:
    found = [
        s
        for s in stored
        if s.ts < T0 + timedelta(hours=1) and all(getattr(s, k) == v for k, v in match.items())
    ]
    return sorted(found, key=lambda s: (s.ts, s.asset_id))


@pytest.mark.parametrize("export_format", ["csv", "parquet"])
async def test_an_operator_gets_the_range_as_a_file_row_for_row(
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    stored: list[TelemetrySample],
    export_format: str,
) -> None:
    response = await auth_http.get(
        "/telemetry/export",
        params={"from": FROM, "to": TO, "format": export_format},
        headers=bearer(role_tokens["operator"]),
    )
    assert response.status_code == 200, response.text
    assert f'.{export_format}"' in response.headers["content-disposition"]
    assert _read(response) == _in_range(stored)


async def test_the_export_filters_by_site_or_asset_and_names_asset_types(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], stored: list[TelemetrySample]
) -> None:
    headers = bearer(role_tokens["operator"])
    params = {"from": FROM, "to": TO, "format": "parquet"}
    by_site = await auth_http.get(
        "/telemetry/export", params={**params, "site_id": SITE_B}, headers=headers
    )
    assert _read(by_site) == _in_range(stored, site_id=SITE_B)
    table = pq.read_table(io.BytesIO(by_site.content))
    assert table.column("asset_type").to_pylist() == ["pv"]
    assert table.column("details_irradiance_wm2").to_pylist() == [800.0]

    by_asset = await auth_http.get(
        "/telemetry/export", params={**params, "asset_id": BESS_2.upper()}, headers=headers
    )
    assert _read(by_asset) == _in_range(stored, asset_id=BESS_2)


async def test_an_empty_range_is_a_file_with_no_rows(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], stored: list[TelemetrySample]
) -> None:
    later = (T0 + timedelta(days=3)).isoformat()
    response = await auth_http.get(
        "/telemetry/export",
        params={"from": later, "to": later.replace("T12", "T13"), "format": "parquet"},
        headers=bearer(role_tokens["operator"]),
    )
    assert response.status_code == 200
    assert pq.read_table(io.BytesIO(response.content)).num_rows == 0


@pytest.mark.parametrize(("role", "status"), [(None, 401), ("viewer", 403)])
async def test_export_needs_an_operator_token(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], role: str | None, status: int
) -> None:
    headers = bearer(role_tokens[role]) if role else {}
    response = await auth_http.get(
        "/telemetry/export", params={"from": FROM, "to": TO}, headers=headers
    )
    assert response.status_code == status


@pytest.mark.parametrize(
    ("params", "status", "detail"),
    [
        ({"to": TO}, 400, "from"),
        ({"from": "yesterday", "to": TO}, 400, "`from`: 'yesterday' is not an ISO 8601 time"),
        ({"from": TO, "to": FROM}, 400, "`to` (2025-01-31T12:00:00+00:00) must be after"),
        (
            {"from": FROM, "to": (T0 + timedelta(days=40)).isoformat()},
            400,
            "at most 31 days per request (HEADEND_EXPORT_MAX_DAYS)",
        ),
        ({"from": FROM, "to": TO, "format": "xlsx"}, 400, "format"),
        ({"from": FROM, "to": TO, "asset_id": "no-such-asset"}, 404, "unknown asset no-such-asset"),
        ({"from": FROM, "to": TO, "site_id": "no-such-site"}, 404, "unknown site no-such-site"),
    ],
)
async def test_bad_export_requests_are_refused_naming_the_problem(
    auth_http: httpx.AsyncClient,
    role_tokens: dict[str, str],
    params: dict[str, str],
    status: int,
    detail: str,
) -> None:
    response = await auth_http.get(
        "/telemetry/export", params=params, headers=bearer(role_tokens["operator"])
    )
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"] + str(response.json().get("extra"))


async def test_the_export_route_does_not_hide_an_assets_latest_sample(
    auth_http: httpx.AsyncClient, role_tokens: dict[str, str], stored: list[TelemetrySample]
) -> None:
    headers = bearer(role_tokens["viewer"])
    response = await auth_http.get(f"/telemetry/{SITE_A}", headers=headers)  # not an asset
    assert response.status_code == 404
    assert (await auth_http.get(f"/telemetry/{BESS_1}", headers=headers)).status_code in (200, 404)
