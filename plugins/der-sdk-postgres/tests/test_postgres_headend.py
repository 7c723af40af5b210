"""The headend on PostgreSQL: degraded mode at start and while running, two headends
migrating one database at once, and RESET_DB."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from postgres_kit import TcpProxy, free_port, samples

from der_sdk.plugins import Plugins, load_plugins
from der_sdk_headend import service
from der_sdk_headend.config import HeadendConfig
from der_sdk_headend.service import Headend

SITE = "11111111-1111-4111-8111-111111111111"
ASSET = "aaaaaaaa-0000-4000-8000-000000000001"
INVENTORY = f"""
sites:
  - {{site_id: {SITE}, name: Test Yard}}
assets:
  - {{asset_id: {ASSET}, site_id: {SITE}, name: B1, capacity_mwh: 2, max_mw: 1, min_mw: -1}}
"""


async def eventually(probe: Callable[[], Awaitable[bool]], what: str, within: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def assets_path(tmp_path: Path) -> Path:
    path = tmp_path / "assets.yaml"
    path.write_text(textwrap.dedent(INVENTORY))
    return path


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return load_plugins()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STORAGE_RETRY_INITIAL_S", 0.05)
    monkeypatch.setattr(service, "STORAGE_RETRY_MAX_S", 0.2)


@pytest.fixture
async def headends() -> AsyncIterator[list[Headend]]:
    started: list[Headend] = []
    yield started
    for headend in started:
        await headend.stop()


def make_headend(assets_path: Path, plugins: Plugins, database_url: str, **env: str) -> Headend:
    config = HeadendConfig.from_env(
        {
            "ASSETS_PATH": str(assets_path),
            "DATABASE_URL": database_url,
            "HEADEND_GRPC_ADDR": "127.0.0.1:0",
            "HEADEND_HTTP_ADDR": "127.0.0.1:0",
            **env,
        }
    )
    return Headend(config, plugins=plugins)


async def healthz(headend: Headend) -> httpx.Response:
    async with httpx.AsyncClient(base_url=headend.http_url, timeout=10) as http:
        return await http.get("/healthz")


def http_is_up(headend: Headend) -> bool:
    try:
        return headend.http_port > 0
    except RuntimeError:
        return False


@pytest.mark.usefixtures("fast_retries")
async def test_headend_retries_unreachable_postgres_with_rest_up_and_degraded(
    postgres_url: str,
    assets_path: Path,
    plugins: Plugins,
    headends: list[Headend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="der.headend")
    proxy = TcpProxy.for_url(postgres_url)  # not listening yet: PostgreSQL is "down"
    headend = make_headend(assets_path, plugins, proxy.url_through(postgres_url))
    headends.append(headend)
    starting = asyncio.create_task(headend.start())
    try:

        async def up() -> bool:
            return http_is_up(headend)

        await eventually(up, "the REST API to come up while storage is down")
        response = await healthz(headend)
        assert response.status_code == 503
        assert response.json()["status"] == "degraded"
        assert response.json()["storage"] == "postgresql"
        async with httpx.AsyncClient(base_url=headend.http_url, timeout=10) as http:
            agents = await http.get("/agents")
        assert agents.status_code == 503 and "waiting for its storage" in agents.text

        def attempts() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "not available (attempt" in r.getMessage()]

        async def retried() -> bool:
            return len(attempts()) >= 3

        await eventually(retried, "three attempts")
        for record in attempts():
            message = record.getMessage()
            assert record.levelno == logging.WARNING and record.exc_info is None
            assert "\n" not in message
            assert f"PostgreSQL at 127.0.0.1:{proxy.port}/" in message and "unreachable" in message

        await proxy.start()  # PostgreSQL "comes back"
        await asyncio.wait_for(starting, 15)
        assert (await healthz(headend)).status_code == 200
        assert headend.grpc_port > 0
    finally:
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        await headend.stop()
        await proxy.cut()


async def test_healthz_is_degraded_while_postgres_is_gone_and_recovers(
    postgres_url: str, assets_path: Path, plugins: Plugins, headends: list[Headend]
) -> None:
    proxy = TcpProxy.for_url(postgres_url)
    await proxy.start()
    headend = make_headend(
        assets_path, plugins, proxy.url_through(postgres_url) + "?connect_timeout=2"
    )
    headends.append(headend)
    try:
        await headend.start()
        assert (await healthz(headend)).status_code == 200

        await proxy.cut()
        response = await healthz(headend)
        assert response.status_code == 503 and response.json()["status"] == "degraded"

        await proxy.start()
        assert (await healthz(headend)).status_code == 200
    finally:
        await headend.stop()
        await proxy.cut()


async def test_two_headends_migrating_one_empty_database_both_start(
    fresh_database: str, assets_path: Path, plugins: Plugins, headends: list[Headend]
) -> None:
    pair = [make_headend(assets_path, plugins, fresh_database) for _ in range(2)]
    headends.extend(pair)

    await asyncio.gather(*(h.start() for h in pair))

    for headend in pair:
        assert (await healthz(headend)).json()["status"] == "ok"


async def test_reset_db_empties_the_projects_tables_and_nothing_else(
    fresh_database: str, assets_path: Path, plugins: Plugins, headends: list[Headend]
) -> None:
    first = make_headend(assets_path, plugins, fresh_database)
    headends.append(first)
    await first.start()
    assert await first.storage.append_telemetry(samples(10)) == 10
    await first.stop()
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute("CREATE TABLE operator_notes (note text)")
        await conn.execute("INSERT INTO operator_notes VALUES ('keep me')")

        second = make_headend(assets_path, plugins, fresh_database, RESET_DB="1")
        headends.append(second)
        await second.start()

        assert await conn.fetchval("SELECT count(*) FROM telemetry") == 0
        assert await conn.fetchval("SELECT note FROM operator_notes") == "keep me"
        assert await conn.fetchval("SELECT count(*) FROM der_schema_migrations") >= 1
    finally:
        await conn.close()


def test_der_headend_without_postgres_logs_one_line_per_attempt_and_no_traceback(
    tmp_path: Path,
) -> None:
    (tmp_path / "assets.yaml").write_text(textwrap.dedent(INVENTORY))
    http_port = free_port()
    env = {
        **os.environ,
        "ASSETS_PATH": str(tmp_path / "assets.yaml"),
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/der",
        "HEADEND_GRPC_ADDR": "127.0.0.1:0",
        "HEADEND_HTTP_ADDR": f"127.0.0.1:{http_port}",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "der_sdk.cli", "headend"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        status = None
        for _ in range(100):
            try:
                status = httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code
                break
            except httpx.TransportError:
                time.sleep(0.1)
        time.sleep(1.5)  # attempts at about 0 s and 1 s
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)

    assert status == 503, output
    attempts = [line for line in output.splitlines() if "not available (attempt" in line]
    assert len(attempts) >= 2, output
    assert all("unreachable" in line for line in attempts), output
    assert "Traceback" not in output, output
    assert process.returncode in (0, 130), output
