-- Continuous exporters (der_exporters, docs/export.md) read telemetry in the order it
-- became visible, from a durable cursor.
--
-- ingest_xid is the id of the transaction that stored the row (64-bit, so it never wraps).
-- Concurrent writers commit in any order, so an identity column would let a reader see
-- id 105 before id 100 commits, and skip 100. A reader instead takes only rows whose
-- transaction is older than every transaction still running (pg_snapshot_xmin of its
-- snapshot): no row can become visible below that horizon later. Rows stored before this
-- migration read 0 and are exported first, in (asset_id, ts) order.
ALTER TABLE telemetry ADD COLUMN ingest_xid bigint NOT NULL DEFAULT 0;
ALTER TABLE telemetry ALTER COLUMN ingest_xid SET DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX telemetry_by_ingest ON telemetry (ingest_xid, asset_id, ts);

CREATE TABLE exporter_cursors (
    name       text        PRIMARY KEY,
    cursor     text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
