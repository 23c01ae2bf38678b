"""complete_tasks: many results in one transaction, each judged on its own, without deadlocks."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg

from orchestrator_engine import (
    EngineConfig,
    FencingError,
    PayloadError,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskState,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
)
from orchestrator_engine.check import check_invariants

FAN = WorkflowDefinition(
    "group", "fan", [TaskDefinition(f"p{i}", task_type="part") for i in range(6)] + [TaskDefinition("solo")]
)


def _start(pool: Any, config: EngineConfig, runs: int) -> tuple[WorkflowCoordinator, TaskCoordinator]:
    wc = WorkflowCoordinator(pool, config)
    wc.register_workflow(FAN)
    wc.start_workflows([StartWorkflowRequest("group", "fan", f"run-{i}") for i in range(runs)])
    return wc, TaskCoordinator(pool, config, engine=wc.engine)


def test_each_result_in_a_batch_is_judged_on_its_own(
    pool: Any, engine_config: EngineConfig, dsn: str
) -> None:
    wc, tc = _start(pool, engine_config, 1)
    worker = uuid.uuid4()
    leased = tc.poll_tasks(worker, limit=10)
    assert len(leased) == 7
    good, stale, bad = leased[:5], leased[5], leased[6]
    results: list[tuple[uuid.UUID, int, Any]] = [
        (e.execution_id, e.fence_token, {"n": i}) for i, e in enumerate(good)
    ]
    results += [
        (stale.execution_id, stale.fence_token + 1, "late"),
        (bad.execution_id, bad.fence_token, {1, 2}),
    ]
    outcome = tc.complete_tasks(worker, results)
    assert all(isinstance(outcome[e.execution_id], TaskExecution) for e in good)
    assert all(outcome[e.execution_id].state is TaskState.COMPLETED for e in good)  # type: ignore[union-attr]
    assert isinstance(outcome[stale.execution_id], FencingError)
    assert isinstance(outcome[bad.execution_id], PayloadError)
    by_id = {t.execution_id: t for t in wc.list_tasks(leased[0].workflow_instance_id)}
    assert by_id[stale.execution_id].state is TaskState.RUNNING
    assert by_id[bad.execution_id].state is TaskState.RUNNING
    # a batch resent after an ambiguous commit is a no-op for what was already accepted
    again = tc.complete_tasks(worker, results[:5])
    assert [again[e.execution_id].state for e in good] == [TaskState.COMPLETED] * 5  # type: ignore[union-attr]
    events = [e.event_type for e in wc.get_history(leased[0].workflow_instance_id)]
    assert events.count("TASK_COMPLETED") == 5
    with psycopg.connect(dsn) as conn:
        assert check_invariants(conn).ok


def test_a_batch_stores_each_output_as_sent_and_no_output_for_a_failure(
    pool: Any, engine_config: EngineConfig, dsn: str
) -> None:
    # the batch travels as one JSON document that splices each output in as it is: an output that is
    # JSON null, a string with quotes and backslashes, and a nested document all come back as sent
    _, tc = _start(pool, engine_config, 1)
    worker = uuid.uuid4()
    leased = tc.poll_tasks(worker, limit=10)
    outputs: list[Any] = [None, 'say "hi" \\ bye', {"a": [1, 2.5, {"b": None}]}, "", 0, []]
    outcome = tc.complete_tasks(
        worker, [(e.execution_id, e.fence_token, o) for e, o in zip(leased, outputs, strict=False)]
    )
    assert [outcome[e.execution_id].output for e in leased[:6]] == outputs  # type: ignore[union-attr]
    failed = tc.fail_task(leased[6].execution_id, worker, leased[6].fence_token, "boom")
    assert failed.state is TaskState.FAILED
    with psycopg.connect(dsn) as conn:
        stored: dict[uuid.UUID, bool] = dict(
            conn.execute(
                "SELECT execution_id, output IS NULL FROM orchestrator.task_executions"
                " WHERE execution_id = ANY(%s)",
                ([e.execution_id for e in leased],),
            ).fetchall()
        )
    # JSON null is a value (jsonb 'null'); a failed attempt has no output at all (SQL NULL)
    assert [stored[e.execution_id] for e in leased] == [False] * 6 + [True]


def test_concurrent_batches_over_shared_instances_complete_everything(
    pool: Any, engine_config: EngineConfig, dsn: str
) -> None:
    wc, tc = _start(pool, engine_config, 12)
    workers = [uuid.uuid4() for _ in range(4)]
    leased: dict[uuid.UUID, list[TaskExecution]] = {w: [] for w in workers}
    while True:
        got = False
        for w in workers:
            batch = tc.poll_tasks(w, limit=7)
            leased[w] += batch
            got = got or bool(batch)
        if not got:
            break
    assert sum(len(v) for v in leased.values()) == 12 * 7
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def complete(w: uuid.UUID) -> None:
        # reversed order on odd workers: the coordinator must sort, or these batches would deadlock
        mine = leased[w][::-1] if workers.index(w) % 2 else leased[w]
        barrier.wait()
        try:
            out = tc.complete_tasks(w, [(e.execution_id, e.fence_token, None) for e in mine])
            assert all(isinstance(v, TaskExecution) for v in out.values())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=complete, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    instances = {e.workflow_instance_id for v in leased.values() for e in v}
    assert {wc.get_workflow(i).state for i in instances} == {WorkflowState.COMPLETED}
    with psycopg.connect(dsn) as conn:
        report = check_invariants(conn, require_finished=True)
    assert report.ok, report.violations


def test_renewing_leases_while_their_batch_completes_never_deadlocks(
    pool: Any, engine_config: EngineConfig
) -> None:
    # The Worker's heartbeat renews every lease it holds while its group completer finishes some of
    # them; both lock the same executions, and must do so in the same (instance, execution) order.
    _, tc = _start(pool, engine_config, 30)
    worker = uuid.uuid4()
    errors: list[BaseException] = []
    for _ in range(8):
        leased = tc.poll_tasks(worker, limit=30)
        if not leased:
            break
        ids = [e.execution_id for e in leased]
        stop = threading.Event()

        def renew(ids: list[uuid.UUID] = ids, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    tc.renew_leases(ids[::-1], worker)
                except BaseException as exc:  # a deadlock surfaces here as ConcurrencyConflictError
                    errors.append(exc)
                    return

        thread = threading.Thread(target=renew)
        thread.start()
        try:
            out = tc.complete_tasks(worker, [(e.execution_id, e.fence_token, None) for e in leased])
        finally:
            stop.set()
            thread.join(30)
        assert all(isinstance(v, TaskExecution) for v in out.values())
    assert not errors, errors
