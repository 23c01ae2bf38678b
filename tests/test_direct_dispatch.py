"""Direct dispatch: a start leases its one ready task to an idle worker in its own statement.

Idle workers wait in ``waiting_workers`` (migration 0007) while their listener connection holds an
advisory lock; a start outside a host transaction that makes exactly one task ready takes a slot of a
live one, writes the lease with the start and tells that worker on its own channel. Everything else
is left to the poll, as before.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from helpers import Pool, assert_event_ids_follow_keys, query, wait_for, worker_process

from orchestrator_engine import (
    EngineConfig,
    EventType,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskState,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
)
from orchestrator_engine.check import check_invariants
from orchestrator_engine.worker import TaskContext, Worker, worker_lock_key

NAMESPACE = "direct"
ONE = WorkflowDefinition(NAMESPACE, "one", [TaskDefinition("work")])
TWO_ROOTS = WorkflowDefinition(
    NAMESPACE, "two", [TaskDefinition("work"), TaskDefinition("more", task_type="work")]
)


@pytest.fixture
def workflows(pool: Pool, engine_config: EngineConfig) -> WorkflowCoordinator:
    wc = WorkflowCoordinator(pool, engine_config)
    wc.register_workflow(ONE)
    wc.register_workflow(TWO_ROOTS)
    return wc


def waiting(pool: Pool, config: EngineConfig) -> dict[UUID, int]:
    """Each waiting worker's free slots, as its row says."""
    return {
        r["worker_id"]: r["free"]
        for r in query(pool, config, "SELECT worker_id, free FROM {}.waiting_workers")
    }


def execution_of(pool: Pool, config: EngineConfig, instance_id: UUID) -> dict[str, Any]:
    (row,) = query(
        pool, config, "SELECT * FROM {}.task_executions WHERE workflow_instance_id = %s", instance_id
    )
    return row


def start(workflows: WorkflowCoordinator, run_id: str, name: str = "one") -> UUID:
    return workflows.start_workflow(StartWorkflowRequest(NAMESPACE, name, run_id, {})).instance_id


def finished(workflows: WorkflowCoordinator, instance_id: UUID) -> bool:
    return workflows.get_workflow(instance_id).state is WorkflowState.COMPLETED


def assert_invariants(pool: Pool, config: EngineConfig) -> None:
    with pool.connection() as conn:
        report = check_invariants(conn, schema=config.schema)
    assert report.ok, report.violations
    # a start that leases its task writes the TASK_STARTED event itself, with the id a poll's would get
    assert assert_event_ids_follow_keys(pool, config) > 0


def test_an_idle_worker_gets_a_start_leased_to_it_in_the_start_itself(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    ran: list[tuple[UUID, int]] = []

    def handler(ctx: TaskContext) -> dict[str, int]:
        ran.append((ctx.execution.execution_id, ctx.fence_token))
        return {"ok": 1}

    worker = Worker(pool, {"work": handler}, namespace=NAMESPACE, concurrency=3, config=engine_config)
    with worker:
        wait_for("the worker to wait", lambda: waiting(pool, engine_config).get(worker.worker_id) == 3)
        instance = workflows.start_workflow(StartWorkflowRequest(NAMESPACE, "one", "r1", {}))
        wait_for("the workflow to complete", lambda: finished(workflows, instance.instance_id))
        # back to three free slots once the task is done: the row follows the worker
        wait_for("the worker to wait again", lambda: waiting(pool, engine_config).get(worker.worker_id) == 3)
    assert worker.stats.direct == 1
    history = workflows.get_history(instance.instance_id)
    assert [e.event_type for e in history] == [
        EventType.WORKFLOW_STARTED,
        EventType.TASK_SCHEDULED,
        EventType.TASK_STARTED,
        EventType.TASK_COMPLETED,
        EventType.WORKFLOW_COMPLETED,
    ]
    granted = history[2]
    assert granted.sequence_number == 3 == instance.sequence_number  # the start returned its own
    assert granted.payload["worker_id"] == str(worker.worker_id)
    assert granted.payload["fence_token"] == 1
    assert ran == [(UUID(granted.payload["execution_id"]), 1)]
    assert_invariants(pool, engine_config)


def test_a_stopped_worker_takes_no_more_starts(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    worker = Worker(
        pool, {"work": lambda ctx: None}, namespace=NAMESPACE, concurrency=2, config=engine_config
    )
    with worker:
        wait_for("the worker to wait", lambda: worker.worker_id in waiting(pool, engine_config))
    assert worker.worker_id not in waiting(pool, engine_config)
    instance_id = start(workflows, "after-stop")
    row = execution_of(pool, engine_config, instance_id)
    assert (row["state"], row["lease_holder"], row["fence_token"]) == ("READY", None, 0)


def test_a_killed_idle_worker_takes_no_start_and_the_task_waits_for_a_poll(
    dsn: str, tmp_path: Path, pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    with worker_process(dsn, tmp_path, "--task-type", "work", "--concurrency", "2") as proc:
        wait_for("the worker process to wait", lambda: waiting(pool, engine_config).get(proc.worker_id) == 2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.proc.wait()
        # its row stays, but the server ends its listener's session, and the lock with it
        wait_for("its lock to go", lambda: not _lock_held(dsn, proc.worker_id))
        assert proc.worker_id in waiting(pool, engine_config)
        instance_id = start(workflows, "after-kill")
    row = execution_of(pool, engine_config, instance_id)
    assert (row["state"], row["lease_holder"]) == ("READY", None)
    (leased,) = TaskCoordinator(pool, engine_config).poll_tasks(uuid.uuid4(), task_types=["work"])
    assert (leased.workflow_instance_id, leased.fence_token) == (instance_id, 1)


def test_grants_stop_at_the_free_slots_and_the_rest_is_polled(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    release = threading.Event()

    def hold(ctx: TaskContext) -> None:
        assert release.wait(30)

    worker = Worker(pool, {"work": hold}, namespace=NAMESPACE, concurrency=2, config=engine_config)
    with worker:
        wait_for("the worker to wait", lambda: waiting(pool, engine_config).get(worker.worker_id) == 2)
        ids = [start(workflows, f"slot-{i}") for i in range(3)]
        states = [execution_of(pool, engine_config, i)["state"] for i in ids]
        assert states == ["RUNNING", "RUNNING", "READY"]
        assert waiting(pool, engine_config)[worker.worker_id] == 0
        release.set()
        wait_for("every workflow to complete", lambda: all(finished(workflows, i) for i in ids))
    assert (worker.stats.direct, worker.stats.started) == (2, 3)
    assert_invariants(pool, engine_config)


def test_only_a_start_that_makes_one_task_ready_outside_a_transaction_is_dispatched(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    release = threading.Event()
    worker = Worker(
        pool, {"work": lambda ctx: release.wait(30)}, namespace=NAMESPACE, concurrency=8, config=engine_config
    )
    with worker:
        wait_for("the worker to wait", lambda: waiting(pool, engine_config).get(worker.worker_id) == 8)
        two_roots = start(workflows, "two-roots", name="two")
        batch = [
            i.instance_id
            for i in workflows.start_workflows(
                [StartWorkflowRequest(NAMESPACE, "one", f"batch-{i}", {}) for i in range(2)]
            )
        ]
        with pool.connection() as conn, conn.transaction():
            hosted = workflows.start_workflow(StartWorkflowRequest(NAMESPACE, "one", "hosted", {}), conn=conn)
        for instance_id in [two_roots, *batch, hosted.instance_id]:
            # a grant in the start carries the start's transaction time; a poll's comes later
            wait_for("the poll", lambda i=instance_id: len(_grants_of(workflows, i)) >= 1)  # type: ignore[misc]
            history = workflows.get_history(instance_id)
            assert history[0].event_type == EventType.WORKFLOW_STARTED
            assert all(g.created_at > history[0].created_at for g in _grants_of(workflows, instance_id))
        release.set()
        wait_for(
            "every workflow to complete",
            lambda: all(finished(workflows, i) for i in [two_roots, *batch, hosted.instance_id]),
        )
    assert worker.stats.direct == 0


def test_without_direct_dispatch_a_worker_does_not_wait_and_polls_as_before(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    config = replace(engine_config, direct_dispatch=False)
    worker = Worker(pool, {"work": lambda ctx: None}, namespace=NAMESPACE, concurrency=2, config=config)
    with worker:
        wait_for("the worker to poll", lambda: worker.stats.polls > 0)
        instance_id = start(workflows, "no-direct")
        wait_for("the workflow to complete", lambda: finished(workflows, instance_id))
        assert waiting(pool, engine_config) == {}
    assert (worker.stats.direct, worker.stats.started) == (0, 1)


def test_a_grant_told_while_the_worker_was_not_listening_runs_once_its_listener_connects(
    dsn: str, pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    # The grant's notification is lost (nobody listens on the worker's channel yet): the worker finds
    # the lease it holds when its listener connects, instead of leaving it to lapse.
    worker_id = uuid.uuid4()
    lock_key = worker_lock_key(worker_id)
    ran = threading.Event()
    with psycopg.connect(dsn, autocommit=True) as stand_in:
        stand_in.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
        query(
            pool,
            engine_config,
            "INSERT INTO {}.waiting_workers (worker_id, namespace, task_types, free, lease_duration,"
            " lock_key, channel) VALUES (%s, %s, ARRAY['work'], 1, interval '30 seconds', %s, 'nobody')"
            " RETURNING 1",
            worker_id,
            NAMESPACE,
            lock_key,
        )
        instance_id = start(workflows, "lost-note")
        assert execution_of(pool, engine_config, instance_id)["lease_holder"] == worker_id
    worker = flagging_worker(pool, engine_config, worker_id, ran)
    with worker:
        wait_for("the workflow to complete", lambda: finished(workflows, instance_id))
    assert ran.is_set()
    assert (worker.stats.direct, worker.stats.started) == (1, 1)
    task = workflows.list_tasks(instance_id)[0]
    assert (task.state, task.fence_token) == (TaskState.COMPLETED, 1)


def flagging_worker(pool: Pool, config: EngineConfig, worker_id: UUID, ran: threading.Event) -> Worker:
    """A worker with this id whose one handler slot sets ``ran``."""
    return Worker(
        pool,
        {"work": lambda ctx: ran.set()},
        namespace=NAMESPACE,
        concurrency=1,
        config=config,
        worker_id=worker_id,
    )


def _grants_of(workflows: WorkflowCoordinator, instance_id: UUID) -> list[Any]:
    return [e for e in workflows.get_history(instance_id) if e.event_type == EventType.TASK_STARTED]


def _lock_held(dsn: str, worker_id: UUID) -> bool:
    """Tell whether some session holds the advisory lock of ``worker_id``'s listener."""
    key = worker_lock_key(worker_id) % 2**64  # unsigned: pg_locks splits it into two oids
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
            " AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND granted",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchone()
    assert row is not None
    return bool(row[0])


def adopt_while_running(
    pool: Pool, config: EngineConfig, workflows: WorkflowCoordinator, run_id: str, after: float
) -> tuple[Worker, UUID, list[UUID]]:
    """Start a workflow its idle worker gets directly; ``after`` seconds into its handler, have the
    worker adopt what it holds; return the worker, the instance and the executions its handler ran."""
    release = threading.Event()
    runs: list[UUID] = []

    def hold(ctx: TaskContext) -> None:
        runs.append(ctx.execution.execution_id)
        assert release.wait(30)

    worker = Worker(pool, {"work": hold}, namespace=NAMESPACE, concurrency=2, config=config)
    with worker:
        wait_for("the worker to wait", lambda: waiting(pool, config).get(worker.worker_id) == 2)
        instance_id = start(workflows, run_id)
        wait_for("the handler to start", lambda: len(runs) == 1)
        time.sleep(after)
        handlers = worker._handlers
        assert handlers is not None
        worker._take_grants(handlers)  # finds the lease it holds: RUNNING, fence 1, unexpired
        release.set()
        wait_for("the workflow to complete", lambda: finished(workflows, instance_id))
    return worker, instance_id, runs


def test_a_grant_is_handed_out_once_however_often_it_is_found(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    # Told on the channel, then found again by adopting (the listener reconnects, the refresh): a
    # lease this worker holds and already runs is not handed out a second time under the same fence.
    worker, instance_id, runs = adopt_while_running(pool, engine_config, workflows, "found-twice", after=0)
    assert runs == [execution_of(pool, engine_config, instance_id)["execution_id"]]
    assert (worker.stats.direct, worker.stats.started) == (1, 1)


def test_a_stray_notification_on_a_workers_channel_does_not_stop_its_listener(
    dsn: str, pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    worker = Worker(
        pool, {"work": lambda ctx: None}, namespace=NAMESPACE, concurrency=1, config=engine_config
    )
    with worker:
        wait_for("the worker to wait", lambda: waiting(pool, engine_config).get(worker.worker_id) == 1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_notify(%s, 'not an execution id')",
                (f"orchestrator_worker_{worker.worker_id.hex}",),
            )
        instance_id = start(workflows, "after-stray")
        wait_for("the workflow to complete", lambda: finished(workflows, instance_id))
    assert worker.stats.direct == 1


def test_adopting_takes_only_what_a_start_granted_not_a_polled_lease_nobody_runs(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    # A poll whose response was lost leaves a lease held under this worker's id that nobody runs: it
    # must lapse and be reclaimed under a new fence, not be run by the worker that adopts grants.
    worker_id = uuid.uuid4()
    instance_id = start(workflows, "polled-then-lost")
    (lost,) = TaskCoordinator(pool, engine_config).poll_tasks(worker_id, task_types=["work"])
    ran = threading.Event()
    worker = flagging_worker(pool, engine_config, worker_id, ran)
    with worker:
        wait_for("the worker to wait", lambda: worker_id in waiting(pool, engine_config))
        handlers = worker._handlers
        assert handlers is not None
        worker._take_grants(handlers)
    assert not ran.is_set()
    assert worker.stats.started == 0
    row = execution_of(pool, engine_config, instance_id)
    assert (row["state"], row["lease_holder"], row["fence_token"]) == ("RUNNING", worker_id, lost.fence_token)


def test_a_direct_grant_that_runs_past_two_leases_is_not_adopted_again(
    pool: Pool, engine_config: EngineConfig, workflows: WorkflowCoordinator
) -> None:
    # The worker forgets the grants it has handed out after two lease durations, but not while one
    # still runs (its lease is renewed, so adopting would find it held and unexpired).
    config = replace(
        engine_config, lease_duration=timedelta(seconds=1), renewal_interval=timedelta(seconds=0.3)
    )
    # past two lease durations, renewed meanwhile
    worker, _, runs = adopt_while_running(pool, config, workflows, "long-grant", after=2.5)
    assert len(runs) == 1
    assert (worker.stats.direct, worker.stats.started) == (1, 1)
