"""der-sdk-postgres: the headend's storage on PostgreSQL (``postgresql://``, ``postgres://``).

Registered through the ``der_sdk`` entry point group; the headend picks it when
``DATABASE_URL`` starts with ``postgresql://`` or ``postgres://``. See the package README
for the URL parameters, the schema and the migrations.
"""

from __future__ import annotations

from der_sdk import hookimpl
from der_sdk.extensions import StorageBackendType
from der_sdk_postgres.migrations import MIGRATION_LOCK_KEY, migrate
from der_sdk_postgres.settings import PARAMETERS, SCHEMES, PostgresSettings
from der_sdk_postgres.storage import PROJECT_TABLES, PostgresStorage, PostgresUnavailableError

__all__ = [
    "MIGRATION_LOCK_KEY",
    "PARAMETERS",
    "PROJECT_TABLES",
    "SCHEMES",
    "PostgresSettings",
    "PostgresStorage",
    "PostgresUnavailableError",
    "der_storage_backends",
    "migrate",
]
__version__ = "0.1.0"


@hookimpl
def der_storage_backends() -> list[StorageBackendType]:
    return [
        StorageBackendType(
            name="postgresql",
            schemes=SCHEMES,
            factory=PostgresStorage.from_url,
            description="PostgreSQL through asyncpg (postgresql://USER@HOST:PORT/DB); "
            "COPY ingest, versioned migrations, TimescaleDB when available.",
        )
    ]
