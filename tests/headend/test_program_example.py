"""The runnable example program source (examples/programs/calendar): registered as a
plugin, run by a headend with an agent on simulated batteries, it schedules what its
calendar file says, cancels what is taken out, and shows a lost file in /healthz."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import pytest_asyncio

from der_sdk.plugins import Plugins, load_plugins
from der_sdk.testing.inventory import DEFAULT_ASSET_IDS, DEFAULT_INVENTORY_YAML, DEFAULT_SITE_ID
from der_sdk.testing.waits import wait_until
from der_sdk_agent.testing.agent_link import AgentRunner
from der_sdk_headend import Headend
from der_sdk_headend.testing import headend_config, running_headend

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/programs/calendar"
WAIT_S = 15.0


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "der_calendar_program", EXAMPLE / "der_calendar_program.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # msgspec resolves the Structs' annotations there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plugins() -> Plugins:
    plugins = load_plugins(extra=[("calendar", _example())], env={})
    if "sim-bess" not in plugins.adapter_types:
        pytest.fail("der-sdk-sim-bess is not installed (python3 dev.py installs it)")
    return plugins


@pytest.fixture
def calendar(tmp_path: Path) -> Path:
    return tmp_path / "calendar.yaml"


def _write(path: Path, *events: tuple[str, datetime, float]) -> None:
    """Events ``(id, start, MW)`` for the test site, a minute long each."""
    lines = ["events:"]
    for event_id, start, mw in events:
        lines += [
            f"  - id: {event_id}",
            f"    site_id: {DEFAULT_SITE_ID}",
            f"    start: {start.isoformat()}",
            "    duration_s: 60",
            f"    mw: {mw}",
        ]
    path.write_text("\n".join(lines) + "\n")


@pytest_asyncio.fixture
async def headend(tmp_path: Path, plugins: Plugins, calendar: Path) -> AsyncIterator[Headend]:
    path = tmp_path / "assets.yaml"
    path.write_text(
        DEFAULT_INVENTORY_YAML
        + f"""\
programs:
  - name: calendar
    source: calendar
    sites: [{DEFAULT_SITE_ID}]
    options: {{path: "{calendar}", poll_interval_s: 0.2}}
"""
    )
    async with running_headend(headend_config(path), plugins) as headend:
        yield headend


@pytest_asyncio.fixture
async def http(headend: Headend) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=headend.http_url, timeout=10) as client:
        yield client


async def _by_event(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    history = (await http.get("/dispatch/history")).json()
    return {d["external_id"]: d for d in history if d["source"] == "program:calendar"}


async def test_the_calendar_example_schedules_its_events_and_the_batteries_follow(
    headend: Headend, http: httpx.AsyncClient, plugins: Plugins, calendar: Path
) -> None:
    now = datetime.now(UTC)
    peak = ("peak", now + timedelta(seconds=1), 1.0)
    _write(calendar, peak, ("later", now + timedelta(minutes=5), -0.5))
    runner = AgentRunner(headend, plugins, http)
    try:
        await runner(adapter_type="sim-bess", telemetry_interval_s=0.2)

        async def both() -> dict[str, dict[str, Any]] | None:
            found = await _by_event(http)
            return found if set(found) == {"peak", "later"} else None

        await wait_until(both, "a dispatch for each calendar event", timeout_s=WAIT_S)

        async def peak_at_the_batteries() -> bool:
            latest = [headend.ingest.latest(a) for a in DEFAULT_ASSET_IDS]
            setpoints = [s.mw_setpoint for s in latest if s is not None]
            return len(setpoints) == 3 and sum(x or 0 for x in setpoints) == pytest.approx(1.0)

        await wait_until(peak_at_the_batteries, "the peak event at the batteries", timeout_s=WAIT_S)

        _write(calendar, peak)  # "later" taken out of the calendar

        async def later_cancelled() -> bool:
            return bool((await _by_event(http))["later"]["state"] == "cancelled")

        await wait_until(later_cancelled, "the event taken out cancelled", timeout_s=WAIT_S)
        assert (await _by_event(http))["peak"]["state"] == "active", "unchanged: the same dispatch"

        await asyncio.to_thread(calendar.unlink)

        async def degraded() -> dict[str, Any] | None:
            response = await http.get("/healthz")
            return response.json() if response.status_code == 503 else None

        health = await wait_until(degraded, "/healthz degraded", timeout_s=WAIT_S)
        assert "program calendar (calendar) has lost its server" in health["reason"]
        assert str(calendar) in health["reason"]
        assert (await _by_event(http))["peak"]["state"] == "active", "the schedule runs on"
    finally:
        await runner.close()
