"""Fixtures for the PostgreSQL plugin's tests.

Every fixture that touches PostgreSQL gates on ``require_tcp_service("PostgreSQL", ...)``
(through :func:`der_sdk_postgres.testing.require_postgres`): without a server the tests
skip with a reason, and fail under ``DER_SDK_REQUIRE_SERVICES=1``. Each run gets its own
database, ``der_test_<random>``, dropped at the end; tests that need an empty, never
migrated database get one of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from der_sdk_postgres import PostgresStorage
from der_sdk_postgres.testing import temporary_database, temporary_database_sync


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated-on-first-use database shared by the run's tests."""
    with temporary_database_sync() as url:
        yield url


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    """An empty database of this test's own."""
    async with temporary_database() as url:
        yield url


@pytest.fixture
async def storage(postgres_url: str) -> AsyncIterator[PostgresStorage]:
    """An open backend on the run's database, emptied for this test."""
    backend = PostgresStorage.from_url(postgres_url)
    await backend.open()
    try:
        await backend.reset()
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def two(fresh_database: str) -> AsyncIterator[tuple[PostgresStorage, PostgresStorage]]:
    """Two backends on one database, as two replicas have: pools of their own."""
    one = PostgresStorage.from_url(f"{fresh_database}?pool_max=2")
    other = PostgresStorage.from_url(f"{fresh_database}?pool_max=2")
    await one.open()
    await other.open()
    try:
        yield one, other
    finally:
        await one.close()
        await other.close()
