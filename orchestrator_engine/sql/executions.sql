-- name: task_insert_many
INSERT INTO {schema}.task_executions
    (execution_id, workflow_instance_id, namespace, task_id, task_type, kind, idempotency_key,
     attempt_number, lapse_count, max_attempts, state, depends_on, deps_remaining, input, timeout, ready_at)
SELECT r.execution_id, r.workflow_instance_id, r.namespace, r.task_id, r.task_type, r.kind, r.idempotency_key,
       r.attempt_number, r.lapse_count, r.max_attempts, r.state, r.depends_on, r.deps_remaining, r.input,
       make_interval(secs => r.timeout_ms / 1000.0),
       CASE WHEN r.state = 'READY' THEN now() END
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
    execution_id uuid, workflow_instance_id uuid, namespace text, task_id text, task_type text, kind text,
    idempotency_key text, attempt_number integer, lapse_count integer, max_attempts integer, state text,
    depends_on text[], deps_remaining integer, input jsonb, timeout_ms bigint)
RETURNING *

-- name: task_insert_retry
-- A new attempt copies the failed one; lapse_count carries over so lapses keep counting against
-- max_attempts across attempts.
INSERT INTO {schema}.task_executions
    (execution_id, workflow_instance_id, namespace, task_id, task_type, kind, idempotency_key,
     attempt_number, lapse_count, max_attempts, state, depends_on, deps_remaining, input, timeout, ready_at)
SELECT %(new_execution_id)s, e.workflow_instance_id, e.namespace, e.task_id, e.task_type, e.kind,
       %(idempotency_key)s, e.attempt_number + 1, e.lapse_count,
       GREATEST(e.max_attempts, %(min_max_attempts)s), 'READY', e.depends_on, 0,
       COALESCE(%(input)s::jsonb, e.input), e.timeout, now() + make_interval(secs => %(delay_s)s)
FROM {schema}.task_executions e
WHERE e.execution_id = %(execution_id)s
RETURNING *

-- name: task_get
SELECT * FROM {schema}.task_executions WHERE execution_id = %(execution_id)s

-- name: task_list_for_instance
SELECT * FROM {schema}.task_executions
WHERE workflow_instance_id = %(instance_id)s
ORDER BY created_at, task_id, attempt_number

-- name: task_latest_for_task
SELECT * FROM {schema}.task_executions
WHERE workflow_instance_id = %(instance_id)s AND task_id = %(task_id)s
ORDER BY created_at DESC, attempt_number DESC
LIMIT 1

-- name: task_completed_forward
SELECT * FROM {schema}.task_executions
WHERE workflow_instance_id = %(instance_id)s AND kind = 'FORWARD' AND state = 'COMPLETED'

-- name: task_lease_if_acquirable
-- Grant one execution. Its fence is one more than the execution's last (the row is locked while it
-- is raised, so every grant's token is greater than all earlier ones); the lease row in
-- execution_leases records the same token and never goes down.
WITH picked AS (
    SELECT e.execution_id
    FROM {schema}.task_executions e
    WHERE e.execution_id = %(execution_id)s AND e.state = 'READY' AND e.ready_at <= now()
    FOR NO KEY UPDATE
), granted AS (
    UPDATE {schema}.task_executions e
    SET state = 'RUNNING', lease_holder = %(worker_id)s,
        lease_expires_at = now() + LEAST(%(lease)s::interval, COALESCE(e.timeout, %(lease)s::interval)),
        fence_token = e.fence_token + 1, started_at = now(), deadline_at = now() + e.timeout
    FROM picked p
    WHERE e.execution_id = p.execution_id
    RETURNING e.*
), lease AS (
    INSERT INTO {schema}.execution_leases AS l (lease_key, workflow_instance_id, holder_id, expires_at, fence_token)
    SELECT g.execution_id, g.workflow_instance_id, g.lease_holder, g.lease_expires_at, g.fence_token
    FROM granted g
    ON CONFLICT (lease_key) DO UPDATE
        SET holder_id = EXCLUDED.holder_id, expires_at = EXCLUDED.expires_at,
            fence_token = GREATEST(l.fence_token + 1, EXCLUDED.fence_token)
    RETURNING 1
)
SELECT g.*, (SELECT count(*) FROM lease) AS leases_written FROM granted g

-- name: task_poll_and_lease
-- Pick the oldest ready executions, lease them, write one TASK_STARTED event each and advance each
-- instance's sequence, all in one statement.
-- The pick is next_ready_executions (migrations 0002, 0003): the oldest ready rows, from the ready index
-- in order (ORDER BY ready_at LIMIT n), locked with SKIP LOCKED. A function, because only a function
-- can carry the planner settings that make that plan hold with no or stale statistics. READY rows of
-- a workflow that is not running (paused, failed) are parked with ready_at NULL, so every ready row the
-- index yields belongs to a runnable instance; the state is still re-checked.
-- The function reads with its own, newer snapshot; the primary-key probe keeps only the rows this
-- statement's snapshot sees too, so every row counted below is one the UPDATE reaches (a row a start
-- or a retry committed in between stays READY, for the next poll).
-- A poller never waits: it locks executions, then their instance rows, with SKIP LOCKED, so it cannot
-- be part of a cycle of waits and never queues behind a busy instance (a worker that comes back short
-- re-polls soon). Row locking re-reads the newest committed instance row, so seq0 is current.
-- The instance rows are reached by primary key, whatever the table sizes and statistics: locked
-- through LATERAL (one probe each), advanced through an `= ANY(ARRAY(...))` condition; a join the
-- planner may cost against a whole table would scan it when it is small, batch after batch.
WITH candidates AS MATERIALIZED (
    SELECT c.execution_id, c.workflow_instance_id, c.ready_at
    FROM {schema}.next_ready_executions(%(namespace)s::text, %(task_types)s::text[], %(limit)s::integer) c
    CROSS JOIN LATERAL (
        SELECT 1 FROM {schema}.task_executions x WHERE x.execution_id = c.execution_id OFFSET 0
    ) seen
), picked AS MATERIALIZED (
    SELECT c.execution_id, c.workflow_instance_id, c.ready_at, w.sequence_number AS seq0
    FROM candidates c
    CROSS JOIN LATERAL (
        SELECT w.sequence_number
        FROM {schema}.workflow_instances w
        WHERE w.instance_id = c.workflow_instance_id AND w.state IN ('RUNNING', 'COMPENSATING')
        FOR NO KEY UPDATE SKIP LOCKED
    ) w
), numbered AS MATERIALIZED (
    SELECT p.*,
           row_number() OVER (PARTITION BY p.workflow_instance_id ORDER BY p.ready_at, p.execution_id) AS rn,
           count(*) OVER (PARTITION BY p.workflow_instance_id) AS cnt
    FROM picked p
), granted AS (
    -- the grant's fence is one more than the execution's last: every grant of an execution updates
    -- this row while holding its lock, so the tokens strictly increase; the lease row gets the same
    -- token below. The event's sequence number comes back too, so no CTE is joined again downstream.
    -- The `= ANY(ARRAY(...))` condition makes the rows a primary-key probe whatever the estimates.
    UPDATE {schema}.task_executions e
    SET state = 'RUNNING', lease_holder = %(worker_id)s,
        lease_expires_at = now() + LEAST(%(lease)s::interval, COALESCE(e.timeout, %(lease)s::interval)),
        fence_token = e.fence_token + 1, started_at = now(), deadline_at = now() + e.timeout
    FROM numbered n
    WHERE e.execution_id = n.execution_id
      AND e.execution_id = ANY(ARRAY(SELECT n2.execution_id FROM numbered n2))
    RETURNING e.*, n.seq0 + n.rn AS event_sequence
), lease AS (
    INSERT INTO {schema}.execution_leases AS l (lease_key, workflow_instance_id, holder_id, expires_at, fence_token)
    SELECT g.execution_id, g.workflow_instance_id, g.lease_holder, g.lease_expires_at, g.fence_token
    FROM granted g
    ON CONFLICT (lease_key) DO UPDATE
        SET holder_id = EXCLUDED.holder_id, expires_at = EXCLUDED.expires_at,
            fence_token = GREATEST(l.fence_token + 1, EXCLUDED.fence_token)
    RETURNING 1
), started AS (
    INSERT INTO {schema}.events
        (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)
    SELECT {schema}.event_id(v.idempotency_key), v.*
    FROM (
        SELECT g.workflow_instance_id, g.event_sequence,
               CASE g.kind WHEN 'FORWARD' THEN 'TASK_STARTED' ELSE 'COMPENSATION_TASK_STARTED' END,
               jsonb_build_object('execution_id', g.execution_id, 'task_id', g.task_id, 'kind', g.kind,
                                  'attempt', g.attempt_number, 'worker_id', g.lease_holder,
                                  'fence_token', g.fence_token),
               g.workflow_instance_id::text || ':started:' || g.execution_id::text || ':'
                   || g.fence_token::text AS idempotency_key
        FROM granted g
    ) v
    RETURNING 1
), bumped AS (
    UPDATE {schema}.workflow_instances w
    SET sequence_number = s.seq0 + s.cnt, updated_at = now()
    FROM (SELECT DISTINCT workflow_instance_id, seq0, cnt FROM numbered) s
    -- no sequence guard here: seq0 was read from the row this statement holds locked, while the
    -- UPDATE would compare against the statement's older snapshot
    WHERE w.instance_id = s.workflow_instance_id
      AND w.instance_id = ANY(ARRAY(SELECT n2.workflow_instance_id FROM numbered n2))
    RETURNING 1
)
SELECT g.*,
       (SELECT count(*) FROM bumped) AS bumped_instances,
       (SELECT count(DISTINCT workflow_instance_id) FROM numbered) AS picked_instances,
       (SELECT count(*) FROM started) AS started_events,
       (SELECT count(*) FROM lease) AS leases_written
FROM granted g
ORDER BY g.ready_at
-- name: task_select_lapsed
-- Lapsed leases, locked with their instance; SKIP LOCKED so reclaimers never wait on each other.
-- Found through the lease rows' expiry index (migration 0003): a grant and every renewal write the
-- same expiry to the lease row and the execution; the execution's own columns are re-checked.
SELECT e.execution_id, e.workflow_instance_id
FROM {schema}.execution_leases l
JOIN {schema}.task_executions e ON e.execution_id = l.lease_key
JOIN {schema}.workflow_instances w ON w.instance_id = e.workflow_instance_id
WHERE l.expires_at < now() AND e.state = 'RUNNING' AND e.lease_expires_at < now()
ORDER BY l.expires_at
LIMIT %(limit)s
FOR NO KEY UPDATE OF e, w SKIP LOCKED

-- name: task_requeue_if_lapsed
-- READY again, with no started_at (the ready index holds rows with a ready_at and no started_at) and
-- its old ready_at, so it goes to the front of the queue. The lease row stays, for its fence token,
-- without a holder or an expiry.
WITH requeued AS (
    UPDATE {schema}.task_executions
    SET state = 'READY', lapse_count = lapse_count + 1, lease_holder = NULL, lease_expires_at = NULL,
        deadline_at = NULL, started_at = NULL
    WHERE execution_id = %(execution_id)s AND state = 'RUNNING' AND lease_expires_at < now()
    RETURNING *
), released AS (
    UPDATE {schema}.execution_leases l SET holder_id = NULL, expires_at = NULL
    FROM requeued r WHERE l.lease_key = r.execution_id
)
SELECT * FROM requeued

-- name: task_fail_if_lapsed
-- The finished execution's lease row goes in the same statement.
WITH finished AS (
    UPDATE {schema}.task_executions
    SET state = 'FAILED', error = %(error)s::jsonb, finished_at = now(), lapse_count = lapse_count + %(lapse)s
    WHERE execution_id = %(execution_id)s AND state = 'RUNNING' AND lease_expires_at < now()
    RETURNING *
), released AS (
    DELETE FROM {schema}.execution_leases l USING finished f WHERE l.lease_key = f.execution_id
)
SELECT * FROM finished

-- name: task_finish_if_fenced
-- Finish a batch of executions held by one worker: each row of the batch is COMPLETED (with output)
-- or FAILED (with error), accepted only under its fence token; lease rows go in the same statement.
-- Lock order, the one every writer keeps: the instances first, in instance order (the one-time filter
-- on `held` takes them all before any execution), then the executions in (instance, execution) order,
-- as lease renewal takes them. Each lock is taken by a LATERAL primary-key probe driven by the sorted
-- `batch`, so the nested loop takes the locks in that order, and no plan, whatever the table sizes
-- and statistics, scans a whole table. Each row carries its instance (w_* columns) from the lock on.
-- The batch is one JSON array of objects: "e" execution id, "t" fence token, "s" state, "o" output,
-- "x" error (see ExecutionRepository.finish_parameters); a missing "o" or "x" reads as NULL.
WITH req AS MATERIALIZED (
    SELECT (r->>'e')::uuid AS execution_id, (r->>'t')::numeric AS fence_token, r->>'s' AS state,
           r->'o' AS output, r->'x' AS error
    FROM jsonb_array_elements(%(results)s::jsonb) AS r
), batch AS MATERIALIZED (
    SELECT x.execution_id, x.workflow_instance_id, q.fence_token, q.state, q.output, q.error
    FROM {schema}.task_executions x
    JOIN req q ON q.execution_id = x.execution_id
    WHERE x.execution_id = ANY(ARRAY(SELECT q2.execution_id FROM req q2))
    ORDER BY x.workflow_instance_id, x.execution_id
), locked AS MATERIALIZED (
    SELECT b.execution_id, b.fence_token, b.state, b.output, b.error,
           w.namespace AS w_namespace, w.workflow_name AS w_workflow_name,
           w.workflow_version AS w_workflow_version, w.state AS w_state,
           w.sequence_number AS w_sequence_number, w.pending_tasks AS w_pending_tasks,
           w.pending_compensations AS w_pending_compensations
    FROM batch b
    CROSS JOIN LATERAL (
        SELECT w.namespace, w.workflow_name, w.workflow_version, w.state, w.sequence_number,
               w.pending_tasks, w.pending_compensations
        FROM {schema}.workflow_instances w
        WHERE w.instance_id = b.workflow_instance_id
        FOR NO KEY UPDATE
    ) w
), held AS MATERIALIZED (
    SELECT k.*
    FROM locked k
    CROSS JOIN LATERAL (
        -- the primary key is the probe's only condition (OFFSET 0 keeps the planner from pushing the
        -- state test down, which would make the partial lease index a candidate for the probe); the
        -- conditions are checked outside, on the locked row
        SELECT e.state, e.lease_holder, e.fence_token
        FROM {schema}.task_executions e
        WHERE e.execution_id = k.execution_id
        OFFSET 0
        FOR NO KEY UPDATE
    ) e
    WHERE (SELECT count(*) FROM locked) >= 0
      AND e.state = 'RUNNING' AND e.lease_holder = %(worker_id)s AND e.fence_token = k.fence_token
), finished AS (
    UPDATE {schema}.task_executions e
    SET state = h.state, output = h.output, error = h.error, finished_at = now()
    FROM held h
    WHERE e.execution_id = h.execution_id
    RETURNING e.execution_id, e.workflow_instance_id, e.task_id, e.kind, e.state, e.attempt_number,
              e.lapse_count, e.max_attempts, e.fence_token, e.error, h.w_namespace, h.w_workflow_name,
              h.w_workflow_version, h.w_state, h.w_sequence_number, h.w_pending_tasks,
              h.w_pending_compensations
), released AS (
    DELETE FROM {schema}.execution_leases l USING finished f WHERE l.lease_key = f.execution_id
)
SELECT * FROM finished f ORDER BY f.workflow_instance_id, f.execution_id

-- name: task_complete_many
-- Complete a batch of forward executions of running workflows in one statement: what
-- task_finish_if_fenced, task_release_dependents and workflow_update_if_sequence do in three, with the
-- events the engine's units of work write for them (TASK_COMPLETED in execution order, then
-- TASK_SCHEDULED for each dependent made READY, then WORKFLOW_COMPLETED when no forward task is left).
-- Locks as task_finish_if_fenced takes them: instances in instance order, then executions.
-- One statement has one snapshot, taken before it waited for any lock, so what it reads without a
-- lock is current only if it did not change in between. It reads so the outputs of completed tasks,
-- for the input of a dependent it makes READY and the output of a workflow it completes (the
-- dependents themselves and every row it writes are locked, so their newest versions are read). Only
-- a forward task completing changes those outputs, and each one lowers the instance's pending_tasks,
-- which never rises: so the snapshot's pending_tasks and state are compared with the locked row's
-- (w_seen_current). Polls, renewals, lapses and retries that commit meanwhile write no output (a
-- state they change is caught by the comparison, on the safe side). An instance whose snapshot is
-- behind where it matters, that is not RUNNING, or that has a compensation or a failure in the batch
-- is left alone: its results come back in `general` for the caller to record with the three
-- statements; the others are written here.
-- Outputs of the executions this statement finishes are not in its snapshot: the dependents' inputs
-- and the workflow's output take them from the batch, through `deps` and `summary`.
-- Returns the finished executions' rows (every column), or one row of NULLs, each with `general`.
-- task_complete_many_ids (sql/__init__.py) is this statement answering with the finished executions'
-- ids only, for the worker's group commit.
WITH req AS MATERIALIZED (
    SELECT (r->>'e')::uuid AS execution_id, (r->>'t')::numeric AS fence_token, r->>'s' AS state,
           r->'o' AS output
    FROM jsonb_array_elements(%(results)s::jsonb) AS r
), batch AS MATERIALIZED (
    SELECT x.execution_id, x.workflow_instance_id, q.fence_token, q.state, q.output
    FROM {schema}.task_executions x
    JOIN req q ON q.execution_id = x.execution_id
    WHERE x.execution_id = ANY(ARRAY(SELECT q2.execution_id FROM req q2))
    ORDER BY x.workflow_instance_id, x.execution_id
), locked AS MATERIALIZED (
    SELECT b.execution_id, b.workflow_instance_id, b.fence_token, b.state, b.output,
           w.state AS w_state, w.sequence_number AS w_sequence_number, w.pending_tasks AS w_pending_tasks,
           -- the instance as this statement's snapshot holds it (a read without a lock) against the
           -- locked row; a scalar subquery, so no join can reorder the rows, whose order is the
           -- order in which `held` locks the executions
           (SELECT s.state = w.state AND s.pending_tasks = w.pending_tasks
            FROM {schema}.workflow_instances s
            WHERE s.instance_id = b.workflow_instance_id) AS w_seen_current
    FROM batch b
    CROSS JOIN LATERAL (
        SELECT w.state, w.sequence_number, w.pending_tasks
        FROM {schema}.workflow_instances w
        WHERE w.instance_id = b.workflow_instance_id
        FOR NO KEY UPDATE
    ) w
), held AS MATERIALIZED (
    SELECT k.*, e.kind, e.task_id
    FROM locked k
    CROSS JOIN LATERAL (
        -- see task_finish_if_fenced
        SELECT e.state, e.lease_holder, e.fence_token, e.kind, e.task_id
        FROM {schema}.task_executions e
        WHERE e.execution_id = k.execution_id
        OFFSET 0
        FOR NO KEY UPDATE
    ) e
    WHERE (SELECT count(*) FROM locked) >= 0
      AND e.state = 'RUNNING' AND e.lease_holder = %(worker_id)s AND e.fence_token = k.fence_token
), gathered AS MATERIALIZED (
    -- the held executions per instance: their task ids, outputs and the instance's first sequence
    SELECT h.workflow_instance_id, array_agg(h.task_id) AS task_ids,
           jsonb_object_agg(h.task_id, h.output) AS outputs, min(h.w_sequence_number) AS seq0
    FROM held h
    GROUP BY h.workflow_instance_id
), deps AS MATERIALIZED (
    -- the waiting dependents of the held executions (see task_release_dependents), found by one
    -- probe of the instance index per instance, locked after the executions, so deps_remaining is
    -- the newest; each takes the outputs of the held executions it depends on (not in the snapshot
    -- once written) and its instance's first sequence number
    SELECT g.workflow_instance_id, x.execution_id, x.deps_remaining,
           (SELECT count(*)::integer FROM unnest(x.depends_on) AS t(task_id)
            WHERE t.task_id = ANY(g.task_ids)) AS n,
           (SELECT jsonb_object_agg(o.key, o.value) FROM jsonb_each(g.outputs) AS o
            WHERE o.key = ANY(x.depends_on)) AS outputs,
           g.seq0
    FROM gathered g
    CROSS JOIN LATERAL (
        SELECT x.execution_id, x.deps_remaining, x.depends_on
        FROM {schema}.task_executions x
        WHERE x.workflow_instance_id = g.workflow_instance_id AND x.kind = 'FORWARD'
          AND x.depends_on && g.task_ids AND x.state = 'PENDING'
        OFFSET 0
        FOR NO KEY UPDATE
    ) x
), general AS MATERIALIZED (
    SELECT h.workflow_instance_id
    FROM held h
    WHERE h.state <> 'COMPLETED' OR h.kind <> 'FORWARD' OR h.w_state <> 'RUNNING'
    UNION
    -- a snapshot behind the lock, where this statement would read from it: to build the input of a
    -- dependent it makes READY, or the output of the workflow it completes
    SELECT h.workflow_instance_id
    FROM held h
    WHERE h.w_seen_current IS NOT TRUE
      AND (EXISTS (SELECT FROM deps d
                   WHERE d.workflow_instance_id = h.workflow_instance_id AND d.deps_remaining = d.n)
           OR h.w_pending_tasks = (SELECT count(*) FROM held h2
                                   WHERE h2.workflow_instance_id = h.workflow_instance_id))
), current AS MATERIALIZED (
    SELECT h.*
    FROM held h
    WHERE h.workflow_instance_id NOT IN (SELECT g.workflow_instance_id FROM general g)
), finished AS (
    UPDATE {schema}.task_executions e
    SET state = 'COMPLETED', output = h.output, error = NULL, finished_at = now()
    FROM current h
    WHERE e.execution_id = h.execution_id
    RETURNING e.*, h.w_sequence_number, h.w_pending_tasks
), released AS (
    DELETE FROM {schema}.execution_leases l USING finished f WHERE l.lease_key = f.execution_id
), ready AS (
    UPDATE {schema}.task_executions e
    SET deps_remaining = e.deps_remaining - h.n,
        state = CASE WHEN e.deps_remaining = h.n THEN 'READY' ELSE 'PENDING' END,
        ready_at = CASE WHEN e.deps_remaining = h.n THEN now() END,
        input = CASE WHEN e.deps_remaining = h.n THEN
            jsonb_build_object(
                'workflow', (SELECT w.input FROM {schema}.workflow_instances w
                             WHERE w.instance_id = e.workflow_instance_id),
                'dependencies',
                (SELECT COALESCE(jsonb_object_agg(d.task_id, d.output), jsonb_build_object())
                 FROM {schema}.task_executions d
                 WHERE d.workflow_instance_id = e.workflow_instance_id AND d.kind = 'FORWARD'
                   AND d.state = 'COMPLETED' AND d.task_id = ANY(e.depends_on))
                || h.outputs)
            ELSE e.input END
    FROM deps h
    WHERE e.execution_id = h.execution_id
      AND h.workflow_instance_id NOT IN (SELECT g.workflow_instance_id FROM general g)
    RETURNING e.execution_id, e.workflow_instance_id, e.namespace, e.task_id, e.state, e.attempt_number,
              e.lapse_count, h.seq0
), summary AS MATERIALIZED (
    -- per instance, in one aggregate: the estimates of these CTEs are a row or two, so a join of two
    -- of them runs as a nested loop, batch size squared
    SELECT u.instance_id, min(u.seq0) AS seq0, min(u.pending) - count(*) FILTER (WHERE u.done) AS pending,
           count(*) AS events, jsonb_object_agg(u.task_id, u.output) FILTER (WHERE u.done) AS outputs
    FROM (SELECT f.workflow_instance_id AS instance_id, f.w_sequence_number AS seq0,
                 f.w_pending_tasks AS pending, true AS done, f.task_id, f.output
          FROM finished f
          UNION ALL
          SELECT r.workflow_instance_id, r.seq0, NULL, false, NULL, NULL
          FROM ready r
          WHERE r.state = 'READY') u
    GROUP BY u.instance_id
), news AS (
    SELECT n.instance_id, n.event_type, n.payload, n.idempotency_key,
           n.seq0 + row_number() OVER (PARTITION BY n.instance_id ORDER BY n.grp, n.execution_id) AS seq
    FROM (
        SELECT f.workflow_instance_id AS instance_id, f.w_sequence_number AS seq0, 1 AS grp, f.execution_id,
               'TASK_COMPLETED' AS event_type,
               jsonb_build_object('execution_id', f.execution_id, 'task_id', f.task_id, 'kind', f.kind,
                                  'attempt', f.attempt_number, 'fence_token', f.fence_token) AS payload,
               f.workflow_instance_id || ':completed:' || f.execution_id AS idempotency_key
        FROM finished f
        UNION ALL
        SELECT r.workflow_instance_id, r.seq0, 2, r.execution_id, 'TASK_SCHEDULED',
               jsonb_build_object('execution_id', r.execution_id, 'task_id', r.task_id,
                                  'attempt', r.attempt_number),
               r.workflow_instance_id || ':scheduled:' || r.execution_id || ':' || r.lapse_count
        FROM ready r
        WHERE r.state = 'READY'
        UNION ALL
        SELECT s.instance_id, s.seq0, 3, NULL, 'WORKFLOW_COMPLETED', jsonb_build_object(), NULL
        FROM summary s
        WHERE s.pending = 0
    ) n
), logged AS (
    INSERT INTO {schema}.events
        (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)
    SELECT {schema}.event_id(k.idempotency_key),
           n.instance_id, n.seq, n.event_type, n.payload, k.idempotency_key
    FROM news n
    CROSS JOIN LATERAL (SELECT COALESCE(n.idempotency_key, n.instance_id || ':workflow_completed:' || n.seq)
                        AS idempotency_key) k
    RETURNING 1
), moved AS (
    UPDATE {schema}.workflow_instances w
    -- every instance here is RUNNING on its locked row; the row this UPDATE scans may be an older
    -- version (a retry_task that committed meanwhile moved it from FAILED), and the new row built
    -- from it is checked against the constraints before the newest version is fetched: so no column
    -- with a constraint is built from the scanned row
    SET state = CASE WHEN s.pending = 0 THEN 'COMPLETED' ELSE 'RUNNING' END,
        output = CASE WHEN s.pending = 0 THEN
            (SELECT COALESCE(jsonb_object_agg(d.task_id, d.output), jsonb_build_object())
             FROM {schema}.task_executions d
             WHERE d.workflow_instance_id = w.instance_id AND d.kind = 'FORWARD' AND d.state = 'COMPLETED')
            || s.outputs
            ELSE w.output END,
        pending_tasks = s.pending,
        sequence_number = s.seq0 + s.events + CASE WHEN s.pending = 0 THEN 1 ELSE 0 END,
        updated_at = now(),
        finished_at = CASE WHEN s.pending = 0 THEN now() END
    FROM summary s
    WHERE w.instance_id = s.instance_id
    RETURNING 1
), woken AS (
    SELECT pg_notify(%(channel)s::text, x.namespace)
    FROM (SELECT DISTINCT r.namespace FROM ready r WHERE r.state = 'READY') x
    WHERE %(channel)s::text IS NOT NULL
)
SELECT f.*,
       ARRAY(SELECT h.execution_id FROM held h
             WHERE h.workflow_instance_id IN (SELECT g.workflow_instance_id FROM general g)) AS general,
       (SELECT count(*) FROM woken) AS notified  -- a CTE that writes nothing runs only if read
FROM (SELECT) AS one_row
LEFT JOIN finished f ON true
ORDER BY f.workflow_instance_id, f.execution_id

-- name: task_renew_many_if_held
-- A lapsed lease is not renewable (the worker must drop its result), nor is one past its task's
-- timeout: the attempt is then treated as failed.
-- Rows are locked in (instance, execution) order, the order in which a batch completion reaches them,
-- so a renewal and a group completion of the same worker's executions cannot deadlock.
WITH held AS (
    SELECT e.execution_id
    FROM {schema}.task_executions e
    WHERE e.execution_id = ANY(%(execution_ids)s::uuid[]) AND e.state = 'RUNNING'
      AND e.lease_holder = %(worker_id)s
    ORDER BY e.workflow_instance_id, e.execution_id
    FOR NO KEY UPDATE
), renewed AS (
    UPDATE {schema}.task_executions e
    SET lease_expires_at = LEAST(now() + %(lease)s::interval, COALESCE(e.deadline_at, 'infinity'))
    FROM held h
    WHERE e.execution_id = h.execution_id AND e.state = 'RUNNING' AND e.lease_holder = %(worker_id)s
      AND e.lease_expires_at > now() AND (e.deadline_at IS NULL OR e.deadline_at > now())
    RETURNING e.execution_id, e.lease_expires_at
), leases AS (
    UPDATE {schema}.execution_leases l SET expires_at = r.lease_expires_at
    FROM renewed r WHERE l.lease_key = r.execution_id
    RETURNING 1
)
SELECT execution_id FROM renewed

-- name: task_release_dependents
-- Tasks of this transaction's instances completed (one row per completed task, parallel arrays); each
-- waiting execution of the same kind loses the dependencies among them, and those with none left become
-- READY with their input built from their dependencies' outputs (compensations keep the input they were
-- created with).
WITH done AS (
    SELECT d.instance_id, d.task_id, d.kind
    FROM unnest(%(instance_ids)s::uuid[], %(task_ids)s::text[], %(kinds)s::text[]) AS d(instance_id, task_id, kind)
), hits AS (
    -- LATERAL: probes of the instance index per completed task, never a scan of the whole table
    SELECT e.execution_id, count(*)::integer AS n
    FROM done d
    CROSS JOIN LATERAL (
        SELECT x.execution_id
        FROM {schema}.task_executions x
        WHERE x.workflow_instance_id = d.instance_id AND x.kind = d.kind AND d.task_id = ANY(x.depends_on)
          AND x.state = 'PENDING'
        OFFSET 0  -- keeps the planner from flattening the probes into a join over the whole table
    ) e
    GROUP BY e.execution_id
)
UPDATE {schema}.task_executions e
SET deps_remaining = e.deps_remaining - h.n,
    state = CASE WHEN e.deps_remaining = h.n THEN 'READY' ELSE 'PENDING' END,
    ready_at = CASE WHEN e.deps_remaining = h.n THEN now() END,
    input = CASE WHEN e.deps_remaining = h.n AND e.kind = 'FORWARD' THEN
        jsonb_build_object(
            'workflow', (SELECT w.input FROM {schema}.workflow_instances w WHERE w.instance_id = e.workflow_instance_id),
            'dependencies', (SELECT COALESCE(jsonb_object_agg(d.task_id, d.output), jsonb_build_object())
                             FROM {schema}.task_executions d
                             WHERE d.workflow_instance_id = e.workflow_instance_id AND d.kind = 'FORWARD'
                               AND d.state = 'COMPLETED' AND d.task_id = ANY(e.depends_on)))
        ELSE e.input END
FROM hits h
WHERE e.execution_id = h.execution_id
RETURNING e.execution_id, e.workflow_instance_id, e.task_id, e.kind, e.state, e.attempt_number, e.lapse_count
-- name: task_cancel_open
-- ready_at goes too: the ready index holds rows with a ready_at and no started_at
UPDATE {schema}.task_executions
SET state = 'CANCELLED', finished_at = now(), ready_at = NULL
WHERE workflow_instance_id = %(instance_id)s AND state IN ('PENDING', 'READY', 'RUNNING')
  AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
RETURNING *

-- name: task_lease_delete
DELETE FROM {schema}.execution_leases WHERE lease_key = ANY(%(execution_ids)s::uuid[])

-- name: task_get_many
SELECT * FROM {schema}.task_executions WHERE execution_id = ANY(%(execution_ids)s::uuid[])

-- name: task_park_unpark
-- Park (ready_at NULL) the READY executions of instances that stop running (paused, failed), so the
-- poll's index never yields them, and unpark (ready_at now) those of instances that run again. Sent
-- by flush_units in the transaction that moves those instances, while it holds their row locks.
WITH parked AS (
    UPDATE {schema}.task_executions e SET ready_at = NULL
    WHERE e.workflow_instance_id = ANY(%(park)s::uuid[]) AND e.state = 'READY' AND e.ready_at IS NOT NULL
    RETURNING 1
), unparked AS (
    UPDATE {schema}.task_executions e SET ready_at = now()
    WHERE e.workflow_instance_id = ANY(%(unpark)s::uuid[]) AND e.state = 'READY' AND e.ready_at IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM parked) AS parked, (SELECT count(*) FROM unparked) AS unparked
