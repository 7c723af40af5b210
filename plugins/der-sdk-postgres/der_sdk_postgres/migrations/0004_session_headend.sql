-- Sessions record the headend that opened them (HEADEND_ID), so that a headend that
-- starts closes only its own sessions left open. Sessions written before have none
-- (NULL): the first headend to start closes them, whatever its id.
ALTER TABLE agent_sessions ADD COLUMN headend_id text;
CREATE INDEX agent_sessions_open_by_headend
    ON agent_sessions (headend_id) WHERE disconnected_at IS NULL;
