"""The storage contract's conformance suite (``der_sdk.testing.StorageConformance``) on
PostgreSQL, through the installed plugin's entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from der_sdk.storage import StorageBackend, open_storage
from der_sdk.testing import StorageConformance


class TestPostgresStorageConformance(StorageConformance):
    expected_name = "postgresql"
    database_url = ""

    @pytest.fixture(autouse=True)
    def _on_the_runs_database(self, postgres_url: str) -> None:
        """The run's own database (gated on PostgreSQL being reachable)."""
        self.database_url = postgres_url

    async def make_storage(self, tmp_path: Path) -> StorageBackend:
        return open_storage(self.database_url, self.load_plugins())
