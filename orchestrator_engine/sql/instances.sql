-- name: workflow_insert_if_absent
INSERT INTO {schema}.workflow_instances
    (instance_id, namespace, workflow_name, workflow_version, run_id, state, input, sequence_number,
     pending_tasks)
VALUES (%(instance_id)s, %(namespace)s, %(workflow_name)s, %(workflow_version)s, %(run_id)s, 'RUNNING',
        %(input)s::jsonb, 0, %(pending_tasks)s)
ON CONFLICT ON CONSTRAINT uk_idempotency DO NOTHING
RETURNING *

-- name: workflow_get
SELECT * FROM {schema}.workflow_instances WHERE instance_id = %(instance_id)s

-- name: workflow_get_by_run_id
SELECT * FROM {schema}.workflow_instances
WHERE namespace = %(namespace)s AND workflow_name = %(workflow_name)s AND run_id = %(run_id)s

-- name: workflow_lock
-- Every writer of an instance takes this row lock first, so concurrent writers of one instance queue
-- here instead of failing their sequence guard; writers of executions lock the instance before them.
SELECT * FROM {schema}.workflow_instances WHERE instance_id = %(instance_id)s FOR NO KEY UPDATE

-- name: workflow_lock_for_execution
SELECT * FROM {schema}.workflow_instances
WHERE instance_id = (SELECT e.workflow_instance_id FROM {schema}.task_executions e
                     WHERE e.execution_id = %(execution_id)s)
FOR NO KEY UPDATE

-- name: workflow_update_if_sequence
-- Append the unit of work's events and move the instance on, in one round trip.
WITH appended AS (
    INSERT INTO {schema}.events
        (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)
    SELECT gen_random_uuid(), r.workflow_instance_id, r.sequence_number, r.event_type, r.payload,
           r.idempotency_key
    FROM jsonb_to_recordset(%(events)s::jsonb)
        AS r(workflow_instance_id uuid, sequence_number bigint, event_type text, payload jsonb,
             idempotency_key text)
    RETURNING 1
)
UPDATE {schema}.workflow_instances
SET state = %(state)s,
    output = COALESCE(%(output)s::jsonb, output),
    pending_tasks = %(pending_tasks)s,
    pending_compensations = %(pending_compensations)s,
    sequence_number = %(new_sequence)s,
    updated_at = now()
WHERE instance_id = %(instance_id)s AND sequence_number = %(expected)s
  AND (SELECT count(*) FROM appended) = %(event_count)s
RETURNING *

-- name: workflow_collect_output
SELECT COALESCE(jsonb_object_agg(task_id, output), jsonb_build_object()) AS output
FROM {schema}.task_executions
WHERE workflow_instance_id = %(instance_id)s AND kind = 'FORWARD' AND state = 'COMPLETED'
