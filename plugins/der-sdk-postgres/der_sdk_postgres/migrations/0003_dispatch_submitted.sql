-- The dispatch state "pending" (accepted, not yet sent) is now called "submitted", and a
-- target may be "acked" (received by the agent, not yet applied). Rewrites existing records
-- and their lifecycle events; the state column and the jsonb record stay in step.
UPDATE dispatches
SET state = CASE WHEN state = 'pending' THEN 'submitted' ELSE state END,
    record = regexp_replace(record::text, '"state": "pending"', '"state": "submitted"', 'g')::jsonb
WHERE record::text LIKE '%"state": "pending"%';

UPDATE dispatch_events SET state = 'submitted' WHERE state = 'pending';
