"""Subclass StorageConformance: every test of the suite runs against your backend."""

import os
from pathlib import Path

from der_sdk.storage import StorageBackend
from der_sdk.testing import StorageConformance, require_tcp_service

PG_HOST = os.environ.get("DER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DER_TEST_PG_PORT", "5432"))


class TestSQLite(StorageConformance):
    url = "sqlite:///{tmp}/der.db"  # {tmp}: the test's tmp_path


class TestPostgres(StorageConformance):
    url = f"postgresql://der:der@{PG_HOST}:{PG_PORT}/der_test"

    async def make_storage(self, tmp_path: Path) -> StorageBackend:
        # Skips when nothing listens there; fails instead under DER_SDK_REQUIRE_SERVICES=1.
        require_tcp_service("PostgreSQL", PG_HOST, PG_PORT)
        return await super().make_storage(tmp_path)
