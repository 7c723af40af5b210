"""The PostgreSQL docs say what the code does: every URL parameter is documented, the lock
key is the real one, and the retention snippet runs."""

from __future__ import annotations

import re
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

from der_sdk_postgres import MIGRATION_LOCK_KEY, PARAMETERS, PostgresStorage
from postgres_kit import samples

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "postgres.md"
README = ROOT / "plugins" / "der-sdk-postgres" / "README.md"


def test_every_url_parameter_is_documented() -> None:
    for text in (DOC.read_text(), README.read_text()):
        for name in PARAMETERS:
            assert f"`{name}`" in text, name


def test_the_documented_lock_key_is_the_real_one() -> None:
    assert f"pg_advisory_xact_lock({MIGRATION_LOCK_KEY})" in DOC.read_text()


async def test_the_retention_snippet_runs(storage: PostgresStorage, postgres_url: str) -> None:
    (snippet,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    module = types.ModuleType("postgres_doc_snippet")
    exec(compile(snippet, str(DOC), "exec"), module.__dict__)
    old = samples(5, assets=1)
    fresh = samples(3, assets=1, start=datetime.now(UTC) - timedelta(hours=1))
    await storage.append_telemetry([*old, *fresh])

    assert await module.prune(postgres_url, days=30) == (5, 0)
    assert len(await storage.telemetry_history("asset-0000")) == 3
