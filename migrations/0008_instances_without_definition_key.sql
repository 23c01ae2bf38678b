-- Drop the instances' foreign key to their definition (fk_workflow_instances_definition).
--
-- A start checked it with a trigger: a lookup of the definition row and a FOR KEY SHARE lock on it,
-- which writes the locking transaction into that row (and into the WAL). Concurrent starts of one
-- workflow all lock that one row, so PostgreSQL keeps making multixacts of their sets of lockers.
-- In paired runs on 2 cores the check cost a start of one workflow, from 16 threads, a fifth of
-- its server CPU (367 against 296 us; 14% more starts/s without it), and a bulk start 8% of its
-- server CPU per workflow (41.5 against 38.2 us).
-- Nothing the check caught can happen through the engine: it starts an instance only of a
-- definition it has read (a start without a version checks, in its own statement, that it used the
-- latest), it never updates or deletes a definition, and the runtime role may only SELECT and
-- INSERT them (docs/security.md). Only a definition deleted by hand can leave instances without
-- theirs: check_invariants and doctor report such an instance (instance-has-definition).
-- Dropping the constraint takes ACCESS EXCLUSIVE locks on workflow_instances and
-- workflow_definitions until the migration commits, right after; it reads no rows.

ALTER TABLE workflow_instances DROP CONSTRAINT fk_workflow_instances_definition;
