"""``PostgresStorage.dispatch_lock``: an advisory lock that serialises the changes of one
dispatch across processes (replicas of a cluster share the database)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from der_sdk_postgres import PostgresStorage

from der_sdk.models import Dispatch, DispatchEvent, DispatchTarget

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def _dispatch(dispatch_id: str) -> Dispatch:
    return Dispatch(
        dispatch_id=dispatch_id,
        mw=1.0,
        state="submitted",
        created_at=NOW,
        updated_at=NOW,
        asset_id="a-1",
        site_id="s-1",
        targets=[DispatchTarget(asset_id="a-1", mw=1.0)],
    )


async def test_a_dispatch_held_by_one_process_waits_in_the_other_until_released(
    two: tuple[PostgresStorage, PostgresStorage],
) -> None:
    one, other = two
    taken = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with one.dispatch_lock("d-1"):
            taken.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await taken.wait()
    waiter = asyncio.create_task(_enter(other, "d-1"))
    await asyncio.sleep(0.3)
    assert not waiter.done(), "the second process got the lock while the first held it"
    async with asyncio.timeout(2):  # another dispatch is not held up
        await _enter(other, "d-2")
    release.set()
    async with asyncio.timeout(2):
        await holder
        await waiter


async def test_reads_and_writes_inside_the_lock_and_a_nested_lock_need_no_second_connection(
    fresh_database: str,
) -> None:
    """With a pool of one connection, everything a holder does runs on the connection
    that holds the lock (else it would wait for ever on the pool)."""
    storage = PostgresStorage.from_url(f"{fresh_database}?pool_min=1&pool_max=1")
    await storage.open()
    try:
        async with asyncio.timeout(5), storage.dispatch_lock("d-1"):
            await storage.record_dispatch(
                _dispatch("d-1"), DispatchEvent(dispatch_id="d-1", state="submitted", ts=NOW)
            )
            async with storage.dispatch_lock("d-0"):  # a create superseding an older one
                assert await storage.get_dispatch("d-0") is None
            assert (await storage.get_dispatch("d-1")) == _dispatch("d-1")
            assert [d.dispatch_id for d in await storage.dispatch_history()] == ["d-1"]
            assert len(await storage.dispatch_events("d-1")) == 1
        async with asyncio.timeout(5):  # released: the pool's one connection is free
            await _enter(storage, "d-1")
            await _enter(storage, "d-0")
    finally:
        await storage.close()


async def test_a_lock_is_released_when_its_holder_is_cancelled(
    two: tuple[PostgresStorage, PostgresStorage],
) -> None:
    one, other = two
    taken = asyncio.Event()

    async def hold() -> None:
        async with one.dispatch_lock("d-1"):
            taken.set()
            await asyncio.Event().wait()

    holder = asyncio.create_task(hold())
    await taken.wait()
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    async with asyncio.timeout(2):
        await _enter(other, "d-1")


async def _enter(storage: PostgresStorage, dispatch_id: str) -> None:
    async with storage.dispatch_lock(dispatch_id):
        pass
