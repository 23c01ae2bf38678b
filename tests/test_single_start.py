"""A start of one workflow: its own statement (workflow_start_one), and direct dispatch only when it can pay.

``start_workflow`` sends ``workflow_start_one`` (the instance's columns as parameters of their own),
or ``workflow_start_direct`` (the same plus the claim of an idle worker) while the engine expects a
worker to wait; batches send ``workflow_start_many``. The three must write the same rows.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from helpers import NAMESPACE, Pool, query, register, wait_for
from psycopg import sql
from psycopg.rows import dict_row

from orchestrator_engine import (
    EngineConfig,
    RetryPolicy,
    StartWorkflowRequest,
    TaskDefinition,
    WorkflowCoordinator,
    create_pool,
)
from orchestrator_engine.coordinators import _engine
from orchestrator_engine.worker import TaskContext, Worker

SHAPE = [
    TaskDefinition("root", timeout=timedelta(seconds=7), retry=RetryPolicy(max_attempts=4)),
    TaskDefinition("other_root", task_type="other"),
    TaskDefinition("left", depends_on=["root"]),
    TaskDefinition("right", depends_on=["root", "other_root"], timeout=timedelta(milliseconds=1500)),
    TaskDefinition("join", depends_on=["left", "right"], compensation="undo"),
]

#: columns that differ between two starts of the same definition whatever writes them
_OWN = {
    "instance_id",
    "execution_id",
    "workflow_instance_id",
    "run_id",
    "created_at",
    "updated_at",
    "ready_at",
}


def _written(pool: Pool, config: EngineConfig, instance_id: UUID) -> dict[str, Any]:
    """What a start wrote for an instance, with its own ids and timestamps replaced by names."""
    names = {str(instance_id): "I"}
    tasks = query(
        pool,
        config,
        "SELECT * FROM {}.task_executions WHERE workflow_instance_id = %s ORDER BY task_id",
        instance_id,
    )
    for row in tasks:
        names[str(row["execution_id"])] = f"<{row['task_id']}>"

    def named(value: Any) -> Any:
        text = str(value)
        for raw, name in names.items():
            text = text.replace(raw, name)
        return text

    (instance,) = query(
        pool, config, "SELECT * FROM {}.workflow_instances WHERE instance_id = %s", instance_id
    )
    events = query(
        pool,
        config,
        "SELECT sequence_number, event_type, payload, idempotency_key FROM {}.events"
        " WHERE workflow_instance_id = %s ORDER BY sequence_number",
        instance_id,
    )
    for event in events:
        event["payload"].pop("run_id", None)
    return {
        "instance": {k: v for k, v in instance.items() if k not in _OWN},
        "ready_at_set": [row["ready_at"] is not None for row in tasks],
        "tasks": [{k: named(v) for k, v in row.items() if k not in _OWN} for row in tasks],
        "events": [{k: named(v) for k, v in event.items()} for event in events],
    }


def test_a_single_start_writes_what_a_batch_start_writes(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "shape", SHAPE)
    one = wc.start_workflow(StartWorkflowRequest(NAMESPACE, "shape", "one", {"n": 1}))
    batch = wc.start_workflows(
        [StartWorkflowRequest(NAMESPACE, "shape", f"batch-{i}", {"n": 1}) for i in range(2)]
    )
    written = [_written(pool, engine_config, i.instance_id) for i in (one, *batch)]
    assert written[0] == written[1] == written[2]
    states = {t["task_id"]: t["state"] for t in written[0]["tasks"]}
    assert states == {
        "join": "PENDING",
        "left": "PENDING",
        "other_root": "READY",
        "right": "PENDING",
        "root": "READY",
    }
    assert one.sequence_number == batch[0].sequence_number == written[0]["instance"]["sequence_number"] == 3
    assert one.input == {"n": 1}
    assert one.output is None


def _recording(
    wc: WorkflowCoordinator, monkeypatch: pytest.MonkeyPatch, recheck: float = 3600.0
) -> list[bool]:
    """Record, for each start of one workflow, whether it sent the statement that dispatches directly.

    ``recheck``: how long after a start that saw nobody waiting the next tries anyway (an hour: never,
    in a test, unless it says otherwise).
    """
    monkeypatch.setattr(_engine, "DIRECT_RECHECK", recheck)
    sent: list[bool] = []
    repo = wc.engine.repos.instances
    start_one = repo.workflow_start_one

    def spy(conn: psycopg.Connection[Any], params: dict[str, Any], *, direct: bool) -> Any:
        sent.append(direct)
        return start_one(conn, params, direct=direct)

    monkeypatch.setattr(repo, "workflow_start_one", spy)
    return sent


def _free(pool: Pool, config: EngineConfig, worker: Worker) -> int | None:
    rows = query(pool, config, "SELECT free FROM {}.waiting_workers WHERE worker_id = %s", worker.worker_id)
    return rows[0]["free"] if rows else None


def test_a_start_dispatches_directly_only_after_a_start_saw_a_worker_waiting(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(wc, "one", [TaskDefinition("work")])
    sent = _recording(wc, monkeypatch)

    def begin(run_id: str) -> UUID:
        return wc.start_workflow(StartWorkflowRequest(NAMESPACE, "one", run_id)).instance_id

    # nobody waits: the first start (the engine expects a worker at first) learns it, the next is lean
    early = [begin("nobody-1"), begin("nobody-2")]
    assert sent == [True, False]
    done = threading.Event()
    ran: list[str] = []

    def handler(ctx: TaskContext) -> None:
        ran.append(str(ctx.execution.workflow_instance_id))
        done.set()

    worker = Worker(pool, {"work": handler}, namespace=NAMESPACE, concurrency=2, config=engine_config)
    with worker:
        wait_for("the worker to run the early tasks", lambda: len(ran) == 2)
        wait_for("the worker to wait", lambda: _free(pool, engine_config, worker) == 2)
        # this start is lean, so a poll runs its task (the NOTIFY wakes the worker); it sees the
        # worker waiting, so the one after it leases its task to the worker in the start
        noticed = begin("noticed")
        wait_for("the polled task to run", lambda: str(noticed) in ran)
        wait_for("the worker to wait again", lambda: _free(pool, engine_config, worker) == 2)
        dispatched = begin("dispatched")
        wait_for("the dispatched task to run", lambda: str(dispatched) in ran)
    assert sent == [True, False, False, True]
    assert worker.stats.direct == 1
    assert worker.stats.started == 4
    assert {str(i) for i in early} <= set(ran)


def test_a_start_long_after_one_that_saw_nobody_waiting_tries_direct_dispatch_again(
    wc: WorkflowCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sparse starts, whose latency direct dispatch is for, try it whatever the last one saw
    register(wc, "one", [TaskDefinition("work")])
    sent = _recording(wc, monkeypatch, recheck=1.0)
    for run_id in ("a", "b"):
        wc.start_workflow(StartWorkflowRequest(NAMESPACE, "one", run_id))
    time.sleep(1.1)
    wc.start_workflow(StartWorkflowRequest(NAMESPACE, "one", "c"))
    assert sent == [True, False, True]


def test_the_start_statement_keeps_one_generic_plan_for_versioned_and_latest_starts(
    engine_config: EngineConfig,
) -> None:
    # A parameter that the planner could fold (latest) must not make a custom plan look cheaper
    # than the generic one, or PostgreSQL plans the statement again on every call
    with create_pool(engine_config, min_size=1, max_size=1) as one_connection:
        wc = WorkflowCoordinator(one_connection, engine_config)
        register(wc, "one", [TaskDefinition("work")])
        sent = wc.engine.repos.instances._q["workflow_start_one"].text.decode()

        def plans_after(starts: range) -> tuple[int, int]:
            for i in starts:
                wc.start_workflow(
                    StartWorkflowRequest(NAMESPACE, "one", f"r{i}", version=1 if i % 2 else None)
                )
            with one_connection.connection() as conn:
                (row,) = conn.execute(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = %s",
                    [sent],
                ).fetchall()
            return row[0], row[1]

        # psycopg prepares a statement on its fifth run; PostgreSQL then plans the first five
        # executions for their parameters before it compares those plans with the generic one
        generic, custom = plans_after(range(20))
        assert custom == 5
        assert plans_after(range(20, 40)) == (generic + 20, 5), "each later start runs the generic plan"


def test_a_start_through_a_host_connection_that_makes_dict_rows_works(
    wc: WorkflowCoordinator, engine_config: EngineConfig
) -> None:
    register(wc, "one", [TaskDefinition("work")])
    with psycopg.connect(engine_config.dsn, row_factory=dict_row) as host:
        pinned = wc.start_workflow(StartWorkflowRequest(NAMESPACE, "one", "pinned", version=1), conn=host)
        latest = wc.start_workflow(StartWorkflowRequest(NAMESPACE, "one", "latest"), conn=host)
        again = wc.start_workflow(StartWorkflowRequest(NAMESPACE, "one", "pinned"), conn=host)
        host.commit()
    assert pinned.workflow_version == latest.workflow_version == 1
    assert again.instance_id == pinned.instance_id
    assert isinstance(wc.engine.expect_waiting(NAMESPACE), bool)


def test_a_host_connection_dropped_without_close_is_freed_at_once(
    wc: WorkflowCoordinator, engine_config: EngineConfig
) -> None:
    # the engine keeps a cursor only on its pool's connections: on a host's, the pair would be a
    # reference cycle, and the server connection would stay open until the cycle collector ran
    register(wc, "one", [TaskDefinition("work")])
    gc.disable()
    try:
        host = psycopg.connect(engine_config.dsn, autocommit=True)
        wc.start_workflow(StartWorkflowRequest(NAMESPACE, "one", "hosted"), conn=host)
        gone = weakref.ref(host)
        # psycopg warns when it finalises an open connection: here, as the last reference goes
        with pytest.warns(ResourceWarning, match="deleted while still open"):
            del host
        assert gone() is None
    finally:
        gc.enable()


def _waiting_row(pool: Pool, config: EngineConfig, namespace: str, *, seen: datetime) -> None:
    """Write a waiting_workers row offering 4 slots for "work", last rewritten at ``seen``.

    Nobody holds its lock, so no start can claim it: these tests look only at which statement a
    start sends.
    """
    with pool.connection() as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.waiting_workers (worker_id, namespace, task_types, free, lease_duration,"
                " lock_key, channel, seen_at) VALUES (%s, %s, %s, 4, interval '30 seconds', 1, 'nobody', %s)"
            ).format(sql.Identifier(config.schema)),
            [uuid4(), namespace, ["work"], seen],
        )


def test_a_killed_workers_leftover_row_stops_drawing_the_direct_statement(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a killed worker's row stays (free > 0) until a live worker deletes it, a minute on; no start can
    # claim it once it is ten seconds old, so it must not keep starts on the direct statement either
    register(wc, "one", [TaskDefinition("work")])
    sent = _recording(wc, monkeypatch)
    _waiting_row(pool, engine_config, NAMESPACE, seen=datetime.now(timezone.utc) - timedelta(seconds=11))
    for i in range(3):
        wc.start_workflow(StartWorkflowRequest(NAMESPACE, "one", f"r{i}"))
    assert sent == [True, False, False]


def test_the_hint_is_kept_per_namespace(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a worker waits in "busy" only: starts in "quiet", interleaved, must not keep those in "busy"
    # off the statement that can lease to it
    for namespace in ("quiet", "busy"):
        register(wc, "one", [TaskDefinition("work")], namespace=namespace)
    sent = _recording(wc, monkeypatch)
    _waiting_row(pool, engine_config, "busy", seen=datetime.now(timezone.utc))
    for i in range(3):
        for namespace in ("quiet", "busy"):
            wc.start_workflow(StartWorkflowRequest(namespace, "one", f"r{i}"))
    assert sent == [True, True, False, True, False, True]
