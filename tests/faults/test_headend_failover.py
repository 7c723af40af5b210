"""An agent with several headend addresses, against real headend processes sharing one
storage: kill -9 the headend it is on, and it moves to the other with nothing lost or
stored twice (docs/headend.md, "Several headend addresses and load balancers")."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from der_sdk.agent_config import load_agent_config
from der_sdk.inventory import load_inventory
from der_sdk.plugins import Plugins
from der_sdk.testing.faults import HeadendProcess, free_port
from der_sdk.testing.services import require_tcp_service
from der_sdk.wire import codec
from der_sdk_agent import link as link_module
from der_sdk_agent.agent import Agent
from tests.faults.conftest import (
    B1,
    B2,
    B3,
    SITE,
    StoredRow,
    stored_rows,
    wait_until,
    write_agent_config,
)

Rows = Callable[[], Awaitable[list[StoredRow]]]


@asynccontextmanager
async def _shared_storage(kind: str, tmp_path: Path) -> AsyncIterator[tuple[str, Rows]]:
    """A storage URL both headends use, and a probe of its telemetry rows."""
    if kind == "sqlite":
        db = tmp_path / "der.db"

        async def sqlite_rows() -> list[StoredRow]:
            return await stored_rows(db)

        yield f"sqlite:///{db}", sqlite_rows
        return
    require_tcp_service("PostgreSQL", "127.0.0.1", 5432)
    postgres = pytest.importorskip("der_sdk_postgres.testing", reason="needs der-sdk-postgres")
    asyncpg = pytest.importorskip("asyncpg")
    async with postgres.temporary_database() as url:

        async def postgres_rows() -> list[StoredRow]:
            conn = await asyncpg.connect(url)
            try:
                records = await conn.fetch("SELECT asset_id, ts, seq FROM telemetry")
            finally:
                await conn.close()
            return [(str(r[0]), codec.datetime_to_us(r[1]), int(r[2])) for r in records]

        yield url, postgres_rows


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
async def test_agent_moves_to_the_other_headend_when_its_own_is_killed_and_loses_no_sample(
    tmp_path: Path,
    inventory_path: Path,
    der_plugins: Plugins,
    caplog: pytest.LogCaptureFixture,
    storage: str,
) -> None:
    caplog.set_level(logging.INFO, logger="der.agent.link")
    assets = [B1, B2, B3]
    async with _shared_storage(storage, tmp_path) as (url, rows):
        one = HeadendProcess(inventory_path, url, tmp_path / "one", name="headend-one")
        two = HeadendProcess(inventory_path, url, tmp_path / "two", name="headend-two")
        # Both start at once (the storage serialises its schema set-up); one that failed
        # is started again, and so reported, by the async with.
        await asyncio.gather(one.start(), two.start(), return_exceptions=True)
        async with one, two:
            by_addr = {one.grpc_addr: one, two.grpc_addr: two}
            config = write_agent_config(tmp_path / "gw.yaml", telemetry_interval_s=0.1)
            agent = Agent(
                agent_id="gw",
                site_id=SITE,
                assets=load_inventory(str(inventory_path)).assets_for_site(SITE),
                headend=f"{one.grpc_addr}, {two.grpc_addr}",
                config=load_agent_config(str(config)),
                plugins=der_plugins,
                buffer_path=str(tmp_path / "gw.sqlite3"),
                rng=random.Random(3),
            )
            await agent.start()
            try:
                async with asyncio.timeout(15):
                    await agent.wait_connected()
                first = agent.stats().headend
                assert first in by_addr
                (other,) = set(by_addr) - {first}

                async def acked() -> bool:
                    return agent.stats().last_ack_seq > 5

                await wait_until(acked, within=15, what="the first headend stores telemetry")
                await by_addr[first].kill()
                loop = asyncio.get_running_loop()
                killed_at = loop.time()

                async def moved() -> bool:
                    stats = agent.stats()
                    return stats.connected and stats.headend == other

                await wait_until(moved, within=10, what=f"the agent registers with {other}")
                move_s = loop.time() - killed_at
                newest_at_move = max(seq for _, _, seq in await rows())

                async def continued() -> bool:
                    stored = await rows()
                    return all(
                        any(a == asset and seq >= newest_at_move + 10 for a, _, seq in stored)
                        for asset in assets
                    )

                await wait_until(continued, within=15, what="telemetry continues via the other")
            finally:
                await agent.stop()
            stored = await rows()
    assert move_s < 5.0, f"registered with the other headend {move_s:.1f} s after the kill"
    per_asset = {asset: sorted(seq for a, _, seq in stored if a == asset) for asset in assets}
    for asset, seqs in per_asset.items():
        assert seqs == list(range(1, seqs[-1] + 1)), f"{asset}: a sample is missing or twice"
    assert len(stored) == len({(a, ts) for a, ts, _ in stored})
    lines = [r.getMessage() for r in caplog.records]
    assert f"agent gw moved from headend {first} to headend {other}" in lines, lines


# ----------------------------------------------------------------------------- sessions at start


async def _agent_row(http: httpx.AsyncClient, headend: HeadendProcess, asset_id: str) -> Any:
    """``asset_id``'s row of ``GET /agents`` on ``headend``."""
    rows = (await http.get(f"{headend.http_url}/agents")).json()
    return next(row for row in rows if row["asset_id"] == asset_id)


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
async def test_a_restarted_headend_closes_only_its_own_sessions_not_the_other_headends(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins, storage: str
) -> None:
    async with _shared_storage(storage, tmp_path) as (url, _):
        one, two = (
            HeadendProcess(
                inventory_path,
                url,
                tmp_path / name,
                name=f"headend-{name}",
                env={"HEADEND_ID": f"headend-{name}"},
            )
            for name in ("one", "two")
        )
        await asyncio.gather(one.start(), two.start(), return_exceptions=True)
        async with one, two, httpx.AsyncClient(timeout=5) as http:
            inventory = load_inventory(str(inventory_path))
            config = load_agent_config(str(write_agent_config(tmp_path / "agent.yaml")))

            def agent_on(headend: HeadendProcess, asset_id: str) -> Agent:
                return Agent(
                    agent_id=f"gw-{headend.name}",
                    site_id=SITE,
                    assets=[inventory.assets[asset_id]],
                    headend=headend.grpc_addr,
                    config=config,
                    plugins=der_plugins,
                    buffer_path=str(tmp_path / f"{headend.name}.sqlite3"),
                )

            # B1's agent on headend one, B2's on headend two; each headend has its own id.
            on_one, on_two = agent_on(one, B1), agent_on(two, B2)
            await on_one.start()
            await on_two.start()
            try:
                async with asyncio.timeout(15):
                    await on_one.wait_connected()
                    await on_two.wait_connected()
                (b1_session,) = (await _agent_row(http, one, B1))["sessions"]
                (b2_session,) = (await _agent_row(http, two, B2))["sessions"]
                one_id, two_id = b1_session["headend_id"], b2_session["headend_id"]
                assert (one_id, two_id) == ("headend-one", "headend-two")

                await one.kill()  # leaves B1's session open in storage
                await one.restart()

                async def back_on_one() -> bool:
                    stats = on_one.stats()
                    return stats.connected and stats.reconnects >= 1

                await wait_until(back_on_one, within=15, what="B1's agent registers again")
                b1_row = await _agent_row(http, one, B1)
                b2_on_two = await _agent_row(http, two, B2)
                b2_on_one = await _agent_row(http, one, B2)
            finally:
                await on_one.stop()
                await on_two.stop()

    # Headend one closed the session its killed run left open; its agent has a new one.
    newest, killed = b1_row["sessions"]
    assert (newest["headend_id"], newest["disconnected_at"]) == (one_id, None)
    assert killed["headend_id"] == one_id and killed["disconnected_at"] is not None
    # Headend two's agent kept its session: open in storage, seen from either headend.
    assert b2_on_two["connected"] is True
    for row in (b2_on_two, b2_on_one):
        assert [(s["headend_id"], s["disconnected_at"]) for s in row["sessions"]] == [
            (two_id, None)
        ], row


# ----------------------------------------------------------------------------- one address, HAProxy

HEADEND_DOC = Path(__file__).resolve().parents[2] / "docs" / "headend.md"


def _documented_haproxy_config() -> str:
    blocks = re.findall(r"^```\n(# haproxy\.cfg.*?)^```", HEADEND_DOC.read_text(), re.S | re.M)
    assert len(blocks) == 1, "docs/headend.md shows one haproxy.cfg block"
    return str(blocks[0])


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[unit]


def test_the_documented_haproxy_config_is_tcp_and_outlasts_the_keepalive_ping() -> None:
    config = _documented_haproxy_config()
    assert re.search(r"^\s*mode tcp\b", config, re.M)
    assert not re.search(r"^\s*mode http\b", config, re.M)
    ping_s = dict(link_module._CHANNEL_OPTIONS)["grpc.keepalive_time_ms"] / 1000
    for side in ("client", "server"):
        found = re.search(rf"^\s*timeout {side}\s+(\S+)", config, re.M)
        assert found, f"the config sets timeout {side}"
        assert _seconds(found.group(1)) >= 3 * ping_s, f"timeout {side} outlasts a ping"


async def _connected_on(headend: HeadendProcess, http: httpx.AsyncClient) -> bool:
    rows = (await http.get(f"{headend.http_url}/agents")).json()
    return any(row["connected"] and row["site_id"] == SITE for row in rows)


async def test_one_address_through_the_documented_haproxy_moves_to_a_live_headend(
    tmp_path: Path, inventory_path: Path, der_plugins: Plugins
) -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip(
            "HAProxy is not installed (apt-get install haproxy); the config is checked above"
        )
    db = tmp_path / "der.db"
    one = HeadendProcess(inventory_path, f"sqlite:///{db}", tmp_path / "one", name="headend-one")
    two = HeadendProcess(inventory_path, f"sqlite:///{db}", tmp_path / "two", name="headend-two")
    port = free_port()
    config = _documented_haproxy_config().replace("bind :50051", f"bind 127.0.0.1:{port}")
    config = re.sub(r"server a \S+", f"server a {one.grpc_addr}", config)
    config = re.sub(r"server b \S+", f"server b {two.grpc_addr}", config)
    (tmp_path / "haproxy.cfg").write_text(config)
    await asyncio.gather(one.start(), two.start(), return_exceptions=True)
    async with one, two, httpx.AsyncClient(timeout=5) as http:
        balancer = await asyncio.create_subprocess_exec(
            haproxy,
            "-db",
            "-f",
            str(tmp_path / "haproxy.cfg"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        agent = Agent(
            agent_id="gw",
            site_id=SITE,
            assets=load_inventory(str(inventory_path)).assets_for_site(SITE),
            headend=f"127.0.0.1:{port}",
            config=load_agent_config(str(write_agent_config(tmp_path / "gw.yaml"))),
            plugins=der_plugins,
        )
        try:
            await agent.start()
            async with asyncio.timeout(15):
                await agent.wait_connected()
            holder = one if await _connected_on(one, http) else two
            other = two if holder is one else one
            assert await _connected_on(holder, http)
            registrations = agent.link.stats.registrations
            await holder.kill()

            async def on_the_other() -> bool:
                stats = agent.link.stats
                return stats.registrations > registrations and await _connected_on(other, http)

            await wait_until(on_the_other, within=10, what="the agent is on the live headend")
            assert agent.stats().headend == f"127.0.0.1:{port}"
        finally:
            await agent.stop()
            balancer.terminate()
            await balancer.wait()
