-- The poll's pick of ready executions, planned as an ordered walk of the ready index whatever the
-- statistics say.
--
-- Inline in the poll, the pick's plan depended on the planner's row estimate. With no statistics (a
-- table never analysed, as a new queue is until autovacuum reaches it) or stale ones (analysed while
-- the queue was empty), it estimates a handful of ready rows and prefers a bitmap scan of every
-- ready row plus a sort to an ordered index scan that stops after `limit` rows: each poll then reads
-- and sorts the whole queue. A function is the one place a statement can carry planner settings of
-- its own: here bitmap and sequential scans are off, so the ready index, read in order, is the plan.
--
-- The function runs with a newer snapshot than the statement that calls it (a volatile function's
-- statements each take their own); task_poll_and_lease keeps only rows its own snapshot also sees.
CREATE FUNCTION next_ready_executions(p_namespace text, p_task_types text[], p_limit integer)
RETURNS TABLE (execution_id uuid, workflow_instance_id uuid, ready_at timestamptz)
LANGUAGE plpgsql
VOLATILE
-- a poll's size, not the default thousand: the calling statement's joins are planned as probes
ROWS 100
SET search_path FROM CURRENT
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
BEGIN
    RETURN QUERY
    SELECT e.execution_id, e.workflow_instance_id, e.ready_at
    FROM task_executions e
    WHERE e.state = 'READY' AND e.ready_at <= now()
      AND (p_namespace IS NULL OR e.namespace = p_namespace)
      AND (p_task_types IS NULL OR e.task_type = ANY(p_task_types))
    ORDER BY e.ready_at
    LIMIT p_limit
    FOR NO KEY UPDATE OF e SKIP LOCKED;
END
$$;
