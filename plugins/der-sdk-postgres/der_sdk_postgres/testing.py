"""Test helpers: a throwaway PostgreSQL database per test run (or per test).

``DER_SDK_TEST_POSTGRES_URL`` names the server and a maintenance database to connect to
for ``CREATE DATABASE``/``DROP DATABASE`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``). Every helper here gates on
:func:`der_sdk.testing.services.require_tcp_service`, so a test skips with a reason when
the server is not there, and fails under ``DER_SDK_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from der_sdk.testing.services import require_tcp_service

__all__ = [
    "ADMIN_URL_VARIABLE",
    "admin_url",
    "database_url",
    "require_postgres",
    "temporary_database",
    "temporary_database_sync",
]

ADMIN_URL_VARIABLE = "DER_SDK_TEST_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

T = TypeVar("T")


def admin_url() -> str:
    """The maintenance connection URL used to create and drop test databases."""
    return os.environ.get(ADMIN_URL_VARIABLE, "").strip() or DEFAULT_ADMIN_URL


def require_postgres() -> str:
    """Skip (or fail, when services are required) unless PostgreSQL accepts connections;
    return the admin URL."""
    url = admin_url()
    parts = urlsplit(url)
    require_tcp_service("PostgreSQL", parts.hostname or "127.0.0.1", parts.port or 5432)
    return url


def database_url(name: str, admin: str | None = None, query: str = "") -> str:
    """The URL of database ``name`` on the admin URL's server, with an optional query."""
    parts = urlsplit(admin or admin_url())
    return urlunsplit(parts._replace(path=f"/{name}", query=query))


async def _admin(admin: str, sql: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def temporary_database(prefix: str = "der_test_") -> AsyncIterator[str]:
    """Create an empty database with a random name; yield its URL; drop it afterwards."""
    admin = require_postgres()
    name = f"{prefix}{secrets.token_hex(6)}"
    await _admin(admin, f'CREATE DATABASE "{name}"')
    try:
        yield database_url(name, admin)
    finally:
        await _admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a loop of its own in another thread, leaving the caller's event loop
    (and pytest-asyncio's) untouched."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextmanager
def temporary_database_sync(prefix: str = "der_test_") -> Iterator[str]:
    """:func:`temporary_database` for synchronous (for example session-scoped) fixtures."""
    admin = require_postgres()
    name = f"{prefix}{secrets.token_hex(6)}"
    _run_in_thread(_admin(admin, f'CREATE DATABASE "{name}"'))
    try:
        yield database_url(name, admin)
    finally:
        _run_in_thread(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
