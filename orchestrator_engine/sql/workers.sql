-- name: worker_wait
-- Say this worker is idle and can take `free` tasks leased to it by a start (direct dispatch, migration
-- 0007); also how often it is rewritten: a start takes only a worker seen in the last ten seconds.
-- Its listener connection holds lock_key meanwhile; the engine's starts check that lock.
INSERT INTO {schema}.waiting_workers AS w
    (worker_id, namespace, task_types, free, lease_duration, lock_key, channel, seen_at)
VALUES (%(worker_id)s, %(namespace)s, %(task_types)s, %(free)s, %(lease)s, %(lock_key)s, %(channel)s, now())
ON CONFLICT (worker_id) DO UPDATE
    SET free = EXCLUDED.free, namespace = EXCLUDED.namespace, task_types = EXCLUDED.task_types,
        lease_duration = EXCLUDED.lease_duration, lock_key = EXCLUDED.lock_key, channel = EXCLUDED.channel,
        seen_at = now()

-- name: worker_leave
DELETE FROM {schema}.waiting_workers WHERE worker_id = %(worker_id)s

-- name: worker_forget_dead
-- Rows of workers whose listener connection is gone (nobody holds their lock: this transaction takes
-- it for a moment) and that were not rewritten for a minute.
DELETE FROM {schema}.waiting_workers w
WHERE w.worker_id <> %(worker_id)s AND w.seen_at < now() - interval '1 minute'
  AND pg_try_advisory_xact_lock(w.lock_key)

-- name: worker_granted
-- The executions leased to this worker among these ids, still running under that lease.
SELECT * FROM {schema}.task_executions
WHERE execution_id = ANY(%(execution_ids)s::uuid[]) AND lease_holder = %(worker_id)s AND state = 'RUNNING'

-- name: worker_held
-- Every lease this worker holds now (the lease rows of unfinished executions: a small table).
SELECT lease_key AS execution_id FROM {schema}.execution_leases WHERE holder_id = %(worker_id)s

-- name: worker_lock
-- Taken by the worker's listener connection and held for its life (a session lock): a start takes the
-- worker only while it cannot take this lock itself.
SELECT pg_try_advisory_lock(%(lock_key)s) AS locked
