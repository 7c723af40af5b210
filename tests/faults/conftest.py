"""Shared parts of the fault tests: an inventory, agent configs, storage probes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.e2e.conftest import B1, B2, B3, INVENTORY, LONE, OTHER_SITE, SITE

__all__ = [
    "B1",
    "B2",
    "B3",
    "LONE",
    "OTHER_SITE",
    "SITE",
    "StoredRow",
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
