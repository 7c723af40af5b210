"""``/metrics`` through prometheus-client: values in full, the format the scraper asks for."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import httpx
from headend_kit import SITE_A_ASSETS, ConnectAgent, eventually
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from der_sdk.models import utc_now
from der_sdk.wire import codec


def _values(
    text: str, parse: Callable[[str], Iterable[Metric]] = text_string_to_metric_families
) -> dict[tuple[str, str], float]:
    """Sample name and ``agent_id`` label → value, as a scraper parses them."""
    return {
        (s.name, s.labels.get("agent_id", "")): s.value
        for family in parse(text)
        for s in family.samples
    }


async def test_counters_and_gauges_past_ten_million_are_exposed_exactly(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    buffer = codec.BufferStats(samples=12_345_678, bytes=3_000_000_123, dropped_samples=23_456_789)
    await agent.send(codec.agent_heartbeat("gw-1", utc_now(), 1.0, buffer))

    async def reported() -> bool:
        return "gw-1" in (await http.get("/metrics")).text

    await eventually(reported, "the agent's buffer shows in /metrics")
    response = await http.get("/metrics")
    values = _values(response.text)
    # a counter printed as 2.34568e+07 reads as going backwards between two scrapes
    assert values[("der_agent_buffer_dropped_samples_total", "gw-1")] == 23_456_789
    assert values[("der_agent_buffer_samples", "gw-1")] == 12_345_678
    assert values[("der_agent_buffer_bytes", "gw-1")] == 3_000_000_123
    assert values[("der_ingest_samples_stored_total", "")] == 0
    assert values[("der_agents_connected", "")] == 1
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")


async def test_a_scraper_asking_for_openmetrics_gets_openmetrics(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    response = await http.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    values = _values(response.text, openmetrics_families)
    assert values[("der_agents_connected", "")] == 1
    assert values[("der_ingest_writes_total", "")] == 0


async def test_without_tls_no_certificate_expiry_is_exposed(
    http: httpx.AsyncClient, connect_agent: ConnectAgent
) -> None:
    agent = await connect_agent()
    await agent.register(SITE_A_ASSETS)
    values = _values((await http.get("/metrics")).text)
    assert ("der_agents_connected", "") in values
    assert not [name for name, _ in values if "certificate_expiry" in name]
