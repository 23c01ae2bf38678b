-- name: check_sequence_gaps
-- Gapless and consistent: events 1..n exist and the instance's sequence_number is n.
SELECT w.instance_id, w.sequence_number, count(e.event_id) AS events,
       min(e.sequence_number) AS lowest, max(e.sequence_number) AS highest
FROM {schema}.workflow_instances w
LEFT JOIN {schema}.events e ON e.workflow_instance_id = w.instance_id
GROUP BY w.instance_id, w.sequence_number
HAVING count(e.event_id) <> w.sequence_number
    OR COALESCE(min(e.sequence_number), 1) <> 1
    OR COALESCE(max(e.sequence_number), 0) <> w.sequence_number

-- name: check_duplicate_completions
SELECT workflow_instance_id, payload ->> 'execution_id' AS execution_id, count(*) AS accepted
FROM {schema}.events
WHERE event_type IN ('TASK_COMPLETED', 'COMPENSATION_TASK_COMPLETED')
GROUP BY workflow_instance_id, payload ->> 'execution_id'
HAVING count(*) > 1

-- name: check_duplicate_event_keys
-- No index enforces it since migration 0006: each key names what makes its event happen once.
SELECT workflow_instance_id, idempotency_key, count(*) AS events
FROM {schema}.events
GROUP BY workflow_instance_id, idempotency_key
HAVING count(*) > 1

-- name: check_execution_keys
-- An execution's idempotency key is made of the values uk_task_executions_attempt keeps unique.
SELECT workflow_instance_id, execution_id, idempotency_key
FROM {schema}.task_executions
WHERE idempotency_key IS DISTINCT FROM
      workflow_instance_id || ':' || CASE WHEN kind = 'COMPENSATION' THEN 'compensate:' ELSE '' END
      || task_id || ':' || attempt_number

-- name: check_duplicate_completed_tasks
SELECT workflow_instance_id, kind, task_id, count(*) AS completed
FROM {schema}.task_executions
WHERE state = 'COMPLETED'
GROUP BY workflow_instance_id, kind, task_id
HAVING count(*) > 1

-- name: check_incomplete_completed_workflows
SELECT w.instance_id,
       jsonb_array_length(d.definition -> 'tasks') AS tasks,
       (SELECT count(DISTINCT e.task_id) FROM {schema}.task_executions e
        WHERE e.workflow_instance_id = w.instance_id AND e.kind = 'FORWARD' AND e.state = 'COMPLETED') AS completed
FROM {schema}.workflow_instances w
JOIN {schema}.workflow_definitions d
  ON d.namespace = w.namespace AND d.name = w.workflow_name AND d.version = w.workflow_version
WHERE w.state = 'COMPLETED'
  AND jsonb_array_length(d.definition -> 'tasks') <>
      (SELECT count(DISTINCT e.task_id) FROM {schema}.task_executions e
       WHERE e.workflow_instance_id = w.instance_id AND e.kind = 'FORWARD' AND e.state = 'COMPLETED')

-- name: check_fence_order
-- Every grant of an execution must carry a larger fence token than the grant before it.
SELECT workflow_instance_id, execution_id, fence_token, previous
FROM (
    SELECT workflow_instance_id, payload ->> 'execution_id' AS execution_id,
           (payload ->> 'fence_token')::bigint AS fence_token,
           lag((payload ->> 'fence_token')::bigint)
               OVER (PARTITION BY payload ->> 'execution_id' ORDER BY sequence_number) AS previous
    FROM {schema}.events
    WHERE event_type IN ('TASK_STARTED', 'COMPENSATION_TASK_STARTED')
) grants
WHERE previous IS NOT NULL AND fence_token <= previous

-- name: check_lease_behind_execution
SELECT e.workflow_instance_id, e.execution_id, e.fence_token, l.fence_token AS lease_fence
FROM {schema}.task_executions e
JOIN {schema}.execution_leases l ON l.lease_key = e.execution_id
WHERE l.fence_token < e.fence_token

-- name: check_running_without_lease
SELECT workflow_instance_id, execution_id
FROM {schema}.task_executions
WHERE state = 'RUNNING' AND (lease_holder IS NULL OR lease_expires_at IS NULL)

-- name: check_rows_without_instance
-- The child tables have no foreign keys (migration 0005): every engine writer holds the instance's row
-- lock, and purge deletes an instance with its rows. A row whose instance is gone was written or
-- deleted around the engine. One row per child table and missing instance, with how many rows.
SELECT o.child, o.workflow_instance_id, count(*) AS n
FROM (
    SELECT 'task_executions' AS child, e.workflow_instance_id FROM {schema}.task_executions e
    WHERE NOT EXISTS (SELECT FROM {schema}.workflow_instances w WHERE w.instance_id = e.workflow_instance_id)
    UNION ALL
    SELECT 'execution_leases', l.workflow_instance_id FROM {schema}.execution_leases l
    WHERE NOT EXISTS (SELECT FROM {schema}.workflow_instances w WHERE w.instance_id = l.workflow_instance_id)
    UNION ALL
    SELECT 'events', v.workflow_instance_id FROM {schema}.events v
    WHERE NOT EXISTS (SELECT FROM {schema}.workflow_instances w WHERE w.instance_id = v.workflow_instance_id)
) o
GROUP BY o.child, o.workflow_instance_id

-- name: check_instances_without_definition
-- No foreign key since migration 0008: the engine starts instances only of definitions it has read,
-- and never deletes one. An instance whose definition is gone lost it to a hand-made DELETE.
SELECT w.instance_id, w.namespace, w.workflow_name, w.workflow_version
FROM {schema}.workflow_instances w
WHERE NOT EXISTS (SELECT FROM {schema}.workflow_definitions d
                  WHERE d.namespace = w.namespace AND d.name = w.workflow_name
                    AND d.version = w.workflow_version)

-- name: check_open_work_in_finished_workflows
SELECT e.workflow_instance_id, e.execution_id, e.state, w.state AS workflow_state
FROM {schema}.task_executions e
JOIN {schema}.workflow_instances w ON w.instance_id = e.workflow_instance_id
WHERE w.state IN ('COMPLETED', 'CANCELLED', 'COMPENSATED') AND e.state IN ('PENDING', 'READY', 'RUNNING')

-- name: check_ready_parking
-- READY executions are leasable (ready_at set) exactly while their workflow is RUNNING or COMPENSATING;
-- otherwise they are parked (ready_at NULL), so the poll's index scan never meets them.
SELECT e.workflow_instance_id, e.execution_id, e.ready_at IS NULL AS parked, w.state AS workflow_state
FROM {schema}.task_executions e
JOIN {schema}.workflow_instances w ON w.instance_id = e.workflow_instance_id
WHERE e.state = 'READY'
  AND (e.ready_at IS NULL) = (w.state IN ('RUNNING', 'COMPENSATING'))

-- name: check_lease_expiry
-- A RUNNING execution has a lease row with its expiry (lapsed leases are found through those rows);
-- any other execution's lease row has none.
SELECT e.workflow_instance_id, e.execution_id, e.state, l.lease_key IS NOT NULL AS has_lease_row
FROM {schema}.task_executions e
LEFT JOIN {schema}.execution_leases l ON l.lease_key = e.execution_id
WHERE (e.state = 'RUNNING' AND (l.lease_key IS NULL OR l.expires_at IS DISTINCT FROM e.lease_expires_at))
   OR (e.state <> 'RUNNING' AND l.expires_at IS NOT NULL)

-- name: check_unfinished_workflows
SELECT instance_id, state FROM {schema}.workflow_instances
WHERE state NOT IN ('COMPLETED', 'CANCELLED', 'COMPENSATED')

-- name: check_instance_states
SELECT instance_id, state FROM {schema}.workflow_instances

-- name: check_replay_events
SELECT workflow_instance_id, sequence_number, event_type
FROM {schema}.events
WHERE event_type = ANY(%(event_types)s::text[])
ORDER BY workflow_instance_id, sequence_number
