-- Write the rows of a running workflow with fewer foreign-key checks and index entries.
--
-- In 0001 every child row (an event, an execution, a lease) was checked against its instance by a
-- foreign-key trigger, and every event was indexed twice for uniqueness: by its random event_id and
-- by (workflow_instance_id, sequence_number). A single-task workflow writes five events, an execution
-- and a lease row, so the triggers (one lookup and row lock of the instance each) were a quarter of
-- a bulk start's statement time and the event_id index added five random-key index entries per workflow.
-- Here:
-- * the child tables keep workflow_instance_id but no foreign key. Every engine statement that writes
--   a child row holds its instance's row lock, or inserts the instance in the same statement, and
--   the only deleter of instances, purge below, takes that lock before it deletes any row;
-- * the cascade that purge relied on is purge_finished_instances: it deletes finished instances and
--   their executions, leases and events in one transaction. It runs as its owner (SECURITY DEFINER),
--   so the runtime role needs neither DELETE on events and task_executions (history stays
--   append-only for it) nor, from now on, DELETE on workflow_instances: it can remove only finished
--   workflows, whole. PUBLIC may not call it (revoked below): grant the runtime role the right to;
-- * events are identified by (workflow_instance_id, sequence_number), uk_events_sequence, which is
--   also the table's replica identity. event_id stays, a random uuid, no longer indexed: no statement
--   looks an event up by it. (Making the unique key the primary key would rebuild the largest index
--   of the schema under lock; dropping pk_events needs no rebuild.)
-- * execution_leases loses ix_execution_leases_instance, which served only the cascade; purge finds
--   a lease through its execution.
-- The instance's foreign key to its definition stays: one check per start, and definitions are
-- never deleted.

ALTER TABLE events DROP CONSTRAINT fk_events_instance;
ALTER TABLE task_executions DROP CONSTRAINT fk_task_executions_instance;
ALTER TABLE execution_leases DROP CONSTRAINT fk_execution_leases_instance;
DROP INDEX ix_execution_leases_instance;
ALTER TABLE events DROP CONSTRAINT pk_events;
ALTER TABLE events REPLICA IDENTITY USING INDEX uk_events_sequence;

-- A SECURITY DEFINER function must not resolve a name in a schema its caller controls: the caller's
-- temporary schema comes first in any search_path that does not name it, so a temporary table called
-- workflow_instances would stand in for ours. Its search_path is the engine's schema (set by the
-- migrator), then pg_temp, last.
-- (A DO block, because yoyo prints the rows a migration's SELECT returns.)
DO $$ BEGIN PERFORM set_config('search_path', current_setting('search_path') || ', pg_temp', true); END $$;

-- One bounded batch of the oldest finished instances, each deleted with everything it owns. Only
-- finished instances (finished_at is set exactly when the state is a finished one, by constraint),
-- whatever p_states names; SKIP LOCKED, so a batch never waits for a busy row.
-- The batch is locked first, and each delete is a statement of its own, run after: with its own
-- snapshot, it sees the rows a writer committed before the lock was taken (a late result of a
-- FAILED workflow's running task), and no writer adds rows once it is held. One statement would
-- read every table with the snapshot of its start and could leave such rows behind.
-- The deletes are index probes by instance id; scans are off so that no plan, generic or estimated
-- from stale statistics, reads a whole table per batch.
CREATE FUNCTION purge_finished_instances(p_states text[], p_older_than interval, p_batch_size integer)
RETURNS TABLE (instance_id uuid)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path FROM CURRENT
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    doomed uuid[];
BEGIN
    IF p_batch_size IS NULL OR p_batch_size < 1 THEN
        RAISE EXCEPTION 'p_batch_size must be a positive integer, got %', p_batch_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(b.instance_id) INTO doomed
    FROM (
        SELECT w.instance_id
        FROM workflow_instances w
        WHERE w.state = ANY(p_states) AND w.finished_at IS NOT NULL
          AND w.finished_at < now() - p_older_than
        ORDER BY w.finished_at
        LIMIT p_batch_size
        FOR UPDATE SKIP LOCKED
    ) b;
    IF doomed IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM execution_leases l USING task_executions e
    WHERE e.workflow_instance_id = ANY(doomed) AND l.lease_key = e.execution_id;
    DELETE FROM task_executions e WHERE e.workflow_instance_id = ANY(doomed);
    DELETE FROM events v WHERE v.workflow_instance_id = ANY(doomed);
    RETURN QUERY
    DELETE FROM workflow_instances w WHERE w.instance_id = ANY(doomed) RETURNING w.instance_id;
END
$$;

REVOKE EXECUTE ON FUNCTION purge_finished_instances(text[], interval, integer) FROM PUBLIC;
