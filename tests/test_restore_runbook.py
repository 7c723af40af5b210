"""The runbook "Restore from a PostgreSQL backup" (docs/runbooks.md), followed step by
step on a real PostgreSQL with its own commands: ``pg_dump -Fc``, ``dropdb``,
``createdb``, ``pg_restore --no-owner``, then a headend on the restored database serves
the history, and a dispatch that was open at backup time is sent again with its command
id."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from der_sdk.plugins import load_plugins
from der_sdk.testing.services import service_missing
from der_sdk_headend import Headend
from tests.headend.headend_kit import (
    BESS_1,
    INVENTORY_YAML,
    SITE_A_ASSETS,
    RawAgent,
    make_config,
    sample,
)

postgres_testing = pytest.importorskip("der_sdk_postgres.testing", reason="needs der-sdk-postgres")


def _client_tools() -> None:
    missing = [t for t in ("pg_dump", "pg_restore", "dropdb", "createdb") if not shutil.which(t)]
    if missing:
        service_missing(
            f"PostgreSQL client tools missing: {', '.join(missing)} "
            "(apt-get install postgresql-client)"
        )


async def _run(*command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"{command[0]}: {err.decode()}{out.decode()}"


class _Site:
    """A headend on ``url`` and one agent stream for site A, over REST and gRPC."""

    def __init__(self, url: str, inventory: Path) -> None:
        self.headend = Headend(
            make_config(inventory, DATABASE_URL=url), plugins=load_plugins(env={})
        )

    async def __aenter__(self) -> tuple[Headend, httpx.AsyncClient, RawAgent]:
        await self.headend.start()
        self.http = httpx.AsyncClient(base_url=self.headend.http_url, timeout=10.0)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.headend.grpc_port}")
        agent = RawAgent(self.channel)
        assert (await agent.register(SITE_A_ASSETS)).accepted
        return self.headend, self.http, agent

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.http.aclose()
        await self.headend.stop()


@pytest.fixture
async def database() -> AsyncIterator[tuple[str, str, str]]:
    """A temporary database: its URL, its name, and the server's maintenance URL."""
    _client_tools()
    async with postgres_testing.temporary_database("der_restore_") as url:
        yield url, url.rsplit("/", 1)[1].split("?")[0], postgres_testing.admin_url()


async def test_a_restored_backup_serves_its_history_and_sends_open_dispatches_again(
    database: tuple[str, str, str], tmp_path: Path
) -> None:
    url, name, admin = database
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(INVENTORY_YAML)
    dump = tmp_path / "der.dump"

    async with _Site(url, inventory) as (_, http, agent):
        assert (await agent.telemetry(1, [sample(BESS_1, seconds=s) for s in (1, 2, 3)])).seq == 1
        response = await http.post("/dispatch", json={"asset_id": BESS_1, "mw": 0.5})
        assert response.status_code == 202, response.text
        dispatch_id = response.json()["dispatch_id"]
        assert (await agent.recv_kind("setpoint")).command_id == dispatch_id
        # the backup, taken while the headend runs (pg_dump is consistent)
        await _run("pg_dump", "-Fc", "-f", str(dump), "-d", url)

    # the runbook: headends stopped (above), an empty database, the dump restored
    await _run("dropdb", f"--maintenance-db={admin}", name)
    await _run("createdb", f"--maintenance-db={admin}", name)
    await _run("pg_restore", "--no-owner", "-d", url, str(dump))

    async with _Site(url, inventory) as (headend, http, agent):
        assert (await http.get("/healthz")).status_code == 200
        history = (await http.get(f"/telemetry/{BESS_1}/history")).json()
        assert len(history) == 3
        record = (await http.get(f"/dispatch/{dispatch_id}")).json()
        assert record["state"] == "sent"
        # open at backup time: sent again with its command id, applied at most once
        assert (await agent.recv_kind("setpoint")).command_id == dispatch_id
        assert headend.storage.name == "postgresql"
