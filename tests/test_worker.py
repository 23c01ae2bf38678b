"""Specification of the Worker: it drains queues, survives SIGTERM and SIGKILL, keeps leases alive while
handlers run, accepts results only under a live fence, and wakes on NOTIFY instead of waiting for a poll.

Workers run on real threads, worker processes are real processes (tests/worker_process.py), and leases
lapse against the database clock. Nothing asserts a latency: latencies are printed (run with ``-s``).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
import pytest
from helpers import REPO_ROOT, wait_for, worker_process
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from orchestrator_engine import (
    EngineConfig,
    EventType,
    RetryPolicy,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskState,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowInstance,
    WorkflowState,
    create_pool,
    telemetry,
)
from orchestrator_engine import worker as worker_module
from orchestrator_engine.check import check_invariants
from orchestrator_engine.errors import LeaseLostError
from orchestrator_engine.worker import Handler, TaskContext, Worker

if TYPE_CHECKING:
    from typing_extensions import LiteralString

Pool = ConnectionPool[psycopg.Connection[Any]]

NAMESPACE = "worker-spec"
#: how long a test waits for the engine before giving up; it bounds a failing test, it measures nothing
SETTLE = 30.0
NO_DELAY = RetryPolicy(max_attempts=3, initial_interval=timedelta(0))

CHAIN = WorkflowDefinition(
    NAMESPACE,
    "chain",
    (
        TaskDefinition("first", task_type="step"),
        TaskDefinition("second", depends_on=["first"], task_type="step"),
    ),
)


def _single(name: str, task_type: str, retry: RetryPolicy | None = None) -> WorkflowDefinition:
    return WorkflowDefinition(NAMESPACE, name, (TaskDefinition("only", task_type=task_type, retry=retry),))


def _tuned(
    config: EngineConfig, *, lease: float = 30.0, renewal: float = 10.0, poll: float = 1.0
) -> EngineConfig:
    return replace(
        config,
        lease_duration=timedelta(seconds=lease),
        renewal_interval=timedelta(seconds=renewal),
        poll_interval=timedelta(seconds=poll),
    )


# -- reading the engine's tables ----------------------------------------------------------------------


class Tables:
    """Read the engine's tables directly: what the tests assert on is what is stored."""

    def __init__(self, pool: Pool, schema: str) -> None:
        self.pool = pool
        self.schema = schema

    def rows(self, template: LiteralString, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        query = sql.SQL(template).format(schema=sql.Identifier(self.schema))
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return cur.fetchall()

    def workflow_states(self) -> Counter[str]:
        return Counter(r["state"] for r in self.rows("SELECT state FROM {schema}.workflow_instances"))

    def all_completed(self, count: int) -> bool:
        return self.workflow_states() == Counter({WorkflowState.COMPLETED.value: count})

    def executions(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM {schema}.task_executions ORDER BY created_at, attempt_number")

    def execution(self, execution_id: UUID) -> dict[str, Any]:
        (row,) = self.rows("SELECT * FROM {schema}.task_executions WHERE execution_id = %s", (execution_id,))
        return row

    def completed_executions_per_task(self) -> Counter[tuple[UUID, str]]:
        return Counter(
            (r["workflow_instance_id"], r["task_id"])
            for r in self.executions()
            if r["state"] == TaskState.COMPLETED.value
        )

    def events(self, event_type: EventType) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM {schema}.events WHERE event_type = %s", (event_type.value,))

    def check_invariants_of_finished_run(self) -> None:
        with self.pool.connection() as conn:
            report = check_invariants(conn, schema=self.schema, require_finished=True)
        assert report.ok, report.violations

    def listener_pids(self) -> set[int]:
        rows = self.rows(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
        )
        return {r["pid"] for r in rows}


class RunLog:
    """``public.handler_runs``: one row each time a handler starts, in whichever process runs it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        with pool.connection() as conn:
            conn.execute(
                "CREATE TABLE public.handler_runs "
                "(execution_id uuid NOT NULL, task_id text NOT NULL, worker_pid int NOT NULL, "
                "at timestamptz NOT NULL)"
            )

    def record(self, ctx: TaskContext) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                "INSERT INTO public.handler_runs (execution_id, task_id, worker_pid, at) "
                "VALUES (%s, %s, %s, clock_timestamp())",
                (ctx.execution.execution_id, ctx.task_id, os.getpid()),
            )

    def pids_by_execution(self) -> dict[UUID, list[int]]:
        out: dict[UUID, list[int]] = {}
        with self.pool.connection() as conn:
            for eid, pid in conn.execute(
                "SELECT execution_id, worker_pid FROM public.handler_runs ORDER BY at"
            ):
                out.setdefault(eid, []).append(pid)
        return out

    def count(self, pid: int) -> int:
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM public.handler_runs WHERE worker_pid = %s", (pid,)
            ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def workflows(pool: Pool, engine_config: EngineConfig) -> WorkflowCoordinator:
    return WorkflowCoordinator(pool, engine_config)


@pytest.fixture
def tables(pool: Pool, engine_config: EngineConfig) -> Tables:
    return Tables(pool, engine_config.schema)


@pytest.fixture
def run_log(pool: Pool) -> RunLog:
    return RunLog(pool)


def _start(workflows: WorkflowCoordinator, name: str, count: int) -> list[WorkflowInstance]:
    requests = [StartWorkflowRequest(NAMESPACE, name, f"{name}-{i}", {"i": i}) for i in range(count)]
    return workflows.start_workflows(requests)


def _wait_until_finished(workflows: WorkflowCoordinator, instance_id: UUID) -> WorkflowState:
    state = WorkflowState.RUNNING

    def finished() -> bool:
        nonlocal state
        state = workflows.get_workflow(instance_id).state
        return state in (WorkflowState.COMPLETED, WorkflowState.FAILED)

    wait_for(f"workflow {instance_id} to finish", finished)
    return state


@contextmanager
def _starved(pool: Pool) -> Iterator[None]:
    """Hold every connection of ``pool``: whoever uses it cannot reach the database (renewals stall)."""
    held = [pool.getconn() for _ in range(pool.max_size)]
    try:
        yield
    finally:
        for conn in held:
            pool.putconn(conn)


def _steal_lease(worker_pool: Pool, thief: TaskCoordinator, thief_id: UUID, task_type: str) -> TaskExecution:
    """Starve the worker's pool until its lease lapses, then lease the task to ``thief_id``."""
    with _starved(worker_pool):
        wait_for("the lease to lapse", lambda: thief.reclaim_expired_leases() == 1)
        (stolen,) = thief.poll_tasks(thief_id, task_types=[task_type])
    return stolen


# -- worker processes ---------------------------------------------------------------------------------


# -- throughput ---------------------------------------------------------------------------------------


def test_worker_drains_300_workflows_completing_every_task_exactly_once(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator, tables: Tables
) -> None:
    workflows.register_workflow(CHAIN)
    _start(workflows, "chain", 300)
    handled: list[UUID] = []  # list.append is atomic: handler threads may share it

    def step(ctx: TaskContext) -> dict[str, Any]:
        handled.append(ctx.execution.execution_id)
        return {"task": ctx.task_id, "i": ctx.input["workflow"]["i"]}

    began = time.monotonic()
    with Worker(pool, {"step": step}, concurrency=4, config=engine_config) as worker:
        wait_for("300 workflows to complete", lambda: tables.all_completed(300))
        elapsed = time.monotonic() - began
    print(f"\n300 two-step workflows drained in {elapsed:.2f}s ({600 / elapsed:.0f} tasks/s, concurrency 4)")

    per_task = tables.completed_executions_per_task()
    assert len(per_task) == 600
    assert set(per_task.values()) == {1}
    assert len(tables.events(EventType.TASK_COMPLETED)) == 600
    assert sorted(handled) == sorted({r["execution_id"] for r in tables.executions()})
    assert (worker.stats.completed, worker.stats.failed, worker.stats.dropped) == (600, 0, 0)
    tables.check_invariants_of_finished_run()


# -- shutdown and crashes -----------------------------------------------------------------------------


def test_sigterm_lets_running_handlers_finish_and_report_before_the_process_exits(
    dsn: str,
    pool: Pool,
    engine_config: EngineConfig,
    workflows: WorkflowCoordinator,
    tables: Tables,
    run_log: RunLog,
    tmp_path: Path,
) -> None:
    shutdown_timeout = 10.0
    workflows.register_workflow(_single("slow", "slow"))
    _start(workflows, "slow", 16)

    options = ["--task-type", "slow", "--sleep", "0.5", "--concurrency", "4", "--poll", "0.2"]
    with worker_process(dsn, tmp_path, *options, "--shutdown-timeout", str(shutdown_timeout)) as worker:
        wait_for("the worker process to start a handler", lambda: run_log.count(worker.pid) >= 1)
        worker.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # exiting at all within the shutdown timeout is the property; how fast it was is only printed
        returncode = worker.proc.wait(timeout=shutdown_timeout)
        took = time.monotonic() - signalled
        print(f"\nSIGTERM -> exit took {took:.2f}s (shutdown timeout {shutdown_timeout}s)")
        assert returncode == 0, worker.output()

    started_there = {eid for eid, pids in run_log.pids_by_execution().items() if worker.pid in pids}
    assert started_there
    for eid in started_there:
        row = tables.execution(eid)
        assert (row["state"], row["lease_holder"]) == (TaskState.COMPLETED.value, worker.worker_id)
    still_held = [r for r in tables.executions() if r["lease_holder"] == worker.worker_id]
    assert all(r["state"] == TaskState.COMPLETED.value for r in still_held)

    def finish(ctx: TaskContext) -> str:
        run_log.record(ctx)
        return "finished by the second worker"

    with Worker(pool, {"slow": finish}, config=engine_config):
        wait_for("the other worker to finish the rest", lambda: tables.all_completed(16))
    runs = run_log.pids_by_execution()
    assert len(runs) == 16
    assert all(len(pids) == 1 for pids in runs.values())  # a graceful stop re-runs nothing
    print(f"the SIGTERMed process ran {len(started_there)} of 16 handlers, all reported")
    tables.check_invariants_of_finished_run()


def test_a_handler_past_the_shutdown_timeout_is_abandoned_and_its_task_runs_again_elsewhere(
    dsn: str,
    pool: Pool,
    engine_config: EngineConfig,
    workflows: WorkflowCoordinator,
    tables: Tables,
    run_log: RunLog,
    tmp_path: Path,
) -> None:
    """SIGTERM waits for running handlers only up to the shutdown timeout: a handler still running then
    does not hold the process open, its lease lapses, and another worker runs the task under a higher
    fence. Only that second result is accepted."""
    workflows.register_workflow(_single("stuck", "stuck"))
    (instance,) = _start(workflows, "stuck", 1)
    options = ["--task-type", "stuck", "--sleep", "120", "--lease", "2", "--renewal", "0.5", "--poll", "0.2"]
    with worker_process(dsn, tmp_path, *options, "--shutdown-timeout", "1") as worker:
        wait_for("the worker process to start the handler", lambda: run_log.count(worker.pid) >= 1)
        first_token = tables.executions()[0]["fence_token"]
        worker.proc.send_signal(signal.SIGTERM)
        # far less than the handler's 120 s: the process must not wait for it
        returncode = worker.proc.wait(timeout=SETTLE)
        assert returncode == 0, worker.output()

    def finish(ctx: TaskContext) -> str:
        run_log.record(ctx)
        return "finished after the first holder was abandoned"

    with Worker(pool, {"stuck": finish}, config=_tuned(engine_config, lease=2.0, renewal=0.5, poll=0.2)):
        assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.COMPLETED
    (row,) = tables.executions()
    assert row["output"] == "finished after the first holder was abandoned"
    assert row["fence_token"] > first_token
    assert row["lapse_count"] == 1
    (pids,) = run_log.pids_by_execution().values()
    assert len(pids) == 2
    assert worker.pid in pids
    tables.check_invariants_of_finished_run()


def test_sigkill_mid_run_loses_no_task_and_reruns_only_the_tasks_the_dead_worker_held(
    dsn: str,
    pool: Pool,
    engine_config: EngineConfig,
    workflows: WorkflowCoordinator,
    tables: Tables,
    run_log: RunLog,
    tmp_path: Path,
) -> None:
    workflows.register_workflow(CHAIN)
    _start(workflows, "chain", 8)
    short_leases = ["--lease", "1.0", "--renewal", "0.3", "--poll", "0.2"]

    with worker_process(dsn, tmp_path, "--task-type", "step", "--sleep", "1.0", *short_leases) as dead:
        # its first poll leases four tasks; their handlers sleep 1s, so it dies holding all four
        wait_for("the worker process to start four handlers", lambda: run_log.count(dead.pid) >= 4)
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
    orphaned = {
        r["execution_id"]
        for r in tables.executions()
        if r["state"] == TaskState.RUNNING.value and r["lease_holder"] == dead.worker_id
    }
    assert orphaned, "the worker was killed while holding no task"

    def step(ctx: TaskContext) -> str:
        run_log.record(ctx)
        return "done"

    survivor_config = _tuned(engine_config, lease=1.0, renewal=0.3, poll=0.2)
    with Worker(pool, {"step": step}, concurrency=4, config=survivor_config) as survivor:
        wait_for("the surviving worker to finish every workflow", lambda: tables.all_completed(8))

    per_task = tables.completed_executions_per_task()
    assert len(per_task) == 16
    assert set(per_task.values()) == {1}
    assert len(tables.events(EventType.TASK_COMPLETED)) == 16
    for eid in orphaned:
        row = tables.execution(eid)
        assert (row["state"], row["lease_holder"], row["fence_token"]) == (
            TaskState.COMPLETED.value,
            survivor.worker_id,
            2,
        )
    lapsed = {UUID(e["payload"]["execution_id"]) for e in tables.events(EventType.TASK_LEASE_EXPIRED)}
    assert lapsed == orphaned

    # at-least-once: a handler the dead process started ran again in the survivor, and only those did
    runs = run_log.pids_by_execution()
    ran_twice = {eid for eid, pids in runs.items() if len(pids) > 1}
    assert ran_twice
    assert ran_twice <= orphaned
    assert all(pids == [dead.pid, os.getpid()] for eid, pids in runs.items() if eid in ran_twice)
    print(
        f"\nSIGKILL: {len(orphaned)} leases orphaned, {sum(map(len, runs.values()))} handler runs "
        f"for 16 tasks, {len(ran_twice)} ran twice, every task accepted once"
    )
    tables.check_invariants_of_finished_run()


# -- leases -------------------------------------------------------------------------------------------


def test_heartbeat_keeps_a_handler_three_times_longer_than_its_lease(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator, tables: Tables
) -> None:
    workflows.register_workflow(_single("long", "long"))
    (instance,) = _start(workflows, "long", 1)
    lost: list[bool] = []

    def long_running(ctx: TaskContext) -> str:
        time.sleep(1.8)
        lost.append(ctx.lease_lost.is_set())
        return "kept"

    # a reclaimer sweeping all along would requeue the task the moment its lease lapsed
    janitor = TaskCoordinator(pool, engine_config)
    reclaimed = 0
    config = _tuned(engine_config, lease=0.6, renewal=0.2)
    with Worker(pool, {"long": long_running}, concurrency=1, config=config) as worker:

        def finished() -> bool:
            nonlocal reclaimed
            reclaimed += janitor.reclaim_expired_leases()
            return workflows.get_workflow(instance.instance_id).state is WorkflowState.COMPLETED

        wait_for("the long task to complete", finished)

    (execution,) = workflows.list_tasks(instance.instance_id)
    assert (execution.state, execution.attempt_number, execution.fence_token) == (TaskState.COMPLETED, 1, 1)
    assert reclaimed == 0
    assert tables.events(EventType.TASK_LEASE_EXPIRED) == []
    assert lost == [False]
    assert worker.stats.dropped == 0


def test_handler_whose_lease_is_taken_over_sees_lease_lost_and_its_result_is_dropped(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    workflows.register_workflow(_single("contested", "contested"))
    (instance,) = _start(workflows, "contested", 1)
    config = _tuned(engine_config, lease=1.0, renewal=0.3)
    started, test_over = threading.Event(), threading.Event()
    saw_lease_lost: list[bool] = []

    def contested(ctx: TaskContext) -> str:
        if ctx.input["workflow"]["i"] == 0:
            started.set()
            # a cooperative long task: it checks its lease between steps and stops once it is gone
            while not ctx.lease_lost.wait(0.05) and not test_over.is_set():
                pass
            saw_lease_lost.append(ctx.lease_lost.is_set())
            return "from the worker that lost its lease"
        return "later work"

    thief_id = uuid.uuid4()
    thief = TaskCoordinator(pool, engine_config)
    with (
        create_pool(config, min_size=3, max_size=3) as worker_pool,
        Worker(worker_pool, {"contested": contested}, concurrency=1, config=config) as worker,
    ):
        try:
            assert started.wait(SETTLE)
            stolen = _steal_lease(worker_pool, thief, thief_id, "contested")
            # the stalled renewal now reaches the database and finds the lease gone
            wait_for("the stale result to be dropped", lambda: worker.stats.dropped == 1)
        finally:
            test_over.set()
        thief.complete_task(stolen.execution_id, thief_id, stolen.fence_token, "from the thief")

        # the worker survived the drop: it still takes new work
        later = workflows.start_workflow(StartWorkflowRequest(NAMESPACE, "contested", "after", {"i": 1}))
        assert _wait_until_finished(workflows, later.instance_id) is WorkflowState.COMPLETED

    assert saw_lease_lost == [True]
    assert stolen.fence_token == 2
    assert (worker.stats.dropped, worker.stats.completed, worker.stats.failed) == (1, 1, 0)
    done = workflows.get_workflow(instance.instance_id)
    assert (done.state, done.output) == (WorkflowState.COMPLETED, {"only": "from the thief"})


# -- transactional completion -------------------------------------------------------------------------


@pytest.fixture
def effects(pool: Pool) -> Callable[[], list[tuple[UUID, int]]]:
    """Create ``public.effects`` and return a reader of its (execution_id, fence_token) rows."""
    with pool.connection() as conn:
        conn.execute("CREATE TABLE public.effects (execution_id uuid NOT NULL, fence_token bigint NOT NULL)")

    def read() -> list[tuple[UUID, int]]:
        with pool.connection() as conn:
            return conn.execute("SELECT execution_id, fence_token FROM public.effects").fetchall()

    return read


def _write_effect(conn: psycopg.Connection[Any], ctx: TaskContext) -> None:
    conn.execute(
        "INSERT INTO public.effects (execution_id, fence_token) VALUES (%s, %s)",
        (ctx.execution.execution_id, ctx.fence_token),
    )


def test_effect_written_in_the_completion_transaction_happens_exactly_once(
    pool: Pool,
    engine_config: EngineConfig,
    workflows: WorkflowCoordinator,
    effects: Callable[[], list[tuple[UUID, int]]],
) -> None:
    workflows.register_workflow(_single("pay", "pay"))
    (instance,) = _start(workflows, "pay", 1)

    def pay(ctx: TaskContext) -> None:
        with ctx.transaction() as conn:
            _write_effect(conn, ctx)
            ctx.output = {"paid": True}

    with Worker(pool, {"pay": pay}, config=engine_config) as worker:
        assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.COMPLETED

    (execution,) = workflows.list_tasks(instance.instance_id)
    assert (execution.state, execution.output) == (TaskState.COMPLETED, {"paid": True})
    assert effects() == [(execution.execution_id, 1)]
    assert (worker.stats.completed, worker.stats.dropped) == (1, 0)


def test_effect_of_a_handler_whose_fence_went_stale_is_rolled_back_with_its_result(
    pool: Pool,
    engine_config: EngineConfig,
    workflows: WorkflowCoordinator,
    effects: Callable[[], list[tuple[UUID, int]]],
) -> None:
    workflows.register_workflow(_single("pay", "pay"))
    (instance,) = _start(workflows, "pay", 1)
    config = _tuned(engine_config, lease=1.0, renewal=0.3)
    started, proceed = threading.Event(), threading.Event()
    outcome: list[str] = []

    def pay(ctx: TaskContext) -> None:
        started.set()
        proceed.wait(SETTLE)
        try:
            with ctx.transaction() as conn:
                _write_effect(conn, ctx)
                ctx.output = {"paid_by": "stale worker"}
        except LeaseLostError:
            outcome.append("lease lost")
            raise
        outcome.append("committed")

    thief_id = uuid.uuid4()
    thief = TaskCoordinator(pool, engine_config)
    with (
        create_pool(config, min_size=3, max_size=3) as worker_pool,
        Worker(worker_pool, {"pay": pay}, concurrency=1, config=config) as worker,
    ):
        try:
            assert started.wait(SETTLE)
            stolen = _steal_lease(worker_pool, thief, thief_id, "pay")
        finally:
            proceed.set()
        wait_for("the stale completion to be dropped", lambda: worker.stats.dropped == 1)

    assert outcome == ["lease lost"]
    assert effects() == []  # the stale attempt's INSERT rolled back with its completion
    with pool.connection() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO public.effects (execution_id, fence_token) VALUES (%s, %s)",
            (stolen.execution_id, stolen.fence_token),
        )
        thief.complete_task(
            stolen.execution_id, thief_id, stolen.fence_token, {"paid_by": "thief"}, conn=conn
        )
    assert effects() == [(stolen.execution_id, 2)]
    done = workflows.get_workflow(instance.instance_id)
    assert (done.state, done.output) == (WorkflowState.COMPLETED, {"only": {"paid_by": "thief"}})
    assert (worker.stats.completed, worker.stats.dropped) == (0, 1)


# -- failures -----------------------------------------------------------------------------------------


def test_handler_exception_fails_the_attempt_with_type_message_and_traceback_then_retries(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator, tables: Tables
) -> None:
    workflows.register_workflow(_single("flaky", "flaky", NO_DELAY))
    (instance,) = _start(workflows, "flaky", 1)

    def flaky_charge(ctx: TaskContext) -> dict[str, int]:
        if ctx.attempt < 3:
            raise RuntimeError(f"card declined on attempt {ctx.attempt}")
        return {"attempt": ctx.attempt}

    with Worker(pool, {"flaky": flaky_charge}, config=engine_config) as worker:
        assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.COMPLETED

    attempts = workflows.list_tasks(instance.instance_id)
    assert [(a.attempt_number, a.state) for a in attempts] == [
        (1, TaskState.FAILED),
        (2, TaskState.FAILED),
        (3, TaskState.COMPLETED),
    ]
    for attempt in attempts[:2]:
        error = attempt.error
        assert error["type"] == "RuntimeError"
        assert error["message"] == f"card declined on attempt {attempt.attempt_number}"
        assert error["traceback"].startswith("Traceback (most recent call last)")
        assert "in flaky_charge" in error["traceback"]
        assert error["traceback"].rstrip().endswith(f"RuntimeError: {error['message']}")
    assert len(tables.events(EventType.TASK_RETRY_SCHEDULED)) == 2
    assert (worker.stats.failed, worker.stats.completed, worker.stats.dropped) == (2, 1, 0)


def test_handler_that_keeps_raising_fails_the_workflow_after_max_attempts(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    retry = RetryPolicy(max_attempts=2, initial_interval=timedelta(0))
    workflows.register_workflow(_single("doomed", "doomed", retry))
    (instance,) = _start(workflows, "doomed", 1)

    def doomed(ctx: TaskContext) -> None:
        raise ValueError("never works")

    with Worker(pool, {"doomed": doomed}, config=engine_config):
        assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.FAILED

    attempts = workflows.list_tasks(instance.instance_id)
    assert [(a.attempt_number, a.state) for a in attempts] == [(1, TaskState.FAILED), (2, TaskState.FAILED)]
    assert {a.error["type"] for a in attempts} == {"ValueError"}


def test_handler_returning_a_non_json_value_fails_the_attempt_with_a_payload_error(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    workflows.register_workflow(_single("odd", "odd", NO_DELAY))
    (instance,) = _start(workflows, "odd", 1)

    def odd(ctx: TaskContext) -> object:
        return object() if ctx.attempt == 1 else {"attempt": ctx.attempt}

    with Worker(pool, {"odd": odd}, config=engine_config) as worker:
        assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.COMPLETED

    first, second = workflows.list_tasks(instance.instance_id)
    assert first.state is TaskState.FAILED
    assert first.error["type"] == "PayloadError"
    assert "object" in first.error["message"]
    assert (second.state, second.output) == (TaskState.COMPLETED, {"attempt": 2})
    assert (worker.stats.failed, worker.stats.completed, worker.stats.dropped) == (1, 1, 0)


def test_a_handler_raising_system_exit_leaves_its_thread_running_the_next_attempt(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    """A BaseException from a handler reports nothing (the lease lapses), and with one slot the one
    handler thread must survive it: nothing else would run the task again."""
    workflows.register_workflow(_single("exits", "exits", NO_DELAY))
    (instance,) = _start(workflows, "exits", 1)
    threads: list[threading.Thread] = []

    def exits(ctx: TaskContext) -> dict[str, int]:
        threads.append(threading.current_thread())
        if len(threads) == 1:
            raise SystemExit("a handler that calls sys.exit()")
        return {"run": len(threads)}

    config = _tuned(engine_config, lease=1.0, renewal=0.3, poll=0.1)
    with Worker(pool, {"exits": exits}, config=config, concurrency=1) as worker:
        assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.COMPLETED
    (task,) = workflows.list_tasks(instance.instance_id)
    assert task.output == {"run": 2}
    assert len(threads) == 2
    assert threads[0] is threads[1]
    assert (worker.stats.completed, worker.stats.failed) == (1, 0)


def test_a_thread_still_closing_its_task_span_is_not_counted_free(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread is free for the next handler only once the whole task is done, its span included (an
    exporter can be slow to close one): until then, a second handler gets a thread of its own."""
    workflows.register_workflow(_single("spans", "spans"))
    closing = threading.Event()
    release = threading.Event()
    second_ran = threading.Event()

    @contextmanager
    def slow_span(name: str, **attributes: Any) -> Iterator[None]:
        yield None
        if name == "orchestrator.task" and not closing.is_set():
            closing.set()
            release.wait(3 * SETTLE)  # the first task's span closes only when the test says so

    monkeypatch.setattr(telemetry, "span", slow_span)

    def handler(ctx: TaskContext) -> None:
        if ctx.input["workflow"]["i"] == 1:
            second_ran.set()

    with Worker(pool, {"spans": handler}, config=engine_config, concurrency=2):
        workflows.start_workflow(StartWorkflowRequest(NAMESPACE, "spans", "spans-0", {"i": 0}))
        assert closing.wait(SETTLE), "the first task never finished its handler"
        workflows.start_workflow(StartWorkflowRequest(NAMESPACE, "spans", "spans-1", {"i": 1}))
        try:
            assert second_ran.wait(SETTLE), "the second task waited for a thread still closing a span"
        finally:
            release.set()


def test_a_process_whose_started_worker_was_never_stopped_still_exits(engine_config: EngineConfig) -> None:
    """Worker.start() runs on a daemon thread so the host can exit; the handler threads must not hold
    the process open either, idle or not."""
    script = f"""
import sys, threading, time
from orchestrator_engine import EngineConfig, StartWorkflowRequest, TaskDefinition, WorkflowCoordinator
from orchestrator_engine import WorkflowDefinition, create_pool
from orchestrator_engine.worker import Worker
config = EngineConfig(dsn={engine_config.dsn!r}, schema={engine_config.schema!r})
pool = create_pool(config, min_size=1, max_size=4)
workflows = WorkflowCoordinator(pool, config)
workflows.register_workflow(
    WorkflowDefinition({NAMESPACE!r}, "leftover", (TaskDefinition("only", task_type="leftover"),)))
done = threading.Event()
Worker(pool, {{"leftover": lambda ctx: done.set()}}, config=config, concurrency=4).start()
workflows.start_workflow(StartWorkflowRequest({NAMESPACE!r}, "leftover", "leftover-0", {{}}))
sys.exit(0 if done.wait(30) else 3)  # the main thread ends with the worker and its threads running
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_a_handler_slot_frees_while_its_result_waits_for_the_commit(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator, dsn: str
) -> None:
    """With one slot, the next task runs while the first result's commit is blocked on a row lock."""
    workflows.register_workflow(_single("pair", "pair"))
    first, second = _start(workflows, "pair", 2)
    leased: dict[int, threading.Event] = {0: threading.Event(), 1: threading.Event()}
    proceed = threading.Event()

    def handler(ctx: TaskContext) -> dict[str, int]:
        i = ctx.input["workflow"]["i"]
        leased[i].set()
        if i == 0:
            proceed.wait(SETTLE)  # returns once the test holds this instance's row lock
        return {"i": i}

    with (
        psycopg.connect(dsn) as blocker,
        Worker(pool, {"pair": handler}, config=engine_config, concurrency=1),
    ):
        assert leased[0].wait(SETTLE), "the first task never started"
        blocker.execute(
            sql.SQL("SELECT 1 FROM {}.workflow_instances WHERE instance_id = %s FOR UPDATE").format(
                sql.Identifier(engine_config.schema)
            ),
            (first.instance_id,),
        )
        proceed.set()
        # the first result now waits for the lock; the only slot must take the second task anyway
        assert leased[1].wait(SETTLE), "the second task waited for the first result's commit"
        assert workflows.get_workflow(first.instance_id).state is WorkflowState.RUNNING
        blocker.rollback()
        assert _wait_until_finished(workflows, first.instance_id) is WorkflowState.COMPLETED
        assert _wait_until_finished(workflows, second.instance_id) is WorkflowState.COMPLETED


def test_a_worker_keeps_the_start_latencies_of_its_latest_tasks_only(
    pool: Pool,
    engine_config: EngineConfig,
    workflows: WorkflowCoordinator,
    tables: Tables,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # one number per task for ever would grow without bound in a worker that runs for months
    monkeypatch.setattr(worker_module, "LATENCY_WINDOW", 5)
    workflows.register_workflow(_single("tick", "tick"))
    _start(workflows, "tick", 12)
    worker = Worker(pool, {"tick": lambda ctx: None}, config=engine_config, concurrency=4)
    with worker:
        wait_for("12 workflows to complete", lambda: tables.all_completed(12))
    assert worker.stats.started == 12
    assert 5 <= len(worker.stats.start_latencies) <= 10
    assert all(latency >= 0 for latency in worker.stats.start_latencies)


# -- wake-up ------------------------------------------------------------------------------------------


def test_notify_wakes_an_idle_worker_long_before_its_poll_interval(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator, tables: Tables
) -> None:
    poll = 5.0
    count = 20
    workflows.register_workflow(_single("ping", "ping"))
    config = _tuned(engine_config, poll=poll)
    wall: list[float] = []
    in_db: list[float] = []

    with Worker(pool, {"ping": lambda ctx: "pong"}, concurrency=1, config=config) as worker:
        wait_for("the worker to LISTEN", lambda: bool(tables.listener_pids()))
        began = time.monotonic()
        for i in range(count):
            sent = time.monotonic()
            instance = workflows.start_workflow(StartWorkflowRequest(NAMESPACE, "ping", f"ping-{i}"))
            assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.COMPLETED
            wall.append(time.monotonic() - sent)
            (execution,) = workflows.list_tasks(instance.instance_id)
            assert execution.started_at is not None
            assert execution.ready_at is not None
            in_db.append((execution.started_at - execution.ready_at).total_seconds())
        elapsed = time.monotonic() - began

    print(
        f"\nready->started (database clock) for {count} workflows started one at a time, poll {poll}s: "
        f"p50 {statistics.median(in_db) * 1000:.1f}ms max {max(in_db) * 1000:.1f}ms; "
        f"start->completed (wall) p50 {statistics.median(wall) * 1000:.1f}ms max {max(wall) * 1000:.1f}ms"
    )
    # had the worker slept through each NOTIFY, the poll backstop alone would need up to count * poll
    assert elapsed < count * poll
    assert worker.stats.notifications > 0


def test_worker_reconnects_its_listener_after_the_backend_is_terminated(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator, tables: Tables
) -> None:
    workflows.register_workflow(_single("ping", "ping"))
    config = _tuned(engine_config, poll=5.0)

    with Worker(pool, {"ping": lambda ctx: "pong"}, concurrency=1, config=config) as worker:
        wait_for("the worker to LISTEN", lambda: bool(tables.listener_pids()))
        (killed,) = tables.listener_pids()
        with pool.connection() as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (killed,))
        wait_for("the listener to reconnect", lambda: worker.stats.listener_reconnects >= 1)
        wait_for("a new LISTEN backend", lambda: bool(tables.listener_pids() - {killed}))
        # and listening on its own channel too (direct dispatch): a start's grant is told there
        wait_for("the listener to listen on every channel", worker._listening.is_set)

        notified_before = worker.stats.notifications
        sent = time.monotonic()
        instance = workflows.start_workflow(StartWorkflowRequest(NAMESPACE, "ping", "after-reconnect"))
        assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.COMPLETED
        print(f"\nafter the listener reconnected, start->completed took {time.monotonic() - sent:.3f}s")
        assert worker.stats.notifications > notified_before


# -- construction and lifecycle -----------------------------------------------------------------------


def test_worker_without_handlers_is_refused(pool: Pool, engine_config: EngineConfig) -> None:
    with pytest.raises(ValueError, match="at least one handler"):
        Worker(pool, {}, config=engine_config)


@pytest.mark.parametrize("concurrency", [0, -1])
def test_worker_concurrency_must_be_positive(
    pool: Pool, engine_config: EngineConfig, concurrency: int
) -> None:
    handlers: dict[str, Handler] = {"ping": lambda ctx: "pong"}
    with pytest.raises(ValueError, match="concurrency must be a positive int"):
        Worker(pool, handlers, concurrency=concurrency, config=engine_config)


def test_with_block_starts_the_worker_and_stops_it_on_exit(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator, tables: Tables
) -> None:
    workflows.register_workflow(_single("ping", "ping"))
    before = set(threading.enumerate())
    worker = Worker(pool, {"ping": lambda ctx: "pong"}, config=engine_config)

    with worker as entered:
        assert entered is worker
        (instance,) = _start(workflows, "ping", 1)
        assert _wait_until_finished(workflows, instance.instance_id) is WorkflowState.COMPLETED
        leaving = time.monotonic()
    print(f"\nleaving the with-block (Worker.stop) took {time.monotonic() - leaving:.2f}s")

    lingering = [
        t
        for t in set(threading.enumerate()) - before
        if t.name
        in (
            "orchestrator-worker",
            "orchestrator-heartbeat",
            "orchestrator-listener",
            "orchestrator-completer",
        )
    ]
    for t in lingering:
        t.join(SETTLE)
    assert not [t.name for t in lingering if t.is_alive()]
    assert worker.running_count == 0
    wait_for("the worker's LISTEN connection to close", lambda: not tables.listener_pids())
