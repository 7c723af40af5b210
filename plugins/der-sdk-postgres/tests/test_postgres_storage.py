"""What the PostgreSQL backend adds to the storage contract: URL parameters, COPY ingest,
migrations under the advisory lock, RESET_DB scope, retention, and behaviour when the
server is unreachable or goes away."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from der_sdk_postgres import (
    PARAMETERS,
    PROJECT_TABLES,
    PostgresSettings,
    PostgresStorage,
    PostgresUnavailableError,
)
from der_sdk_postgres.migrations import load_migrations
from der_sdk_postgres.testing import database_url
from postgres_kit import T0, TcpProxy, free_port, samples

from der_sdk.errors import DerSdkError
from der_sdk.plugins import load_plugins
from der_sdk.storage import open_storage
from der_sdk.testing import waits


async def _count(url: str, sql: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


# --------------------------------------------------------------------------- URL


def test_our_parameters_are_parsed_and_stripped_from_the_dsn() -> None:
    settings = PostgresSettings.from_url(
        "postgresql://der:secret@db.example:5433/der?pool_min=2&pool_max=20"
        "&command_timeout=5&connect_timeout=3&statement_cache_size=0&batch_size=1000"
        "&flush_interval_ms=50&retention_days=30&retention_interval_s=60"
        "&max_inactive_connection_lifetime=10&sslmode=disable&application_name=der-headend"
    )

    assert (settings.pool_min, settings.pool_max) == (2, 20)
    assert (settings.command_timeout, settings.connect_timeout) == (5.0, 3.0)
    assert (settings.statement_cache_size, settings.batch_size) == (0, 1000)
    assert (settings.flush_interval_ms, settings.retention_days) == (50, 30.0)
    assert (settings.retention_interval_s, settings.max_inactive_connection_lifetime) == (60, 10)
    assert settings.dsn == (
        "postgresql://der:secret@db.example:5433/der?sslmode=disable&application_name=der-headend"
    )
    assert settings.target == "db.example:5433/der"


def test_defaults_and_the_postgres_scheme() -> None:
    settings = PostgresSettings.from_url("postgres://localhost/der")

    assert settings.dsn == "postgres://localhost/der"
    assert (settings.pool_min, settings.pool_max, settings.batch_size) == (1, 10, 5000)
    assert settings.retention_days is None


def test_every_parameter_is_a_settings_field() -> None:
    defaults = PostgresSettings(dsn="postgresql://x/y")
    assert all(hasattr(defaults, name) for name in PARAMETERS)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("pool_max=many", "pool_max='many' is not a whole number"),
        ("pool_max=0", "pool_max=0 must be at least 1"),
        ("pool_min=5&pool_max=2", "pool_min=5 is more than pool_max=2"),
        ("command_timeout=-1", "command_timeout='-1' must be 0 or more"),
        ("batch_size=0", "batch_size=0 must be at least 1"),
        ("retention_days=0", "retention_days='0' must be more than 0"),
        ("connect_timeout=soon", "connect_timeout='soon' is not a number"),
    ],
)
def test_malformed_parameters_are_refused_naming_them(query: str, message: str) -> None:
    with pytest.raises(DerSdkError, match=message.replace("(", r"\(")):
        PostgresSettings.from_url(f"postgresql://localhost/der?{query}")


def test_the_backend_is_chosen_by_scheme_through_the_hook() -> None:
    plugins = load_plugins()
    for url in ("postgresql://localhost/der", "postgres://localhost/der"):
        assert isinstance(open_storage(url, plugins), PostgresStorage)


async def test_passed_through_parameters_reach_the_server(postgres_url: str) -> None:
    backend = PostgresStorage.from_url(f"{postgres_url}?application_name=der-test&pool_max=2")
    await backend.open()
    try:
        name = await backend.pool.fetchval("SELECT current_setting('application_name')")
        assert name == "der-test"
        assert backend.pool.get_max_size() == 2
    finally:
        await backend.close()


# --------------------------------------------------------------------------- ingest


async def test_resending_10000_samples_leaves_exactly_10000_rows(postgres_url: str) -> None:
    backend = PostgresStorage.from_url(f"{postgres_url}?batch_size=3000")
    await backend.open()
    try:
        await backend.reset()
        batch = samples(10_000)

        assert await backend.append_telemetry(batch) == 10_000
        assert await backend.append_telemetry(batch) == 0
        assert await backend.append_telemetry(batch[:2500]) == 0  # a partial re-send
        assert await _count(postgres_url, "SELECT count(*) FROM telemetry") == 10_000
    finally:
        await backend.close()


async def test_a_batch_bigger_than_batch_size_is_still_atomic(postgres_url: str) -> None:
    backend = PostgresStorage.from_url(f"{postgres_url}?batch_size=1000")
    await backend.open()
    try:
        await backend.reset()
        batch = samples(2500)
        batch[-1].asset_id = "nul\x00byte"  # PostgreSQL text refuses NUL: the 3rd COPY fails

        with pytest.raises(asyncpg.PostgresError):
            await backend.append_telemetry(batch)

        assert await _count(postgres_url, "SELECT count(*) FROM telemetry") == 0
        assert await backend.append_telemetry(batch[:-1]) == 2499
    finally:
        await backend.close()


async def test_concurrent_appends_use_the_pool_and_count_each_new_row_once(
    storage: PostgresStorage,
) -> None:
    batch = samples(6000)
    parts = [batch[i::3] for i in range(3)]

    counts = await asyncio.gather(*(storage.append_telemetry(p) for p in [*parts, *parts]))

    assert sum(counts) == 6000
    assert await storage.append_telemetry(batch) == 0


async def test_latest_per_asset_spans_many_assets(storage: PostgresStorage) -> None:
    await storage.append_telemetry(samples(5000, assets=250))

    latest = await storage.latest_telemetry()

    assert len(latest) == 250
    newest = T0 + timedelta(seconds=19)
    assert all(s.ts == newest for s in latest.values())


# --------------------------------------------------------------------------- migrations


async def test_storages_migrating_one_empty_database_at_once_all_open(
    fresh_database: str,
) -> None:
    backends = [PostgresStorage.from_url(fresh_database) for _ in range(4)]

    await asyncio.gather(*(b.open() for b in backends))
    try:
        conn = await asyncpg.connect(fresh_database)
        try:
            rows = await conn.fetch("SELECT version, name FROM der_schema_migrations ORDER BY 1")
        finally:
            await conn.close()
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in load_migrations()
        ]
        counts = await asyncio.gather(*(b.append_telemetry(samples(100)) for b in backends))
        assert sum(counts) == 100
    finally:
        await asyncio.gather(*(b.close() for b in backends))


async def test_reopening_a_migrated_database_applies_nothing(postgres_url: str) -> None:
    backend = PostgresStorage.from_url(postgres_url)
    await backend.open()
    await backend.close()
    before = await _count(postgres_url, "SELECT count(*) FROM der_schema_migrations")

    await backend.open()
    await backend.close()

    assert await _count(postgres_url, "SELECT count(*) FROM der_schema_migrations") == before


async def test_a_schema_newer_than_the_plugin_is_refused(fresh_database: str) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute(
            "CREATE TABLE der_schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now());"
            " INSERT INTO der_schema_migrations (version, name) VALUES (999, 'future')"
        )
    finally:
        await conn.close()
    backend = PostgresStorage.from_url(fresh_database)

    with pytest.raises(DerSdkError, match="schema version 999, newer than"):
        await backend.open()
    await backend.close()


async def test_a_database_from_before_headend_ids_keeps_its_sessions_and_gains_the_column(
    fresh_database: str,
) -> None:
    before = [m for m in load_migrations() if m.version <= 3]
    assert len(before) == 3, "the migrations up to 0003 are what der-sdk 0.1 left"
    conn = await asyncpg.connect(fresh_database)
    try:  # a database migrated by der-sdk-postgres before headend ids, with two sessions
        await conn.execute(
            "CREATE TABLE der_schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in before:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO der_schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
        await conn.executemany(
            "INSERT INTO agent_sessions (session_id, asset_id, site_id, agent_id, peer,"
            " connected_at, disconnected_at) VALUES ($1, 'a', 's', 'agent-1', 'peer', $2, $3)",
            [("left-open", T0, None), ("closed", T0 - timedelta(hours=1), T0)],
        )
    finally:
        await conn.close()

    first, second = (
        PostgresStorage.from_url(fresh_database),
        PostgresStorage.from_url(fresh_database),
    )
    await asyncio.gather(first.open(), second.open())  # two headends start at once
    try:
        recent = await first.recent_sessions("a")
        assert [(s.session_id, s.headend_id, s.disconnected_at) for s in recent] == [
            ("left-open", None, None),
            ("closed", None, T0),
        ]
        # The session from before headend ids is closed by the first headend to start.
        assert await second.close_open_sessions(T0 + timedelta(1), headend_id="headend-a") == 1
        assert (await first.recent_sessions("a"))[0].disconnected_at == T0 + timedelta(1)
    finally:
        await asyncio.gather(first.close(), second.close())
    latest = max(m.version for m in load_migrations())
    assert await _count(fresh_database, "SELECT max(version) FROM der_schema_migrations") == latest


async def test_search_path_keeps_the_tables_in_a_schema_of_their_own(
    fresh_database: str,
) -> None:
    conn = await asyncpg.connect(fresh_database)
    try:
        await conn.execute("CREATE SCHEMA der")
        backend = PostgresStorage.from_url(f"{fresh_database}?search_path=der")
        await backend.open()
        try:
            assert await backend.append_telemetry(samples(10)) == 10
        finally:
            await backend.close()
        schemas = {
            r[0]
            for r in await conn.fetch(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'telemetry'"
            )
        }
        assert schemas == {"der"}
    finally:
        await conn.close()


# --------------------------------------------------------------------------- reset


async def test_reset_truncates_only_the_projects_tables(storage: PostgresStorage) -> None:
    url = storage.settings.dsn
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS operator_notes;"
            " CREATE TABLE operator_notes (note text);"
            " INSERT INTO operator_notes VALUES ('keep me')"
        )
        await storage.append_telemetry(samples(10))
        migrations = await conn.fetchval("SELECT count(*) FROM der_schema_migrations")

        await storage.reset()

        for table in PROJECT_TABLES:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        assert await conn.fetchval("SELECT note FROM operator_notes") == "keep me"
        assert await conn.fetchval("SELECT count(*) FROM der_schema_migrations") == migrations
    finally:
        await conn.execute("DROP TABLE IF EXISTS operator_notes")
        await conn.close()


# --------------------------------------------------------------------------- retention


async def test_prune_telemetry_deletes_rows_before_the_cutoff(storage: PostgresStorage) -> None:
    await storage.append_telemetry(samples(100, assets=1))  # T0 .. T0+99 s
    await storage.append_heartbeats([])

    deleted = await storage.prune_telemetry(T0 + timedelta(seconds=60))

    assert deleted == 60
    history = await storage.telemetry_history("asset-0000", limit=1000)
    assert len(history) == 40 and history[-1].ts == T0 + timedelta(seconds=60)
    assert await storage.prune_telemetry(T0) == 0
    with pytest.raises(ValueError, match="timezone-aware"):
        await storage.prune_telemetry(datetime(2024, 1, 1))


async def test_retention_days_prunes_old_rows_in_the_background(postgres_url: str) -> None:
    backend = PostgresStorage.from_url(f"{postgres_url}?retention_days=1&retention_interval_s=0.05")
    fresh = samples(5, assets=1, start=datetime.now(UTC) - timedelta(hours=1))
    await backend.open()
    try:
        await backend.reset()
        await backend.append_telemetry([*samples(20, assets=1), *fresh])

        for _ in range(200):
            if len(await backend.telemetry_history("asset-0000", limit=100)) == 5:
                break
            await asyncio.sleep(0.05)
        remaining = await backend.telemetry_history("asset-0000", limit=100)
        assert [s.ts for s in remaining] == [s.ts for s in reversed(fresh)]
    finally:
        await backend.close()


# --------------------------------------------------------------------------- availability


async def test_an_unreachable_server_is_a_one_line_connection_error() -> None:
    port = free_port()
    backend = PostgresStorage.from_url(f"postgresql://postgres@127.0.0.1:{port}/der")

    with pytest.raises(PostgresUnavailableError) as raised:
        await backend.open()

    assert isinstance(raised.value, ConnectionError)
    message = str(raised.value)
    assert message.startswith(f"PostgreSQL at 127.0.0.1:{port}/der is unreachable: ")
    assert "\n" not in message
    assert not await backend.healthy()
    await backend.close()


async def test_a_missing_database_is_a_clear_error_not_a_retry(postgres_url: str) -> None:
    backend = PostgresStorage.from_url(database_url("der_no_such_database", postgres_url))

    with pytest.raises(DerSdkError, match="createdb der_no_such_database"):
        await backend.open()


async def test_health_follows_the_server_going_away_and_coming_back(postgres_url: str) -> None:
    proxy = TcpProxy.for_url(postgres_url)
    await proxy.start()
    backend = PostgresStorage.from_url(proxy.url_through(postgres_url) + "?connect_timeout=2")
    try:
        await backend.open()
        assert await backend.healthy()

        await proxy.cut()
        assert not await backend.healthy()
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await backend.append_telemetry(samples(1))

        await proxy.start()
        assert await backend.healthy()
        assert await backend.append_telemetry(samples(1)) in (0, 1)
    finally:
        await backend.close()
        await proxy.cut()


async def test_terminated_server_connections_are_replaced(storage: PostgresStorage) -> None:
    assert await storage.append_telemetry(samples(10)) == 10
    conn = await asyncpg.connect(storage.settings.dsn)
    try:
        terminated = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert terminated >= 1
    await asyncio.sleep(0.2)  # let the pool see its sockets close

    assert await storage.healthy()
    assert await storage.append_telemetry(samples(20)) == 10


# --------------------------------------------------------------------------- export


async def test_telemetry_changes_hold_back_rows_until_earlier_transactions_commit(
    storage: PostgresStorage, postgres_url: str
) -> None:
    """A writer that started first but commits last must not be skipped: the reader sees
    nothing past the oldest transaction still running, so the later writer's committed
    row waits for the earlier one's, and both come out in order, each once."""
    early, late = samples(2, assets=2)
    slow = await asyncpg.connect(postgres_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute(
            "INSERT INTO telemetry (asset_id, site_id, ts, mw, online, seq, quality, details)"
            " VALUES ($1, $2, $3, $4, true, $5, 'good', $6::text::jsonb)",
            early.asset_id,
            early.site_id,
            early.ts,
            early.mw,
            early.seq,
            '{"soc_pct": 50.0}',
        )
        await storage.append_telemetry([late])  # a later transaction, committed first

        held = await storage.telemetry_changes(None, 10)
        assert held.samples == [], "a row was given while an earlier writer was running"

        await transaction.commit()
    finally:
        await slow.close()
    # Visibility follows the oldest transaction on the whole server: another test's (a
    # parallel worker's) may still be open for a moment after ours committed.
    seen: list[object] = []
    cursor: list[str | None] = [held.cursor]

    async def both_given() -> bool:
        changes = await storage.telemetry_changes(held.cursor, 10)
        seen[:], cursor[0] = changes.samples, changes.cursor
        return len(seen) >= 2

    await waits.wait_until(
        both_given, "the two rows once every earlier writer committed", timeout_s=10
    )
    assert seen == [early, late]
    assert (await storage.telemetry_changes(cursor[0], 10)).samples == []


async def test_telemetry_pages_stream_a_range_with_a_server_side_cursor(
    storage: PostgresStorage,
) -> None:
    stored = samples(250, assets=5)
    await storage.append_telemetry(stored)
    pages = [
        page
        async for page in storage.telemetry_pages(
            T0, T0 + timedelta(seconds=40), site_id="site-1", page_size=64
        )
    ]
    assert [len(p) for p in pages] == [64, 64, 64, 8]
    wanted = sorted(
        (s for s in stored if s.ts < T0 + timedelta(seconds=40)),
        key=lambda s: (s.ts, s.asset_id),
    )
    assert [s for page in pages for s in page] == wanted
