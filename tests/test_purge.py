"""Retention: purge deletes finished workflows in bounded batches while the engine keeps working."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from orchestrator_engine import (
    EngineConfig,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
)
from orchestrator_engine.check import check_invariants
from orchestrator_engine.worker import Worker

PAIR = WorkflowDefinition("retention", "pair", [TaskDefinition("a"), TaskDefinition("b", depends_on=["a"])])
TABLES = ("workflow_instances", "task_executions", "execution_leases", "events")


def row_counts(dsn: str, instance_id: Any = None) -> dict[str, int]:
    """Rows in each table: all of them, or those of one instance."""
    counts: dict[str, int] = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            query = f"SELECT count(*) FROM orchestrator.{table}"
            params: tuple[Any, ...] = ()
            if instance_id is not None:
                column = "instance_id" if table == "workflow_instances" else "workflow_instance_id"
                query += f" WHERE {column} = %s"
                params = (instance_id,)
            counts[table] = conn.execute(query, params).fetchone()[0]  # type: ignore[index]
    return counts


def test_purge_rejects_unfinished_states_and_bad_arguments(pool: Any, engine_config: EngineConfig) -> None:
    wc = WorkflowCoordinator(pool, engine_config)
    with pytest.raises(ValueError, match="finished states"):
        wc.purge(older_than=timedelta(0), states=[WorkflowState.RUNNING])
    with pytest.raises(ValueError, match="older_than"):
        wc.purge(older_than=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="batch_size"):
        wc.purge(older_than=timedelta(0), batch_size=0)


def test_purge_keeps_running_and_recent_workflows(pool: Any, engine_config: EngineConfig, dsn: str) -> None:
    wc = WorkflowCoordinator(pool, engine_config)
    wc.register_workflow(PAIR)
    running = wc.start_workflow(StartWorkflowRequest("retention", "pair", "running"))
    cancelled = wc.start_workflow(StartWorkflowRequest("retention", "pair", "cancelled"))
    wc.cancel_workflow(cancelled.instance_id)
    assert wc.purge(older_than=timedelta(hours=1)) == 0
    assert wc.purge(older_than=timedelta(0)) == 1
    assert wc.get_workflow(running.instance_id).state is WorkflowState.RUNNING
    assert wc.find_workflow("retention", "pair", "cancelled") is None
    counts = row_counts(dsn)
    assert counts["workflow_instances"] == 1
    assert counts["task_executions"] == 2  # the running instance's two tasks only


def test_purge_function_deletes_finished_workflows_whole_and_never_a_live_one(
    pool: Any, engine_config: EngineConfig, dsn: str
) -> None:
    # The child tables have no foreign keys since 0005: the function deletes the children itself. It
    # is SECURITY DEFINER, so it must refuse a live workflow even when the caller names its state.
    wc, tc = WorkflowCoordinator(pool, engine_config), TaskCoordinator(pool, engine_config)
    wc.register_workflow(PAIR)
    live = wc.start_workflow(StartWorkflowRequest("retention", "pair", "live"))
    done = wc.start_workflow(StartWorkflowRequest("retention", "pair", "done"))
    leased = tc.poll_tasks(uuid4(), limit=2)
    assert {e.workflow_instance_id for e in leased} == {live.instance_id, done.instance_id}
    wc.cancel_workflow(done.instance_id)
    before = row_counts(dsn, live.instance_id)
    assert before == {"workflow_instances": 1, "task_executions": 2, "execution_leases": 1, "events": 3}
    with psycopg.connect(dsn, autocommit=True) as conn:
        # cancelling deleted the lease row, and no engine path leaves one behind a finished
        # workflow: write one, so that the purge is seen to take leases too
        conn.execute(
            "INSERT INTO orchestrator.execution_leases (lease_key, workflow_instance_id, fence_token) "
            "SELECT execution_id, workflow_instance_id, fence_token FROM orchestrator.task_executions "
            "WHERE workflow_instance_id = %s AND task_id = 'a'",
            (done.instance_id,),
        )
    assert all(row_counts(dsn, done.instance_id).values())

    with psycopg.connect(dsn, autocommit=True) as conn:
        purged = conn.execute(
            "SELECT instance_id FROM orchestrator.purge_finished_instances(%s, %s, %s)",
            (["RUNNING", "CANCELLED"], timedelta(0), 100),
        ).fetchall()
    assert purged == [(done.instance_id,)]
    assert row_counts(dsn, done.instance_id) == dict.fromkeys(TABLES, 0)
    assert row_counts(dsn, live.instance_id) == before


def test_purge_function_ignores_a_temporary_table_that_shadows_its_own(
    pool: Any, engine_config: EngineConfig, dsn: str
) -> None:
    # It runs as the schema's owner: a caller's temporary workflow_instances, naming a live workflow
    # as finished, must not decide what it deletes (its search_path puts pg_temp last). Nor may any
    # role call it without a grant.
    wc = WorkflowCoordinator(pool, engine_config)
    wc.register_workflow(PAIR)
    live = wc.start_workflow(StartWorkflowRequest("retention", "pair", "live"))
    before = row_counts(dsn, live.instance_id)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TEMP TABLE workflow_instances (instance_id uuid, state text, finished_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO pg_temp.workflow_instances VALUES (%s, 'COMPLETED', now() - interval '1 day')",
            (live.instance_id,),
        )
        purged = conn.execute(
            "SELECT instance_id FROM orchestrator.purge_finished_instances(%s, %s, %s)",
            (["COMPLETED"], timedelta(0), 100),
        ).fetchall()
        public_may_call = conn.execute(
            "SELECT has_function_privilege('public', "
            "'orchestrator.purge_finished_instances(text[], interval, integer)', 'EXECUTE')"
        ).fetchone()
    assert purged == []
    assert row_counts(dsn, live.instance_id) == before
    assert public_may_call == (False,)


def test_tables_stay_flat_under_continuous_churn_with_periodic_purge(
    pool: Any, engine_config: EngineConfig, dsn: str
) -> None:
    config = engine_config
    wc = WorkflowCoordinator(pool, config)
    wc.register_workflow(PAIR)
    rounds, per_round = 8, 40
    sizes: list[int] = []
    purged = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def purger() -> None:
        nonlocal purged
        while not stop.is_set():
            try:
                purged += wc.purge(older_than=timedelta(0), batch_size=25)
            except BaseException as exc:  # surfaced below: purge must never fail under load
                errors.append(exc)
                return
            stop.wait(0.05)

    with Worker(pool, {"a": lambda ctx: 1, "b": lambda ctx: 2}, config=config, concurrency=4):
        thread = threading.Thread(target=purger)
        thread.start()
        try:
            for r in range(rounds):
                wc.start_workflows(
                    [StartWorkflowRequest("retention", "pair", f"r{r}-{i}") for i in range(per_round)]
                )
                deadline = time.monotonic() + 30
                while row_counts(dsn)["workflow_instances"] > per_round and time.monotonic() < deadline:
                    time.sleep(0.02)
                sizes.append(row_counts(dsn)["task_executions"])
            # let the last round finish and be purged: nothing of the churn remains, nothing was lost
            deadline = time.monotonic() + 30
            while purged < rounds * per_round and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
            thread.join()
    assert not errors, errors
    # every round adds per_round workflows; the purger keeps the tables near one round's worth
    assert max(sizes) <= 2 * per_round * 2, sizes
    assert purged == rounds * per_round
    assert row_counts(dsn) == dict.fromkeys(TABLES, 0)
    with psycopg.connect(dsn) as conn:
        report = check_invariants(conn)
    assert report.ok, report.violations
