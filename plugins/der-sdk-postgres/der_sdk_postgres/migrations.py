"""Versioned SQL migrations, applied at start under a transaction-level advisory lock.

The migrations are the files ``migrations/NNNN_name.sql`` of this package, applied in
version order, each at most once; ``der_schema_migrations`` records which ones ran.

Several headends may start against one empty database at the same moment. Each one runs
:func:`migrate` in a single transaction that first takes
``pg_advisory_xact_lock(MIGRATION_LOCK_KEY)``: the first to get the lock creates the
schema; the others wait on the lock, then find every migration recorded and apply
nothing. The lock is released by the commit (or rollback), so a crashed headend cannot
leave it held.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from der_sdk.errors import DerSdkError

__all__ = ["MIGRATIONS_TABLE", "MIGRATION_LOCK_KEY", "Migration", "load_migrations", "migrate"]

MIGRATION_LOCK_KEY = 0x4445_525F_5347_5253
"""The advisory lock key of schema migrations (the bytes of ``DER_SGRS``): one fixed
bigint shared by every headend on the database."""

MIGRATIONS_TABLE = "der_schema_migrations"

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Every packaged migration in version order.

    :raises DerSdkError: a version is missing or repeated (a packaging mistake).
    """
    found: list[Migration] = []
    for entry in resources.files("der_sdk_postgres").joinpath("migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is not None:
            found.append(
                Migration(int(match["version"]), match["name"], entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise DerSdkError(f"der-sdk-postgres migrations are not numbered 1..n: {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Bring the schema of ``conn``'s database up to date; return what was applied.

    :raises DerSdkError: the database records a migration newer than this package knows
        (a newer der-sdk-postgres wrote it).
    """
    migrations = load_migrations()
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in await conn.fetch(f"SELECT version FROM {MIGRATIONS_TABLE}")}
        newest = migrations[-1].version if migrations else 0
        if done and max(done) > newest:
            raise DerSdkError(
                f"the database has schema version {max(done)}, newer than the {newest} this "
                "der-sdk-postgres supports; upgrade der-sdk-postgres or use another database"
            )
        for migration in migrations:
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration)
    return applied
