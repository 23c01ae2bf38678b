-- Let the updates of a running workflow's instance row be HOT updates (no new index entries).
--
-- In 0001 the index of finished instances keyed updated_at, under a predicate naming state. Every
-- poll (which moves the instance's sequence number on) and every recorded result writes updated_at,
-- so every update of an instance row added an entry to its primary key and to uk_idempotency (a text
-- key of namespace, workflow name and run_id), however little it changed. Here finished instances are
-- found through finished_at, which is written only when the state becomes one of the finished states
-- (the time it did) or stops being one (NULL), and no index names state or updated_at any more:
-- while a workflow runs, the updates of its row change no indexed column. The table leaves a fifth of
-- each new page free, so the new version of a row usually fits beside the old one.
-- A CHECK constraint holds finished_at to the state, so an engine from before this migration, still
-- running, fails loudly when it finishes a workflow instead of leaving it out of the purge's index.

-- One transaction, holding workflow_instances locked (ACCESS EXCLUSIVE) from the first statement:
-- the backfill writes a new version of every finished row, so run it in a maintenance window.
DROP INDEX ix_workflow_instances_finished;  -- first, so that the backfill does not maintain it
ALTER TABLE workflow_instances ADD COLUMN finished_at timestamptz;
UPDATE workflow_instances SET finished_at = updated_at
WHERE state IN ('COMPLETED', 'CANCELLED', 'COMPENSATED', 'FAILED');
ALTER TABLE workflow_instances ADD CONSTRAINT ck_workflow_instances_finished_at
    CHECK ((finished_at IS NOT NULL) = (state IN ('COMPLETED', 'CANCELLED', 'COMPENSATED', 'FAILED')));

CREATE INDEX ix_workflow_instances_finished ON workflow_instances (finished_at)
    WHERE finished_at IS NOT NULL;
ALTER TABLE workflow_instances SET (fillfactor = 80);
