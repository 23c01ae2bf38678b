-- name: workflow_get
SELECT * FROM {schema}.workflow_instances WHERE instance_id = %(instance_id)s

-- name: workflow_get_by_run_id
SELECT * FROM {schema}.workflow_instances
WHERE namespace = %(namespace)s AND workflow_name = %(workflow_name)s AND run_id = %(run_id)s

-- name: workflow_lock
-- Every writer of an instance takes this row lock first, so concurrent writers of one instance queue
-- here instead of failing their sequence guard; writers of executions lock the instance before them.
SELECT * FROM {schema}.workflow_instances WHERE instance_id = %(instance_id)s FOR NO KEY UPDATE

-- name: workflow_update_if_sequence
-- Append the units of work's events and move each instance on, in one round trip for any number of
-- locked instances, each under its sequence guard, with the NOTIFY that wakes idle workers. (Parking
-- is task_park_unpark, sent only when an instance stops or starts running again: with it here, the
-- generic plan priced its two updates and PostgreSQL re-planned this statement on every call.)
WITH appended AS (
    INSERT INTO {schema}.events
        (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)
    SELECT {schema}.event_id(r.idempotency_key),
           r.workflow_instance_id, r.sequence_number, r.event_type, r.payload, r.idempotency_key
    FROM jsonb_to_recordset(%(events)s::jsonb)
        AS r(workflow_instance_id uuid, sequence_number bigint, event_type text, payload jsonb,
             idempotency_key text)
    RETURNING 1
), moved AS (
    UPDATE {schema}.workflow_instances w
    SET state = r.state,
        output = CASE WHEN r.collect_output THEN
            (SELECT COALESCE(jsonb_object_agg(d.task_id, d.output), jsonb_build_object())
             FROM {schema}.task_executions d
             WHERE d.workflow_instance_id = w.instance_id AND d.kind = 'FORWARD' AND d.state = 'COMPLETED')
            ELSE w.output END,
        pending_tasks = r.pending_tasks,
        pending_compensations = r.pending_compensations,
        sequence_number = r.new_sequence,
        updated_at = now(),
        -- when the instance entered its finished state; unchanged while the state is (no new index entry)
        finished_at = CASE WHEN r.state NOT IN ('COMPLETED', 'CANCELLED', 'COMPENSATED', 'FAILED') THEN NULL
                           WHEN r.state = w.state THEN w.finished_at
                           ELSE now() END
    FROM jsonb_to_recordset(%(instances)s::jsonb)
        AS r(instance_id uuid, expected bigint, new_sequence bigint, state text, pending_tasks integer,
             pending_compensations integer, collect_output boolean)
    WHERE w.instance_id = r.instance_id AND w.sequence_number = r.expected
      -- by primary key whatever the table size and statistics (jsonb_to_recordset is costed at 100 rows)
      AND w.instance_id = ANY(ARRAY(SELECT i.instance_id FROM jsonb_to_recordset(%(instances)s::jsonb)
                                                         AS i(instance_id uuid)))
      AND (SELECT count(*) FROM appended) = %(event_count)s
    RETURNING w.instance_id
), notified AS (
    SELECT pg_notify(%(channel)s, n.namespace) FROM unnest(%(notify)s::text[]) AS n(namespace)
)
SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM notified) AS notified
-- name: workflow_start_many
-- Start a batch in one statement: instances (ON CONFLICT skips run_ids that exist), then the tasks
-- and the first events of only the instances this statement inserted. Each instance is born with the
-- sequence number of its last event, so no second update is needed.
-- The caller sends each instance once and each definition's plan once (plans: a JSON array of
-- objects with sequence_number, pending_tasks and tasks; an instance's "plan" indexes it): the task
-- rows and the events are built here, the n-th task of an instance taking the n-th of its
-- execution_ids, its idempotency key as execution_key() makes it for attempt 1.
-- A task with an event sequence number (seq) is a root: READY, with its input, and a TASK_SCHEDULED
-- event; the others wait PENDING for their dependencies.
-- A start without a version (latest) was planned on the caller's cached latest version. If another
-- engine has registered a newer one since, the batch writes nothing and returns stale > 0, and the
-- caller plans it again on the latest versions it reads now. The check runs in this statement's
-- snapshot, so every start uses the version that was the latest when it was written.
-- Unless channel is NULL, each namespace that got a new instance is announced on it (pg_notify,
-- delivered at commit) to wake idle workers. Always returns a row: the started instances' ids and
-- timestamps (the caller knows the rest), or one row of NULLs that carries the counts.
WITH requested AS (
    SELECT * FROM jsonb_to_recordset(%(instances)s::jsonb) AS r(
        instance_id uuid, namespace text, workflow_name text, workflow_version integer, run_id text,
        input jsonb, ord integer, latest boolean, plan integer, execution_ids uuid[])
), plans AS (
    SELECT p.n - 1 AS plan, (p.value ->> 'sequence_number')::bigint AS sequence_number,
           (p.value ->> 'pending_tasks')::integer AS pending_tasks, p.value -> 'tasks' AS tasks
    FROM jsonb_array_elements(%(plans)s::jsonb) WITH ORDINALITY AS p(value, n)
), stale AS (
    -- once per workflow, not per instance: a batch usually starts many runs of one workflow
    SELECT 1
    FROM (SELECT DISTINCT q.namespace, q.workflow_name, q.workflow_version FROM requested q WHERE q.latest) l
    WHERE l.workflow_version IS DISTINCT FROM (
        SELECT max(d.version) FROM {schema}.workflow_definitions d
        WHERE d.namespace = l.namespace AND d.name = l.workflow_name)
), started AS (
    INSERT INTO {schema}.workflow_instances
        (instance_id, namespace, workflow_name, workflow_version, run_id, state, input, sequence_number,
         pending_tasks)
    SELECT q.instance_id, q.namespace, q.workflow_name, q.workflow_version, q.run_id, 'RUNNING', q.input,
           p.sequence_number, p.pending_tasks
    FROM requested q JOIN plans p ON p.plan = q.plan
    WHERE NOT EXISTS (SELECT FROM stale)
    ORDER BY q.ord
    ON CONFLICT ON CONSTRAINT uk_idempotency DO NOTHING
    RETURNING instance_id, namespace, workflow_version, run_id, input, created_at, updated_at
), planned AS (
    SELECT s.instance_id, s.namespace, s.input, q.execution_ids[t.n] AS execution_id, t.*
    FROM started s
    JOIN requested q ON q.instance_id = s.instance_id
    JOIN plans p ON p.plan = q.plan
    CROSS JOIN LATERAL jsonb_to_recordset(p.tasks) AS t(
        n integer, task_id text, task_type text, max_attempts integer, depends_on text[], timeout_ms bigint,
        seq bigint)
), tasks AS (
    INSERT INTO {schema}.task_executions
        (execution_id, workflow_instance_id, namespace, task_id, task_type, kind, idempotency_key,
         attempt_number, lapse_count, max_attempts, state, depends_on, deps_remaining, input, timeout, ready_at)
    SELECT t.execution_id, t.instance_id, t.namespace, t.task_id, t.task_type, 'FORWARD',
           t.instance_id || ':' || t.task_id || ':1', 1, 0, t.max_attempts,
           CASE WHEN t.seq IS NULL THEN 'PENDING' ELSE 'READY' END, t.depends_on, cardinality(t.depends_on),
           CASE WHEN t.seq IS NOT NULL
                THEN jsonb_build_object('workflow', t.input, 'dependencies', jsonb_build_object()) END,
           make_interval(secs => t.timeout_ms / 1000.0), CASE WHEN t.seq IS NOT NULL THEN now() END
    FROM planned t
    RETURNING 1
), logged AS (
    INSERT INTO {schema}.events
        (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)
    SELECT {schema}.event_id(v.idempotency_key), v.*
    FROM (
        SELECT s.instance_id, 1, 'WORKFLOW_STARTED',
               jsonb_build_object('run_id', s.run_id, 'workflow_version', s.workflow_version),
               s.instance_id || ':started' AS idempotency_key
        FROM started s
        UNION ALL
        SELECT t.instance_id, t.seq, 'TASK_SCHEDULED',
               jsonb_build_object('execution_id', t.execution_id, 'task_id', t.task_id, 'attempt', 1),
               t.instance_id || ':scheduled:' || t.execution_id || ':0'
        FROM planned t
        WHERE t.seq IS NOT NULL
    ) v
    RETURNING 1
), woken AS (
    SELECT pg_notify(%(channel)s::text, n.namespace)
    FROM (SELECT DISTINCT s.namespace FROM started s) AS n
    WHERE %(channel)s::text IS NOT NULL
)
SELECT s.instance_id, s.created_at, s.updated_at, (SELECT count(*) FROM tasks) AS tasks_written,
       (SELECT count(*) FROM logged) AS events_written, (SELECT count(*) FROM woken) AS notified,
       (SELECT count(*) FROM stale) AS stale
FROM (SELECT) AS one_row LEFT JOIN started s ON true

-- name: workflow_start_one
-- Start one workflow: workflow_start_many for a single instance, whose columns are parameters of
-- their own (no document of instances to unpack and join to the plans: a start of one workflow
-- cost about a third more server CPU through workflow_start_many). tasks is the "tasks" array of
-- the definition's plan (see workflow_start_many), execution_ids the ids of its tasks in plan order
-- (an array), sequence_number and pending_tasks the plan's. latest, stale, channel: as in workflow_start_many.
-- waiting says whether an idle worker of the namespace, seen in the last ten seconds (as a claim
-- needs), offered a slot (waiting_workers, free > 0) as the statement began: the caller's cue to send
-- its next start as workflow_start_direct, which can lease the task to that worker in the start (see
-- Engine.expect_waiting). A killed worker's row, which stays until a live worker deletes it, stops
-- counting ten seconds after its last rewrite.
-- Always returns one row: the started instance's id and timestamps (the caller knows the rest), or
-- NULLs (the run_id exists, or stale) beside the counts.
WITH stale AS (
    SELECT 1
    WHERE %(latest)s::boolean AND %(workflow_version)s::integer IS DISTINCT FROM (
        SELECT max(d.version) FROM {schema}.workflow_definitions d
        WHERE d.namespace = %(namespace)s::text AND d.name = %(workflow_name)s::text)
), started AS (
    INSERT INTO {schema}.workflow_instances
        (instance_id, namespace, workflow_name, workflow_version, run_id, state, input, sequence_number,
         pending_tasks)
    SELECT %(instance_id)s::uuid, %(namespace)s::text, %(workflow_name)s::text, %(workflow_version)s::integer,
           %(run_id)s::text, 'RUNNING', %(input)s::jsonb, %(sequence_number)s::bigint, %(pending_tasks)s::integer
    WHERE NOT EXISTS (SELECT FROM stale)
    ON CONFLICT ON CONSTRAINT uk_idempotency DO NOTHING
    RETURNING instance_id, namespace, input, created_at, updated_at
), planned AS (
    SELECT s.instance_id, s.namespace, s.input, (%(execution_ids)s::uuid[])[t.n] AS execution_id, t.*
    FROM started s
    CROSS JOIN LATERAL jsonb_to_recordset(%(tasks)s::jsonb) AS t(
        n integer, task_id text, task_type text, max_attempts integer, depends_on text[], timeout_ms bigint,
        seq bigint)
), tasks AS (
    INSERT INTO {schema}.task_executions
        (execution_id, workflow_instance_id, namespace, task_id, task_type, kind, idempotency_key,
         attempt_number, lapse_count, max_attempts, state, depends_on, deps_remaining, input, timeout, ready_at)
    SELECT t.execution_id, t.instance_id, t.namespace, t.task_id, t.task_type, 'FORWARD',
           t.instance_id || ':' || t.task_id || ':1', 1, 0, t.max_attempts,
           CASE WHEN t.seq IS NULL THEN 'PENDING' ELSE 'READY' END, t.depends_on, cardinality(t.depends_on),
           CASE WHEN t.seq IS NOT NULL
                THEN jsonb_build_object('workflow', t.input, 'dependencies', jsonb_build_object()) END,
           make_interval(secs => t.timeout_ms / 1000.0), CASE WHEN t.seq IS NOT NULL THEN now() END
    FROM planned t
), logged AS (
    INSERT INTO {schema}.events
        (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)
    SELECT {schema}.event_id(v.idempotency_key), v.*
    FROM (
        SELECT s.instance_id, 1, 'WORKFLOW_STARTED',
               jsonb_build_object('run_id', %(run_id)s::text, 'workflow_version', %(workflow_version)s::integer),
               s.instance_id || ':started' AS idempotency_key
        FROM started s
        UNION ALL
        SELECT t.instance_id, t.seq, 'TASK_SCHEDULED',
               jsonb_build_object('execution_id', t.execution_id, 'task_id', t.task_id, 'attempt', 1),
               t.instance_id || ':scheduled:' || t.execution_id || ':0'
        FROM planned t
        WHERE t.seq IS NOT NULL
    ) v
), woken AS (
    SELECT pg_notify(%(channel)s::text, s.namespace) FROM started s WHERE %(channel)s::text IS NOT NULL
)
-- (the data-modifying parts run whether read or not; woken, a plain SELECT, only when read)
SELECT s.instance_id, s.created_at, s.updated_at, (SELECT count(*) FROM woken) AS notified,
       (SELECT count(*) FROM stale) AS stale, 0 AS granted,
       EXISTS (SELECT FROM {schema}.waiting_workers x
               WHERE x.free > 0 AND x.seen_at > now() - interval '10 seconds'
                 AND (x.namespace IS NULL OR x.namespace = %(namespace)s::text)) AS waiting
FROM (SELECT) AS one_row LEFT JOIN started s ON true

-- name: workflow_start_direct
-- workflow_start_one (same parameters and row) with direct dispatch (migration 0007) added: the
-- statement of a start of one workflow outside a host transaction that notifies itself, while idle
-- workers are about (see Engine.expect_waiting). A statement of its own, so that the other starts do
-- not pay for it: its claim, lease and notice parts cost about as much server CPU as the rest.
-- When the start makes exactly one task ready, a slot of a live idle worker that takes that task is
-- claimed (its listener connection holds lock_key, so this transaction cannot take that lock; SKIP
-- LOCKED, so starts never wait for each other here), the task is inserted leased to it (RUNNING,
-- fence token 1, its lease row, a TASK_STARTED event after the TASK_SCHEDULED, the instance's
-- sequence one further), and the worker is told the execution id on its own channel instead of
-- waking every worker. A run_id that exists already claims nothing; one inserted by a concurrent
-- start in between loses the claimed slot until the worker resets its count.
WITH stale AS (
    SELECT 1
    WHERE %(latest)s::boolean AND %(workflow_version)s::integer IS DISTINCT FROM (
        SELECT max(d.version) FROM {schema}.workflow_definitions d
        WHERE d.namespace = %(namespace)s::text AND d.name = %(workflow_name)s::text)
), idle AS (
    -- the probe workflow_start_one reports as waiting, read once: the gate below and the answer
    SELECT EXISTS (SELECT FROM {schema}.waiting_workers x
                   WHERE x.free > 0 AND x.seen_at > now() - interval '10 seconds'
                     AND (x.namespace IS NULL OR x.namespace = %(namespace)s::text)) AS waiting
), direct AS (
    SELECT t.task_type
    FROM jsonb_to_recordset(%(tasks)s::jsonb) AS t(task_type text, seq bigint)
    WHERE t.seq IS NOT NULL
      -- one-time checks first: a start with nobody waiting probes nothing
      AND (SELECT i.waiting FROM idle i)
      AND NOT EXISTS (SELECT FROM stale)
      AND NOT EXISTS (
          SELECT FROM {schema}.workflow_instances w
          WHERE w.namespace = %(namespace)s::text AND w.workflow_name = %(workflow_name)s::text
            AND w.run_id = %(run_id)s::text)
), claimed AS (
    UPDATE {schema}.waiting_workers w
    SET free = w.free - 1, granted = w.granted + 1
    WHERE w.worker_id = (
        SELECT x.worker_id
        FROM {schema}.waiting_workers x, direct d
        WHERE (SELECT count(*) FROM direct) = 1
          -- alive: its listener holds lock_key, so it cannot be taken even shared (taken, it is let
          -- go at once). CASE, so only a row that passes the other tests is tried
          AND CASE WHEN x.free > 0 AND x.seen_at > now() - interval '10 seconds'
                        AND (x.namespace IS NULL OR x.namespace = %(namespace)s::text)
                        AND d.task_type = ANY(x.task_types)
                   THEN NOT (pg_try_advisory_lock_shared(x.lock_key)
                             AND pg_advisory_unlock_shared(x.lock_key))
                   ELSE false END
        LIMIT 1
        FOR UPDATE OF x SKIP LOCKED)
    RETURNING w.worker_id, w.lease_duration, w.channel
), started AS (
    INSERT INTO {schema}.workflow_instances
        (instance_id, namespace, workflow_name, workflow_version, run_id, state, input, sequence_number,
         pending_tasks)
    SELECT %(instance_id)s::uuid, %(namespace)s::text, %(workflow_name)s::text, %(workflow_version)s::integer,
           %(run_id)s::text, 'RUNNING', %(input)s::jsonb,
           %(sequence_number)s::bigint + (SELECT count(*) FROM claimed), %(pending_tasks)s::integer
    WHERE NOT EXISTS (SELECT FROM stale)
    ON CONFLICT ON CONSTRAINT uk_idempotency DO NOTHING
    RETURNING instance_id, namespace, input, created_at, updated_at
), planned AS (
    SELECT s.instance_id, s.namespace, s.input, (%(execution_ids)s::uuid[])[t.n] AS execution_id, t.*,
           make_interval(secs => t.timeout_ms / 1000.0) AS timeout
    FROM started s
    CROSS JOIN LATERAL jsonb_to_recordset(%(tasks)s::jsonb) AS t(
        n integer, task_id text, task_type text, max_attempts integer, depends_on text[], timeout_ms bigint,
        seq bigint)
), tasks AS (
    INSERT INTO {schema}.task_executions
        (execution_id, workflow_instance_id, namespace, task_id, task_type, kind, idempotency_key,
         attempt_number, lapse_count, max_attempts, state, depends_on, deps_remaining, input, timeout, ready_at,
         lease_holder, lease_expires_at, fence_token, started_at, deadline_at)
    SELECT t.execution_id, t.instance_id, t.namespace, t.task_id, t.task_type, 'FORWARD',
           t.instance_id || ':' || t.task_id || ':1', 1, 0, t.max_attempts,
           CASE WHEN t.seq IS NULL THEN 'PENDING' WHEN g.worker_id IS NULL THEN 'READY' ELSE 'RUNNING' END,
           t.depends_on, cardinality(t.depends_on),
           CASE WHEN t.seq IS NOT NULL
                THEN jsonb_build_object('workflow', t.input, 'dependencies', jsonb_build_object()) END,
           t.timeout, CASE WHEN t.seq IS NOT NULL THEN now() END,
           -- a grant as the poll makes it (task_poll_and_lease), the first of this execution
           g.worker_id,
           CASE WHEN g.worker_id IS NOT NULL
                THEN now() + LEAST(g.lease_duration, COALESCE(t.timeout, g.lease_duration)) END,
           CASE WHEN g.worker_id IS NOT NULL THEN 1 ELSE 0 END,
           CASE WHEN g.worker_id IS NOT NULL THEN now() END,
           CASE WHEN g.worker_id IS NOT NULL THEN now() + t.timeout END
    FROM planned t
    LEFT JOIN claimed g ON t.seq IS NOT NULL
    RETURNING execution_id, workflow_instance_id, task_id, kind, attempt_number, lease_holder,
              lease_expires_at, fence_token
), leased AS (
    INSERT INTO {schema}.execution_leases (lease_key, workflow_instance_id, holder_id, expires_at, fence_token)
    SELECT k.execution_id, k.workflow_instance_id, k.lease_holder, k.lease_expires_at, k.fence_token
    FROM tasks k
    WHERE k.lease_holder IS NOT NULL
), logged AS (
    INSERT INTO {schema}.events
        (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)
    SELECT {schema}.event_id(v.idempotency_key), v.*
    FROM (
        SELECT s.instance_id, 1, 'WORKFLOW_STARTED',
               jsonb_build_object('run_id', %(run_id)s::text, 'workflow_version', %(workflow_version)s::integer),
               s.instance_id || ':started' AS idempotency_key
        FROM started s
        UNION ALL
        SELECT t.instance_id, t.seq, 'TASK_SCHEDULED',
               jsonb_build_object('execution_id', t.execution_id, 'task_id', t.task_id, 'attempt', 1),
               t.instance_id || ':scheduled:' || t.execution_id || ':0'
        FROM planned t
        WHERE t.seq IS NOT NULL
        UNION ALL
        SELECT k.workflow_instance_id, t.seq + 1, 'TASK_STARTED',
               jsonb_build_object('execution_id', k.execution_id, 'task_id', k.task_id, 'kind', k.kind,
                                  'attempt', k.attempt_number, 'worker_id', k.lease_holder,
                                  'fence_token', k.fence_token),
               k.workflow_instance_id::text || ':started:' || k.execution_id::text || ':' || k.fence_token::text
        FROM tasks k
        JOIN planned t ON t.execution_id = k.execution_id
        WHERE k.lease_holder IS NOT NULL
    ) v
), told AS (
    SELECT pg_notify(g.channel, k.execution_id::text)
    FROM tasks k, claimed g
    WHERE k.lease_holder IS NOT NULL
), woken AS (
    SELECT pg_notify(%(channel)s::text, s.namespace)
    FROM started s
    WHERE %(channel)s::text IS NOT NULL AND NOT EXISTS (SELECT FROM tasks k WHERE k.lease_holder IS NOT NULL)
)
SELECT s.instance_id, s.created_at, s.updated_at, (SELECT count(*) FROM woken) AS notified,
       (SELECT count(*) FROM stale) AS stale, (SELECT count(*) FROM told) AS granted,
       (SELECT i.waiting FROM idle i) AS waiting
FROM (SELECT) AS one_row LEFT JOIN started s ON true

-- name: announce
-- Wake idle workers of these namespaces, after the writes this announces have committed, in a
-- transaction of its own. PostgreSQL serialises the commits of every transaction that notifies (a
-- cluster-wide lock held through the commit's WAL flush); this transaction changes no data, so it
-- commits with synchronous_commit off and holds that lock only briefly. A crash can lose it, as it
-- would lose any notification not yet delivered.
SELECT pg_notify(%(channel)s::text, n.namespace)
FROM unnest(%(namespaces)s::text[]) AS n(namespace),
     (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
