-- Statements of the benchmark suite; {schema} is the workload's own schema, inserted as an identifier.

-- name: baseline_create
CREATE TABLE {schema}.bench (id integer PRIMARY KEY, n bigint NOT NULL)

-- name: baseline_fill
INSERT INTO {schema}.bench (id, n) SELECT g, 0 FROM generate_series(0, %(rows)s - 1) AS g

-- name: baseline_bump
UPDATE {schema}.bench SET n = n + 1 WHERE id = %(id)s RETURNING n

-- name: bench_busy
-- Cheap enough to ask five times a second during a drain: both probes read a partial index.
SELECT EXISTS (SELECT 1 FROM {schema}.task_executions WHERE state = 'READY')
    OR EXISTS (SELECT 1 FROM {schema}.task_executions WHERE state = 'RUNNING') AS busy

-- name: bench_progress
SELECT count(*) FILTER (WHERE state IN ('RUNNING', 'PAUSED', 'COMPENSATING')) AS open,
       count(*) AS total
FROM {schema}.workflow_instances

-- name: bench_window
-- The drain window read from the database: first lease granted to last workflow completed.
SELECT (SELECT min(started_at) FROM {schema}.task_executions) AS first_started,
       (SELECT max(updated_at) FROM {schema}.workflow_instances WHERE state = 'COMPLETED') AS last_completed,
       (SELECT count(*) FROM {schema}.task_executions WHERE state = 'COMPLETED') AS tasks,
       (SELECT count(*) FROM {schema}.workflow_instances WHERE state = 'COMPLETED') AS workflows

-- name: history_instances
-- Finished single-task workflows numbered first..last, shaped like the ones the engine leaves behind.
INSERT INTO {schema}.workflow_instances
    (instance_id, namespace, workflow_name, workflow_version, run_id, state, input, output,
     sequence_number, pending_tasks, pending_compensations, created_at, updated_at, finished_at)
SELECT md5('instance:' || g)::uuid, %(namespace)s, %(workflow_name)s, 1, 'history-' || g, 'COMPLETED',
       jsonb_build_object('i', g), jsonb_build_object('t', NULL),
       5, 0, 0, now() - interval '30 days' + g * interval '1 ms', now() - interval '30 days' + g * interval '1 ms',
       now() - interval '30 days' + g * interval '1 ms'
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g

-- name: history_executions
INSERT INTO {schema}.task_executions
    (execution_id, workflow_instance_id, namespace, task_id, task_type, kind, idempotency_key,
     attempt_number, lapse_count, max_attempts, state, depends_on, deps_remaining, input, output,
     lease_holder, lease_expires_at, fence_token, ready_at, started_at, finished_at, created_at)
SELECT md5('execution:' || g)::uuid, md5('instance:' || g)::uuid, %(namespace)s, 't', 'noop', 'FORWARD',
       md5('instance:' || g)::uuid::text || ':t:1', 1, 0, 3, 'COMPLETED', ARRAY[]::text[], 0,
       jsonb_build_object('workflow', jsonb_build_object('i', g), 'dependencies', jsonb_build_object()),
       'null'::jsonb, md5('worker')::uuid, t + interval '30 seconds', 1, t, t, t, t
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g,
     LATERAL (SELECT now() - interval '30 days' + g * interval '1 ms') AS at(t)

-- name: history_events
-- The five events of a finished single-task workflow, with the engine's idempotency keys and the
-- event ids it names by them (see docs/reference/events.md).
INSERT INTO {schema}.events
    (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key, created_at)
SELECT {schema}.event_id(v.idempotency_key), v.*
FROM (
    SELECT i.id, s.seq, s.event_type,
           jsonb_build_object('execution_id', x.id, 'task_id', 't', 'attempt', 1),
           i.id::text || ':' || s.key AS idempotency_key,
           now() - interval '30 days' + g * interval '1 ms'
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g,
         LATERAL (SELECT md5('instance:' || g)::uuid) AS i(id),
         LATERAL (SELECT md5('execution:' || g)::uuid) AS x(id),
         LATERAL (VALUES
             (1, 'WORKFLOW_STARTED', 'started'),
             (2, 'TASK_SCHEDULED', 'scheduled:' || x.id::text || ':0'),
             (3, 'TASK_STARTED', 'started:' || x.id::text || ':1'),
             (4, 'TASK_COMPLETED', 'completed:' || x.id::text),
             (5, 'WORKFLOW_COMPLETED', 'workflow_completed:5')
         ) AS s(seq, event_type, key)
) v

-- name: history_cycles_run
SELECT count(*) FROM {schema}.workflow_instances WHERE run_id LIKE 'cycle-%%'

-- name: profile_statements
-- pg_stat_statements rows of one workload: statements naming its schema, plus transaction control.
SELECT query, calls, plans, total_exec_time AS exec_ms, total_plan_time AS plan_ms
FROM pg_stat_statements
WHERE strpos(query, %(schema)s) > 0 OR query IN ('BEGIN', 'COMMIT')
ORDER BY total_exec_time + total_plan_time DESC

-- name: profile_task_times
-- How long each completed task held its lease (lease granted -> completion committed), in ms.
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
       max(ms) AS max
FROM (SELECT extract(epoch FROM finished_at - started_at) * 1000 AS ms
      FROM {schema}.task_executions WHERE state = 'COMPLETED') AS t
