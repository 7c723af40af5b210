"""Shared parts of the fault tests: an inventory, agent configs, storage probes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from tests.e2e.conftest import B1, B2, B3, INVENTORY, LONE, OTHER_SITE, SITE

if TYPE_CHECKING:
    from der_sdk.plugins import Plugins
    from der_sdk_agent.agent import Agent
    from der_sdk_headend.service import Headend

__all__ = [
    "B1",
    "B2",
    "B3",
    "LONE",
    "OTHER_SITE",
    "SITE",
    "StoredRow",
    "gateway_agent",
    "in_process_headend",
    "stored_events",
    "stored_rows",
    "wait_until",
    "write_agent_config",
]

T = TypeVar("T")

StoredRow = tuple[str, int, int]
"""(asset_id, ts in µs, per-asset sample seq) of one stored telemetry row."""


@pytest.fixture
def inventory_path(tmp_path: Path) -> Path:
    path = tmp_path / "assets.yaml"
    path.write_text(textwrap.dedent(INVENTORY))
    return path


def write_agent_config(path: Path, **fields: object) -> Path:
    """An agent config file with fast timings and ``fields`` on top."""
    values: dict[str, object] = {
        "telemetry_interval_s": 0.1,
        "heartbeat_interval_s": 1.0,
        "reconnect_initial_s": 0.1,
        "reconnect_max_s": 0.5,
        **fields,
    }
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def stored_rows(db: Path) -> list[StoredRow]:
    """Every telemetry row of a headend's SQLite file (read beside a running headend)."""

    def read() -> list[StoredRow]:
        with contextlib.closing(
            sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        ) as conn:
            return [
                (str(a), int(ts), int(seq))
                for a, ts, seq in conn.execute("SELECT asset_id, ts, seq FROM telemetry")
            ]

    return await asyncio.to_thread(read)


async def stored_events(db: Path, kind: str) -> list[dict[str, object]]:
    """The ``data`` of every event of ``kind`` in a headend's SQLite file, oldest first."""

    def read() -> list[dict[str, object]]:
        with contextlib.closing(
            sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        ) as conn:
            rows = conn.execute("SELECT data FROM events WHERE kind = ? ORDER BY id", (kind,))
            return [json.loads(data) for (data,) in rows]

    return await asyncio.to_thread(read)


async def wait_until(
    probe: Callable[[], Awaitable[T]], *, within: float, what: str, every: float = 0.1
) -> T:
    """Await ``probe`` until it returns something truthy; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: T | None = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(every)
    pytest.fail(f"timed out after {within:g} s waiting until {what}; last: {last!r}")


def gateway_agent(
    tmp_path: Path,
    inventory_path: Path,
    plugins: Plugins,
    headend_addr: str,
    *,
    site_id: str = SITE,
    name: str = "gw",
    clock: Callable[[], float] | None = None,
    **config: object,
) -> Agent:
    """An in-process gateway agent of ``site_id`` with a buffer file in ``tmp_path`` and a
    config of fast timings and ``config``; ``clock``: its wall clock (default: the real one)."""
    from der_sdk.agent_config import load_agent_config
    from der_sdk.inventory import load_inventory
    from der_sdk_agent.agent import Agent

    inventory = load_inventory(str(inventory_path))
    path = write_agent_config(tmp_path / f"{name}.yaml", **config)
    return Agent(
        agent_id=name,
        site_id=site_id,
        assets=inventory.assets_for_site(site_id),
        headend=headend_addr,
        config=load_agent_config(str(path)),
        plugins=plugins,
        buffer_path=str(tmp_path / f"{name}.sqlite3"),
        **({"clock": clock} if clock is not None else {}),
    )


async def in_process_headend(inventory_path: Path, db: Path, plugins: Plugins) -> Headend:
    """A started headend on SQLite ``db`` and ephemeral loopback ports, no REST auth."""
    from der_sdk_headend.config import HeadendConfig
    from der_sdk_headend.service import Headend

    headend = Headend(
        HeadendConfig.from_env(
            {
                "ASSETS_PATH": str(inventory_path),
                "DATABASE_URL": f"sqlite:///{db}",
                "HEADEND_GRPC_ADDR": "127.0.0.1:0",
                "HEADEND_HTTP_ADDR": "127.0.0.1:0",
                "HEADEND_TOKENS_FILE": str(db.parent / "tokens.json"),  # none: no REST auth
            }
        ),
        plugins=plugins,
    )
    await headend.start()
    return headend
