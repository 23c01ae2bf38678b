-- name: maintenance_purge_batch
-- Delete one bounded batch of finished instances; executions, leases and events go by cascade.
WITH doomed AS (
    SELECT instance_id FROM {schema}.workflow_instances
    WHERE state = ANY(%(states)s::text[]) AND updated_at < now() - %(older_than)s::interval
    ORDER BY updated_at
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.workflow_instances w USING doomed d
WHERE w.instance_id = d.instance_id
RETURNING w.instance_id
