-- Write the rows of a running workflow with fewer foreign-key checks and index entries.
--
-- In 0001 every child row (an event, an execution, a lease) was checked against its instance by a
-- foreign-key trigger, and every event was indexed twice for uniqueness: by its random event_id and
-- by (workflow_instance_id, sequence_number). A single-task workflow writes five events, an execution
-- and a lease row, so the triggers (one lookup and row lock of the instance each) were a third of a
-- bulk start's server time and the event_id index added five random-key index entries per workflow.
-- Here:
-- * the child tables keep workflow_instance_id but no foreign key. Every engine statement that writes
--   a child row holds its instance's row lock, or inserts the instance in the same statement, so the
--   check never had anything to catch that the lock did not already exclude;
-- * the cascade that purge relied on is purge_finished_instances: it deletes finished instances and
--   their executions, leases and events in one statement. It runs as its owner (SECURITY DEFINER),
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

-- One bounded batch of the oldest finished instances, each deleted with everything it owns. Only
-- finished instances (finished_at is set exactly when the state is a finished one, by constraint),
-- whatever p_states names; SKIP LOCKED, so a batch never waits for a busy row.
CREATE FUNCTION purge_finished_instances(p_states text[], p_older_than interval, p_batch_size integer)
RETURNS TABLE (instance_id uuid)
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
    WITH doomed AS (
        SELECT w.instance_id
        FROM workflow_instances w
        WHERE w.state = ANY(p_states) AND w.finished_at IS NOT NULL
          AND w.finished_at < now() - p_older_than
        ORDER BY w.finished_at
        LIMIT p_batch_size
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM workflow_instances w USING doomed d
        WHERE w.instance_id = d.instance_id
        RETURNING w.instance_id
    ), executions AS (
        DELETE FROM task_executions e USING gone g
        WHERE e.workflow_instance_id = g.instance_id
        RETURNING e.execution_id
    ), leases AS (
        DELETE FROM execution_leases l USING executions x
        WHERE l.lease_key = x.execution_id
    ), history AS (
        DELETE FROM events v USING gone g
        WHERE v.workflow_instance_id = g.instance_id
    )
    SELECT g.instance_id FROM gone g
$$;

REVOKE EXECUTE ON FUNCTION purge_finished_instances(text[], interval, integer) FROM PUBLIC;
