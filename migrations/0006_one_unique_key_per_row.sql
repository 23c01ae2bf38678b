-- Give each execution and event one unique index instead of two.
--
-- Until 0005, an execution was indexed three times: by its primary key, by its idempotency key
-- (uk_task_executions_idempotency_key: the instance id, "compensate" for a compensation, the task id
-- and the attempt number, joined by colons) and by (workflow_instance_id, task_id)
-- (ix_task_executions_instance); an event was unique twice over, by
-- (workflow_instance_id, sequence_number) and by its idempotency key (uk_events_idempotency_key). The
-- key indexes took a random text entry per row: a single-task workflow wrote nine entries in those
-- three indexes from start to finish (its execution row is written twice with new index entries: at
-- the start and when it is leased). Here:
-- * an execution is unique by (workflow_instance_id, task_id, kind, attempt_number), the values its
--   idempotency key is made of, in one index that also serves every lookup of an instance's tasks, so
--   the key's own index and ix_task_executions_instance go (two entries come back: seven fewer). The
--   key stays a column, made from those values by the engine (check_invariants reports one that is
--   not: execution-key-matches), so the new constraint refuses a second row for an attempt as the
--   key's did;
-- * an event's idempotency key stays a column, no longer indexed: an event is identified by
--   uk_events_sequence, every append holds its instance's row lock under the sequence guard, and each
--   key names what makes its event happen once (an execution id, a fence token, a lapse count or the
--   sequence number). check_invariants reports a repeated key (event-keys-unique).
-- The index is built first, holding task_executions against writes (SHARE: reads go on), about a
-- second per million executions; the constraint changes after it take ACCESS EXCLUSIVE locks on
-- task_executions and events, held until the migration commits, right after.

CREATE UNIQUE INDEX uk_task_executions_attempt
    ON task_executions (workflow_instance_id, task_id, kind, attempt_number);
ALTER TABLE task_executions
    ADD CONSTRAINT uk_task_executions_attempt UNIQUE USING INDEX uk_task_executions_attempt;
ALTER TABLE task_executions DROP CONSTRAINT uk_task_executions_idempotency_key;
DROP INDEX ix_task_executions_instance;
ALTER TABLE events DROP CONSTRAINT uk_events_idempotency_key;
