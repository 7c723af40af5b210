-- der-sdk-postgres schema, version 1. Applied once by der_sdk_postgres.migrations under
-- the migration advisory lock; never edit an applied migration, add a new file instead.

-- Telemetry: one row per (asset_id, ts). The primary key is the contract's dedupe key:
-- re-sent samples hit it and are skipped by INSERT ... ON CONFLICT DO NOTHING. A btree is
-- scanned in both directions, so the same index serves newest-first history by range
-- (asset_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts DESC) and latest-per-asset.
CREATE TABLE telemetry (
    asset_id       text             NOT NULL,
    site_id        text             NOT NULL,
    ts             timestamptz      NOT NULL,
    mw             double precision,
    mw_setpoint    double precision,
    online         boolean          NOT NULL,
    status         text,
    fault_code     text,
    seq            bigint           NOT NULL,
    quality        text             NOT NULL,
    quality_reason text,
    details        jsonb            NOT NULL DEFAULT '{}',
    CONSTRAINT telemetry_pkey PRIMARY KEY (asset_id, ts)
);
-- Time order for the retention job (ts < cutoff across all assets); BRIN stays tiny on
-- append-mostly time series and costs ingest almost nothing.
CREATE INDEX telemetry_ts_brin ON telemetry USING brin (ts);

-- Dispatch records: the whole record as jsonb (exact round trip) plus the columns that
-- queries filter and sort on.
CREATE TABLE dispatches (
    dispatch_id text             PRIMARY KEY,
    created_at  timestamptz      NOT NULL,
    updated_at  timestamptz      NOT NULL,
    asset_id    text,
    site_id     text,
    state       text             NOT NULL,
    mw          double precision NOT NULL,
    record      jsonb            NOT NULL
);
CREATE INDEX dispatches_by_created ON dispatches (created_at DESC, dispatch_id DESC);
CREATE INDEX dispatches_by_asset ON dispatches (asset_id, created_at DESC)
    WHERE asset_id IS NOT NULL;
CREATE INDEX dispatches_by_site ON dispatches (site_id, created_at DESC);
CREATE INDEX dispatches_by_state ON dispatches (state, created_at DESC);

-- The per-asset shares of a dispatch after split and clamp, so "dispatches for asset X"
-- finds site dispatches with a target for X.
CREATE TABLE dispatch_targets (
    dispatch_id text             NOT NULL REFERENCES dispatches ON DELETE CASCADE,
    asset_id    text             NOT NULL,
    mw          double precision NOT NULL,
    state       text             NOT NULL,
    applied_mw  double precision,
    reason      text,
    PRIMARY KEY (dispatch_id, asset_id)
);
CREATE INDEX dispatch_targets_by_asset ON dispatch_targets (asset_id, dispatch_id);

-- The lifecycle: every state change of a dispatch, oldest first by (ts, id).
CREATE TABLE dispatch_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dispatch_id text        NOT NULL,
    state       text        NOT NULL,
    ts          timestamptz NOT NULL,
    detail      text
);
CREATE INDEX dispatch_events_by_dispatch ON dispatch_events (dispatch_id, ts, id);

-- Presence: one row per asset per agent stream.
CREATE TABLE agent_sessions (
    session_id      text        PRIMARY KEY,
    asset_id        text        NOT NULL,
    asset_name      text,
    site_id         text        NOT NULL,
    site_name       text,
    agent_id        text        NOT NULL,
    peer            text        NOT NULL,
    connected_at    timestamptz NOT NULL,
    disconnected_at timestamptz
);
CREATE INDEX agent_sessions_by_asset
    ON agent_sessions (asset_id, connected_at DESC, session_id DESC);
CREATE INDEX agent_sessions_open ON agent_sessions (session_id) WHERE disconnected_at IS NULL;

CREATE TABLE heartbeats (
    asset_id text             NOT NULL,
    site_id  text             NOT NULL,
    agent_id text             NOT NULL,
    ts       timestamptz      NOT NULL,
    uptime_s double precision,
    PRIMARY KEY (asset_id, ts)
);
CREATE INDEX heartbeats_ts_brin ON heartbeats USING brin (ts);

CREATE TABLE events (
    id       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts       timestamptz NOT NULL,
    kind     text        NOT NULL,
    message  text        NOT NULL,
    asset_id text,
    site_id  text,
    data     jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX events_by_ts ON events (ts DESC, id DESC);
CREATE INDEX events_by_asset ON events (asset_id, ts DESC, id DESC);
CREATE INDEX events_by_kind ON events (kind, ts DESC, id DESC);
