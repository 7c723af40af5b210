"""``PostgresStorage.exporter_lease``: an advisory lock on a connection of its own, so a
continuous exporter runs in one process at a time; losing that connection loses the
lease (docs/export.md)."""

from __future__ import annotations

import pytest
from der_sdk_postgres import PostgresStorage
from der_sdk_postgres.storage import EXPORTER_LOCK_CLASS

from der_sdk.storage.contract import ExporterLeaseLostError


async def _holder_pid(storage: PostgresStorage, name: str) -> int:
    pid: int = await storage.pool.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = $1::int8::oid AND objsubid = 2"
        " AND objid = (hashtext($2)::int8 & 4294967295)::oid",
        EXPORTER_LOCK_CLASS,
        name,
    )
    return pid


async def test_a_lease_whose_connection_is_terminated_is_lost_and_saves_no_cursor(
    two: tuple[PostgresStorage, PostgresStorage],
) -> None:
    one, other = two
    lease = await one.exporter_lease("lake")
    assert lease is not None
    await lease.save_cursor("c1")
    assert await other.exporter_lease("lake") is None
    await other.pool.execute("SELECT pg_terminate_backend($1)", await _holder_pid(one, "lake"))

    taken = await other.exporter_lease("lake")  # the server released the lock at once
    assert taken is not None
    with pytest.raises(ExporterLeaseLostError):
        await lease.save_cursor("c2")
    with pytest.raises(ExporterLeaseLostError):
        await lease.check()
    assert await one.exporter_cursor("lake") == "c1"
    await taken.save_cursor("c3")
    await lease.release()
    await taken.release()
    assert await one.exporter_cursor("lake") == "c3"
