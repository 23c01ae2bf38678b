-- Direct dispatch: idle workers wait here, and a start leases its ready task to one of them.
--
-- A worker whose queue ran dry, whose listener is connected, says so in a row of its own: which tasks
-- it takes, how many it can take now (free) and for how long it leases them. A start that makes
-- exactly one task ready, outside a host transaction, then leases that task to such a worker in its
-- own statement (one slot taken, a TASK_STARTED written with the other start events) and tells it on
-- its channel, so the task needs no poll and no second commit before its handler starts.
-- A worker is taken only while its listener connection lives: that connection holds the advisory
-- lock lock_key (a session lock, released by the server when the connection ends, however the
-- process died), and a start takes a worker only if it cannot take that lock itself. A worker that
-- stops deletes its row; a row left by a dead one is never taken and is deleted by later workers'
-- housekeeping. free is what the worker offers, less what starts took since: the worker rewrites it
-- less the grants it has not seen yet (granted counts every grant), so a grant is never offered
-- twice; one past its handlers (rare) waits in its queue, with its lease renewed.
CREATE TABLE waiting_workers (
    worker_id      uuid        NOT NULL,
    namespace      text,
    task_types     text[]      NOT NULL,
    free           integer     NOT NULL,
    granted        bigint      NOT NULL DEFAULT 0,
    lease_duration interval    NOT NULL,
    lock_key       bigint      NOT NULL,
    channel        text        NOT NULL,
    seen_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_waiting_workers PRIMARY KEY (worker_id),
    CONSTRAINT ck_waiting_workers_free CHECK (free >= 0),
    CONSTRAINT ck_waiting_workers_lease CHECK (lease_duration > interval '0')
) WITH (fillfactor = 50);
