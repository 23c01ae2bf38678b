-- name: worker_wait
-- Say this worker is idle and can take `free` tasks leased to it by a start (direct dispatch, migration
-- 0007), less the grants starts made that it has not seen yet (it has seen `seen` of them since it
-- started; `fresh`, its first write, starts the count again); also how recently: a start takes only
-- a worker seen in the last ten seconds. Its listener connection holds lock_key meanwhile.
INSERT INTO {schema}.waiting_workers AS w
    (worker_id, namespace, task_types, free, granted, lease_duration, lock_key, channel, seen_at)
VALUES (%(worker_id)s, %(namespace)s, %(task_types)s, %(free)s, 0, %(lease)s, %(lock_key)s, %(channel)s,
        now())
ON CONFLICT (worker_id) DO UPDATE
    SET free = CASE WHEN %(fresh)s THEN EXCLUDED.free
                    ELSE GREATEST(EXCLUDED.free - (w.granted - %(seen)s), 0) END,
        granted = CASE WHEN %(fresh)s THEN 0 ELSE w.granted END,
        namespace = EXCLUDED.namespace, task_types = EXCLUDED.task_types,
        lease_duration = EXCLUDED.lease_duration, lock_key = EXCLUDED.lock_key, channel = EXCLUDED.channel,
        seen_at = now()

-- name: worker_leave
DELETE FROM {schema}.waiting_workers WHERE worker_id = %(worker_id)s

-- name: worker_forget_dead
-- Rows not rewritten for a minute (no start takes them: they are older than ten seconds) of workers
-- whose listener connection is gone: nobody holds their lock (taken, it is let go at once). CASE, so
-- only such old rows are tried.
DELETE FROM {schema}.waiting_workers w
WHERE w.worker_id <> %(worker_id)s
  AND CASE WHEN w.seen_at < now() - interval '1 minute'
           THEN pg_try_advisory_lock(w.lock_key) AND pg_advisory_unlock(w.lock_key)
           ELSE false END

-- name: worker_granted
-- The executions a start leased to this worker among these ids, still running under that lease: the
-- first grant of the execution (fence 1), made by its start (started when it became ready), unexpired.
SELECT * FROM {schema}.task_executions
WHERE execution_id = ANY(%(execution_ids)s::uuid[]) AND lease_holder = %(worker_id)s AND state = 'RUNNING'
  AND fence_token = 1 AND started_at = ready_at AND lease_expires_at > now()

-- name: worker_held
-- Every lease this worker holds now (the lease rows of unfinished executions: a small table);
-- worker_granted keeps those a start granted.
SELECT lease_key AS execution_id FROM {schema}.execution_leases WHERE holder_id = %(worker_id)s

-- name: worker_lock
-- Taken by the worker's listener connection and held for its life (a session lock): a start takes the
-- worker only while it cannot take this lock itself.
SELECT pg_try_advisory_lock(%(lock_key)s) AS locked
