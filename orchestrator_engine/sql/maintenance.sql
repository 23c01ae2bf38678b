-- name: maintenance_purge_batch
-- Delete one bounded batch of finished instances with their executions, leases and events: the
-- function purge_finished_instances (migration 0005), which runs as the schema's owner, so the
-- runtime role needs no DELETE on any table for it.
SELECT p.instance_id
FROM {schema}.purge_finished_instances(%(states)s::text[], %(older_than)s::interval, %(batch_size)s::integer) p

-- name: maintenance_counts_by_state
SELECT namespace, state, count(*) AS workflows
FROM {schema}.workflow_instances
GROUP BY namespace, state
ORDER BY namespace, state

-- name: maintenance_oldest_ready
-- (started_at IS NULL holds for every READY row, by constraint; it lets the ready index serve)
SELECT namespace, task_type, count(*) AS ready,
       EXTRACT(EPOCH FROM now() - min(ready_at)) AS oldest_age_s
FROM {schema}.task_executions
WHERE state = 'READY' AND ready_at <= now() AND started_at IS NULL
GROUP BY namespace, task_type
ORDER BY oldest_age_s DESC

-- name: maintenance_leases_lapsing
SELECT e.execution_id, e.workflow_instance_id, e.task_id, e.lease_holder, e.lease_expires_at,
       EXTRACT(EPOCH FROM e.lease_expires_at - now()) AS remaining_s
FROM {schema}.execution_leases l
JOIN {schema}.task_executions e ON e.execution_id = l.lease_key
WHERE l.expires_at < now() + %(within)s::interval AND e.state = 'RUNNING'
ORDER BY l.expires_at
LIMIT 50

-- name: maintenance_recent_pollers
-- Task types some worker leased recently: a ready type missing here may have no worker polling it.
SELECT DISTINCT task_type
FROM {schema}.task_executions
WHERE started_at > now() - %(window)s::interval

-- name: maintenance_now
SELECT now() AS now

-- name: maintenance_ready_depth
-- (started_at IS NULL holds for every READY row, by constraint; it lets the ready index serve)
SELECT count(*) AS depth FROM {schema}.task_executions
WHERE state = 'READY' AND ready_at <= now() AND started_at IS NULL
  AND (%(namespace)s::text IS NULL OR namespace = %(namespace)s::text)
