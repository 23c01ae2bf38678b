-- Let the updates that finish a task and renew its lease be HOT updates (no new index entries).
--
-- PostgreSQL can update a row in place on its page (a heap-only tuple) only when no indexed column
-- changes, a column in a partial index's predicate included, and the page has room. In 0001 both
-- partial indexes of task_executions named `state`, so every state change of an execution added an
-- entry to every one of its indexes (a text key among them), and every lease renewal moved an
-- indexed column. Here:
-- * the ready index keys the same rows without naming `state`: an execution is ready to be picked
--   while it has a ready_at (not parked, not pending) and no started_at (not leased since it became
--   ready). A requeue clears started_at and a cancellation clears ready_at to keep that true;
-- * lapsed leases are found through the lease rows (execution_leases.expires_at), which every grant
--   and renewal already writes; a requeue clears the row's holder and expiry, and the rows of
--   finished executions are deleted as before;
-- * task_executions leaves a third of each new page free, for the finishing update.
-- Finishing a task (RUNNING -> COMPLETED or FAILED) then changes only unindexed columns.
-- Two CHECK constraints hold rows to that shape (no indexed column, so they cost no HOT update): a
-- statement that would leave a started READY row or a waiting cancelled one (an engine version from
-- before this migration, still running) fails loudly instead of wedging a task outside the index.

-- rows written under 0001 that the new predicates would misread
UPDATE task_executions SET started_at = NULL WHERE state = 'READY' AND started_at IS NOT NULL;
UPDATE task_executions SET ready_at = NULL
WHERE state <> 'READY' AND started_at IS NULL AND ready_at IS NOT NULL;
UPDATE execution_leases l SET holder_id = NULL, expires_at = NULL
FROM task_executions e
WHERE e.execution_id = l.lease_key AND e.state <> 'RUNNING' AND l.expires_at IS NOT NULL;

ALTER TABLE task_executions
    ADD CONSTRAINT ck_task_executions_ready_not_started CHECK (state <> 'READY' OR started_at IS NULL),
    ADD CONSTRAINT ck_task_executions_ready_at_while_ready
        CHECK (state = 'READY' OR ready_at IS NULL OR started_at IS NOT NULL);

DROP INDEX ix_task_executions_ready;
DROP INDEX ix_task_executions_lease;
CREATE INDEX ix_task_executions_ready ON task_executions (ready_at)
    WHERE ready_at IS NOT NULL AND started_at IS NULL;
CREATE INDEX ix_execution_leases_expires ON execution_leases (expires_at)
    WHERE expires_at IS NOT NULL;
ALTER TABLE task_executions SET (fillfactor = 70);

-- the poll's pick, as in 0002, with the ready index's new predicate
CREATE OR REPLACE FUNCTION next_ready_executions(p_namespace text, p_task_types text[], p_limit integer)
RETURNS TABLE (execution_id uuid, workflow_instance_id uuid, ready_at timestamptz)
LANGUAGE plpgsql
VOLATILE
ROWS 100
SET search_path FROM CURRENT
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
BEGIN
    RETURN QUERY
    SELECT e.execution_id, e.workflow_instance_id, e.ready_at
    FROM task_executions e
    WHERE e.ready_at <= now() AND e.started_at IS NULL AND e.state = 'READY'
      AND (p_namespace IS NULL OR e.namespace = p_namespace)
      AND (p_task_types IS NULL OR e.task_type = ANY(p_task_types))
    ORDER BY e.ready_at
    LIMIT p_limit
    FOR NO KEY UPDATE OF e SKIP LOCKED;
END
$$;
