-- Alarms (docs/alarms.md): one row per alarm. live is true for the live alarm of its
-- (asset_id, code) and NULL for the alarms before it; the partial unique index keeps one
-- live alarm per pair, whatever replicas change it at once (they also take an advisory
-- transaction lock per pair, der_sdk_postgres.storage.ALARM_LOCK_CLASS).
CREATE TABLE alarms (
    alarm_id        text        PRIMARY KEY,
    asset_id        text        NOT NULL,
    site_id         text        NOT NULL,
    code            text        NOT NULL,
    severity        text        NOT NULL,
    text            text        NOT NULL,
    state           text        NOT NULL,
    raised_at       timestamptz NOT NULL,
    cleared_at      timestamptz,
    acknowledged_at timestamptz,
    acknowledged_by text,
    raise_count     integer     NOT NULL,
    updated_at      timestamptz,
    live            boolean
);
CREATE UNIQUE INDEX alarms_live ON alarms (asset_id, code) WHERE live;
CREATE INDEX alarms_by_raised ON alarms (raised_at DESC, alarm_id DESC);
CREATE INDEX alarms_active ON alarms (severity) WHERE state = 'active';

-- The agent events already applied to alarms: an agent sends an event again until it is
-- acknowledged, and an event applied once must not change an alarm twice.
CREATE TABLE alarm_events (
    event_id   text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
