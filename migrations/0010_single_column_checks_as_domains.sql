-- Move every CHECK constraint that reads one column into a domain: the column's type.
--
-- PostgreSQL prepares a table's CHECK constraints again in every statement that writes the table:
-- it reads each one back from its stored text (stringToNode), plans it and builds its evaluator,
-- then evaluates every one of them on every row written, whichever columns the statement set.
-- Profiled (perf), that was a fifth of the server CPU of a start of one workflow. A domain's
-- constraints are read and planned once per session, into the type cache, and checked only where a
-- statement writes a value of that type, so an update that leaves the state alone checks no state.
-- Counted by callgrind in the server process, one call at a time: a start of one workflow took
-- 925,000 instructions before and 752,000 after (-19%), a poll and a completion of one task 4.98
-- against 4.68 million (-6%). Statements of many rows gain nothing: in paired timings a bulk start of
-- 100 and a poll plus completion of 100 tasks took as much server CPU as before, within 1.5%. The
-- constraints that relate two columns stay on their tables (most of what is left: 141,000
-- instructions of a start).
--
-- Each domain is made without its constraint and given it after the columns have taken the type:
-- changing a column to a domain that has constraints rewrites the table, to one that has none only
-- changes the catalog (the data and the indexes stay as they are). Adding a constraint to a domain
-- reads every column of that type to check it (the table constraints dropped below guaranteed it),
-- and the table constraints that read a changed column are checked again: 0.7 s in all for 200,000
-- single-task workflows and their 400,000 events (2 cores). The migration holds ACCESS EXCLUSIVE
-- locks on the six tables until it commits. The changed columns lose their planner statistics until
-- autovacuum analyses their tables again; the engine's statements reach rows by key and through
-- partial indexes, so their plans do not depend on them. (Not ANALYZE here: on a new, empty schema it
-- would record the tables as analysed and empty, and plans cached on that would scan them whole.)
-- A statement a running engine prepared before, that returns a changed column, is refused from then
-- on ("cached plan must not change result type"): this engine replaces such a connection after one
-- failed call, an older engine fails on it until restarted, so restart older engines after applying
-- this (or stop them before). Otherwise an older engine works on the new schema (it writes the same
-- text and numbers), and this one on the old. Values keep their base types on the wire, except in
-- arrays of a domain's values (array_agg(state) is an array of workflow_state).

CREATE DOMAIN workflow_state AS text;
CREATE DOMAIN task_state AS text;
CREATE DOMAIN execution_kind AS text;
CREATE DOMAIN nonnegative_integer AS integer;
CREATE DOMAIN positive_integer AS integer;
CREATE DOMAIN nonnegative_bigint AS bigint;
CREATE DOMAIN positive_bigint AS bigint;
CREATE DOMAIN positive_interval AS interval;

ALTER TABLE workflow_definitions
    ALTER COLUMN version TYPE positive_integer,
    DROP CONSTRAINT ck_workflow_definitions_version;
ALTER TABLE workflow_instances
    ALTER COLUMN state TYPE workflow_state,
    ALTER COLUMN sequence_number TYPE nonnegative_bigint,
    DROP CONSTRAINT ck_workflow_instances_state,
    DROP CONSTRAINT ck_workflow_instances_sequence;
ALTER TABLE task_executions
    ALTER COLUMN state TYPE task_state,
    ALTER COLUMN kind TYPE execution_kind,
    ALTER COLUMN attempt_number TYPE positive_integer,
    ALTER COLUMN max_attempts TYPE positive_integer,
    ALTER COLUMN fence_token TYPE nonnegative_bigint,
    DROP CONSTRAINT ck_task_executions_state,
    DROP CONSTRAINT ck_task_executions_kind,
    DROP CONSTRAINT ck_task_executions_attempt,
    DROP CONSTRAINT ck_task_executions_fence;
ALTER TABLE execution_leases
    ALTER COLUMN fence_token TYPE positive_bigint,
    DROP CONSTRAINT ck_execution_leases_fence;
ALTER TABLE events
    ALTER COLUMN sequence_number TYPE positive_bigint,
    DROP CONSTRAINT ck_events_sequence;
ALTER TABLE waiting_workers
    ALTER COLUMN free TYPE nonnegative_integer,
    ALTER COLUMN lease_duration TYPE positive_interval,
    DROP CONSTRAINT ck_waiting_workers_free,
    DROP CONSTRAINT ck_waiting_workers_lease;

ALTER DOMAIN workflow_state ADD CONSTRAINT ck_workflow_state
    CHECK (VALUE IN ('RUNNING', 'PAUSED', 'COMPLETED', 'FAILED', 'CANCELLED', 'COMPENSATING', 'COMPENSATED'));
ALTER DOMAIN task_state ADD CONSTRAINT ck_task_state
    CHECK (VALUE IN ('PENDING', 'READY', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED'));
ALTER DOMAIN execution_kind ADD CONSTRAINT ck_execution_kind CHECK (VALUE IN ('FORWARD', 'COMPENSATION'));
ALTER DOMAIN nonnegative_integer ADD CONSTRAINT ck_nonnegative_integer CHECK (VALUE >= 0);
ALTER DOMAIN positive_integer ADD CONSTRAINT ck_positive_integer CHECK (VALUE >= 1);
ALTER DOMAIN nonnegative_bigint ADD CONSTRAINT ck_nonnegative_bigint CHECK (VALUE >= 0);
ALTER DOMAIN positive_bigint ADD CONSTRAINT ck_positive_bigint CHECK (VALUE >= 1);
ALTER DOMAIN positive_interval ADD CONSTRAINT ck_positive_interval CHECK (VALUE > interval '0');
