-- Telemetry becomes a TimescaleDB hypertable (1-day chunks on ts) when the extension can
-- be used in this database. Otherwise nothing changes: telemetry stays a plain table and
-- the retention job (PostgresStorage.prune_telemetry) keeps it bounded.
--
-- The inner block is a savepoint: an extension that is installed on the server but not
-- preloaded (shared_preload_libraries) or not permitted for this role leaves a NOTICE and
-- a plain table instead of failing the start of every headend.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            PERFORM create_hypertable(
                'telemetry', 'ts',
                chunk_time_interval => INTERVAL '1 day',
                if_not_exists => TRUE,
                migrate_data => TRUE
            );
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'der-sdk-postgres: telemetry stays a plain table: %', SQLERRM;
        END;
    END IF;
END
$$;
