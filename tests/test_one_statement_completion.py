"""Completing forward tasks of running workflows: one statement and one round trip, same records.

The statement (task_complete_many) does what the general path does in a transaction of three
statements; these tests pin the round trips, compare what both paths write, and cover the workflows
it leaves to the general path: one with a compensation in the batch, and one changed while the
statement waited for the workflow's lock (its snapshot is then older than the lock).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from helpers import (
    NAMESPACE,
    Pool,
    assert_history_valid,
    chain,
    complete,
    fail,
    new_worker,
    poll_all,
    poll_one,
    query,
    register,
    single_attempt,
    start,
    wait_for,
)
from psycopg.pq import Trace

from orchestrator_engine import (
    EngineConfig,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskState,
    WorkflowCoordinator,
    WorkflowState,
    create_pool,
)
from orchestrator_engine.check import check_invariants

pytestmark = pytest.mark.usefixtures("every_history_follows_legal_edges")


@pytest.fixture
def one_conn(engine_config: EngineConfig) -> Iterator[Pool]:
    """A pool of one connection, so every statement the coordinators send goes through it."""
    opened = create_pool(engine_config, min_size=1, max_size=1)
    try:
        yield opened
    finally:
        opened.close()


def _coordinators(pool: Pool, config: EngineConfig) -> tuple[WorkflowCoordinator, TaskCoordinator]:
    wc = WorkflowCoordinator(pool, config)
    return wc, TaskCoordinator(pool, config, engine=wc.engine)


def _diamond(wc: WorkflowCoordinator, name: str, top: str, left: str, right: str, bottom: str) -> None:
    """Register ``top`` -> ``left`` and ``right`` -> ``bottom``."""
    register(
        wc,
        name,
        [
            TaskDefinition(top),
            TaskDefinition(left, depends_on=[top]),
            TaskDefinition(right, depends_on=[top]),
            TaskDefinition(bottom, depends_on=[left, right]),
        ],
    )


def complete_in(
    tc: TaskCoordinator, host: psycopg.Connection[Any], execution: TaskExecution, output: Any
) -> None:
    """Complete ``execution`` inside the host's transaction (the general path, holding the lock)."""
    assert execution.lease_holder is not None
    tc.complete_task(execution.execution_id, execution.lease_holder, execution.fence_token, output, conn=host)


def _lock_waits(watch: psycopg.Connection[Any]) -> int:
    """Count the sessions of this database that wait for a lock."""
    row = watch.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    ).fetchone()
    return 0 if row is None else int(row[0])


def _while_it_waits(
    dsn: str, hold: Callable[[psycopg.Connection[Any]], object], waiter: Callable[[], object]
) -> None:
    """Run ``hold`` in a host transaction, run ``waiter`` in a thread until it waits for a lock, then
    commit the host's transaction and let ``waiter`` finish; fail with what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            waiter()
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    with psycopg.connect(dsn) as host:
        host.execute("SELECT 1")  # opens the host's transaction: what ``hold`` does is part of it
        hold(host)
        thread = threading.Thread(target=run)
        thread.start()
        with psycopg.connect(dsn, autocommit=True) as watch:
            wait_for("the completion to wait for the workflow's lock", lambda: _lock_waits(watch) > 0)
        host.commit()
    thread.join(30)
    assert not thread.is_alive()
    assert not errors, errors


@pytest.fixture
def general_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of each batch of results recorded by the general path (``_finish_in``)."""
    calls: list[int] = []
    finish_in = TaskCoordinator._finish_in

    def spy(self: TaskCoordinator, c: Any, wid: UUID, results: Any) -> Any:
        calls.append(len(results))
        return finish_in(self, c, wid, results)

    monkeypatch.setattr(TaskCoordinator, "_finish_in", spy)
    return calls


@contextmanager
def round_trips(pool: Pool) -> Iterator[list[int]]:
    """Count the round trips that run a statement (the server's ReadyForQuery messages) on ``pool``'s
    one connection.

    A hot statement's preparation, once per connection (see PREPARED_AT_ONCE), is a round trip of its
    own, answered by ParseComplete alone: not counted. psycopg's default costs the same trip, at a
    connection's sixth run of the statement instead of its first.
    """
    fd, path = tempfile.mkstemp()
    with pool.connection() as conn:
        conn.pgconn.trace(fd)  # libpq owns the stream from here on
        conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
    counted: list[int] = []
    try:
        yield counted
    finally:
        with pool.connection() as conn:
            conn.pgconn.untrace()  # flushes the stream
        lines = Path(path).read_text().splitlines()
        Path(path).unlink()
        answers = [line.split("\t")[2] for line in lines if line.startswith("B\t")]
        ran = [a for i, a in enumerate(answers) if a == "ReadyForQuery" and answers[i - 1] != "ParseComplete"]
        counted.append(len(ran))


def _events(pool: Pool, config: EngineConfig, instance_id: UUID) -> list[tuple[Any, ...]]:
    """The instance's events as the engine wrote them, instance and execution ids replaced by names."""
    rows = query(
        pool,
        config,
        "SELECT sequence_number, event_type, payload, idempotency_key FROM {}.events"
        " WHERE workflow_instance_id = %s ORDER BY sequence_number",
        instance_id,
    )
    names = {str(instance_id): "I"}
    for row in query(
        pool,
        config,
        "SELECT execution_id, task_id FROM {}.task_executions WHERE workflow_instance_id = %s",
        instance_id,
    ):
        names[str(row["execution_id"])] = f"<{row['task_id']}>"
    out = []
    for row in rows:
        key = row["idempotency_key"]
        payload = dict(row["payload"])
        for raw, name in names.items():
            key = key.replace(raw, name)
        for field in ("execution_id", "worker_id", "run_id"):
            if field in payload:
                payload[field] = names.get(payload[field], field)
        out.append((row["sequence_number"], row["event_type"], payload, key))
    return out


def test_completing_a_forward_task_of_a_running_workflow_is_one_round_trip(
    one_conn: Pool, engine_config: EngineConfig
) -> None:
    wc, tc = _coordinators(one_conn, engine_config)
    register(wc, "pair", chain("a", "b"))
    instance = start(wc, "pair", {"order": 7})
    worker = new_worker()
    a = poll_one(tc, worker)
    with round_trips(one_conn) as trips:
        done = tc.complete_task(a.execution_id, worker, a.fence_token, {"paid": True})
    assert trips == [1]
    assert done.state is TaskState.COMPLETED
    assert done.output == {"paid": True}
    b = poll_one(tc, worker)
    assert b.task_id == "b"
    assert b.input == {"workflow": {"order": 7}, "dependencies": {"a": {"paid": True}}}
    with round_trips(one_conn) as trips:
        complete(tc, b, "shipped")
    assert trips == [1]
    finished = wc.get_workflow(instance.instance_id)
    assert finished.state is WorkflowState.COMPLETED
    assert finished.output == {"a": {"paid": True}, "b": "shipped"}
    assert [e.event_type for e in assert_history_valid(wc, instance.instance_id)] == [
        "WORKFLOW_STARTED",
        "TASK_SCHEDULED",
        "TASK_STARTED",
        "TASK_COMPLETED",
        "TASK_SCHEDULED",
        "TASK_STARTED",
        "TASK_COMPLETED",
        "WORKFLOW_COMPLETED",
    ]


def test_a_batch_of_completions_across_workflows_is_one_round_trip(
    one_conn: Pool, engine_config: EngineConfig, dsn: str
) -> None:
    wc, tc = _coordinators(one_conn, engine_config)
    register(wc, "single", [TaskDefinition("t")])
    register(wc, "pair", chain("a", "b"))
    singles = [start(wc, "single", i) for i in range(20)]
    pairs = [start(wc, "pair", i) for i in range(5)]
    worker = new_worker()
    leased = poll_all(tc, worker)
    assert len(leased) == 25
    with round_trips(one_conn) as trips:
        outcome = tc.complete_tasks(worker, [(e.execution_id, e.fence_token, e.task_id) for e in leased])
    assert trips == [1]
    assert all(isinstance(v, TaskExecution) and v.state is TaskState.COMPLETED for v in outcome.values())
    assert {wc.get_workflow(i.instance_id).state for i in singles} == {WorkflowState.COMPLETED}
    assert {wc.get_workflow(i.instance_id).state for i in pairs} == {WorkflowState.RUNNING}
    following = poll_all(tc, worker)
    assert sorted(e.task_id for e in following) == ["b"] * 5
    assert all(e.input["dependencies"] == {"a": "a"} for e in following)
    with psycopg.connect(dsn) as conn:
        assert check_invariants(conn).ok


def test_the_workers_group_commit_is_answered_with_ids_and_writes_the_same(
    one_conn: Pool, engine_config: EngineConfig, dsn: str
) -> None:
    # the worker's batch (whole=False) gets each accepted result's id only, not its whole row; what it
    # writes is what complete_tasks writes: the same states, outputs, inputs and events
    wc, tc = _coordinators(one_conn, engine_config)
    register(wc, "pair", chain("a", "b"))
    histories = []
    for whole in (True, False):
        instances = [start(wc, "pair", {"n": i}) for i in range(3)]
        worker = new_worker()
        for step in ("a", "b"):
            leased = poll_all(tc, worker)
            assert sorted(e.task_id for e in leased) == [step] * 3
            results = [(e.execution_id, e.fence_token, {"did": e.task_id}) for e in leased]
            with round_trips(one_conn) as trips:
                outcome = tc._complete_batch(worker, results, whole=whole)
            assert trips == [1]
            assert set(outcome) == {e.execution_id for e in leased}
            for eid, row in outcome.items():
                assert not isinstance(row, Exception)
                assert row["execution_id"] == eid
                assert ("input" in row) is whole, sorted(row)
        finished = [wc.get_workflow(i.instance_id) for i in instances]
        assert {w.state for w in finished} == {WorkflowState.COMPLETED}
        assert [w.output for w in finished] == [{"a": {"did": "a"}, "b": {"did": "b"}}] * 3
        histories.append([_events(one_conn, engine_config, i.instance_id) for i in instances])
    assert histories[0] == histories[1]
    with psycopg.connect(dsn) as conn:
        assert check_invariants(conn).ok


def test_one_statement_writes_what_the_general_path_writes(pool: Pool, engine_config: EngineConfig) -> None:
    # the same diamond run twice: completed one statement each, and inside a host transaction, which
    # takes the general path (three statements): the events, inputs and output must be the same
    wc, tc = _coordinators(pool, engine_config)
    _diamond(wc, "diamond", "a", "b", "c", "d")
    runs = []
    for in_host_transaction in (False, True):
        instance = start(wc, "diamond", {"n": 1})
        worker = new_worker()
        while True:
            leased = poll_all(tc, worker)
            if not leased:
                break
            for e in sorted(leased, key=lambda e: e.task_id):
                output = {"from": e.task_id, "saw": sorted(e.input["dependencies"])}
                if in_host_transaction:
                    with psycopg.connect(engine_config.dsn) as conn:
                        tc.complete_task(e.execution_id, worker, e.fence_token, output, conn=conn)
                else:
                    tc.complete_task(e.execution_id, worker, e.fence_token, output)
        final = wc.get_workflow(instance.instance_id)
        assert final.state is WorkflowState.COMPLETED
        runs.append((final.output, _events(pool, engine_config, instance.instance_id)))
    # siblings made READY together may be scheduled in either order; everything else is the same
    (fast_output, fast), (general_output, general) = runs
    assert fast_output == general_output
    assert [e[:2] for e in fast] == [e[:2] for e in general]
    assert sorted(repr(e[1:]) for e in fast) == sorted(repr(e[1:]) for e in general)
    assert fast_output["d"] == {"from": "d", "saw": ["b", "c"]}


def test_a_batch_with_a_compensation_is_recorded_by_the_general_path(
    pool: Pool, engine_config: EngineConfig, dsn: str
) -> None:
    wc, tc = _coordinators(pool, engine_config)
    register(
        wc,
        "trip",
        [
            TaskDefinition("a", compensation="undo_a", retry=single_attempt()),
            TaskDefinition("b", depends_on=["a"], retry=single_attempt()),
        ],
    )
    register(wc, "single", [TaskDefinition("t")])
    undoing = start(wc, "trip")
    worker = new_worker()
    complete(tc, poll_one(tc, worker), "A")
    fail(tc, poll_one(tc, worker), "no seats")
    assert wc.get_workflow(undoing.instance_id).state is WorkflowState.COMPENSATING
    running = start(wc, "single")
    leased = poll_all(tc, worker)
    assert sorted(e.kind.value for e in leased) == ["COMPENSATION", "FORWARD"]
    outcome = tc.complete_tasks(worker, [(e.execution_id, e.fence_token, "done") for e in leased])
    assert all(isinstance(v, TaskExecution) and v.state is TaskState.COMPLETED for v in outcome.values())
    assert wc.get_workflow(undoing.instance_id).state is WorkflowState.COMPENSATED
    assert wc.get_workflow(running.instance_id).state is WorkflowState.COMPLETED
    history = [e.event_type for e in assert_history_valid(wc, undoing.instance_id)]
    assert history[-2:] == ["COMPENSATION_TASK_COMPLETED", "WORKFLOW_COMPENSATED"]
    assert [e.event_type for e in assert_history_valid(wc, running.instance_id)][-2:] == [
        "TASK_COMPLETED",
        "WORKFLOW_COMPLETED",
    ]
    with psycopg.connect(dsn) as conn:
        assert check_invariants(conn).ok


def test_a_completion_that_waited_for_the_workflow_lock_sees_what_committed_meanwhile(
    pool: Pool, engine_config: EngineConfig, dsn: str
) -> None:
    # p1 and p2 both feed the join. p1's completion holds the workflow's lock in a host transaction
    # while p2's one-statement completion waits for it: that statement's snapshot was taken before
    # p1 committed, so read from it alone the join would become READY without p1's output. The same
    # batch completes another workflow's task, which the statement records itself
    wc, tc = _coordinators(pool, engine_config)
    _diamond(wc, "fan", "split", "p1", "p2", "join")
    register(wc, "single", [TaskDefinition("t")])
    instance = start(wc, "fan")
    worker = new_worker()
    complete(tc, poll_one(tc, worker), "S")
    parts = {e.task_id: e for e in poll_all(tc, worker)}
    assert sorted(parts) == ["p1", "p2"]
    other = start(wc, "single")
    [solo] = poll_all(tc, worker)

    def complete_p2_and_solo() -> None:
        batch = [(e.execution_id, e.fence_token, e.task_id.upper()) for e in (parts["p2"], solo)]
        outcome = tc.complete_tasks(worker, batch)
        assert all(isinstance(v, TaskExecution) for v in outcome.values()), outcome

    _while_it_waits(
        dsn,
        lambda host: complete_in(tc, host, parts["p1"], "P1"),
        complete_p2_and_solo,
    )
    join = poll_one(tc, worker)
    assert join.task_id == "join"
    assert join.input["dependencies"] == {"p1": "P1", "p2": "P2"}
    complete(tc, join, "J")
    final = wc.get_workflow(instance.instance_id)
    assert final.state is WorkflowState.COMPLETED
    assert final.output == {"split": "S", "p1": "P1", "p2": "P2", "join": "J"}
    scheduled = [
        e for e in assert_history_valid(wc, instance.instance_id) if e.event_type == "TASK_SCHEDULED"
    ]
    assert [e.payload["task_id"] for e in scheduled].count("join") == 1
    assert wc.get_workflow(other.instance_id).output == {"t": "T"}
    with psycopg.connect(dsn) as conn:
        assert check_invariants(conn).ok


def test_a_poll_that_commits_while_the_statement_waits_leaves_it_one_statement(
    pool: Pool, engine_config: EngineConfig, dsn: str, general_path: list[int]
) -> None:
    # a poll that leases one part holds the workflow's lock while the other part's completion waits
    # for it; the poll changes nothing the statement reads (a READY row becomes RUNNING, the sequence
    # moves), so the statement records the part itself instead of leaving it to the general path
    wc, tc = _coordinators(pool, engine_config)
    _diamond(wc, "fan", "split", "p1", "p2", "join")
    instance = start(wc, "fan")
    worker, poller = new_worker(), new_worker()
    complete(tc, poll_one(tc, worker), "S")
    [p1] = tc.poll_tasks(worker, namespace=NAMESPACE, limit=1)
    leased: list[dict[str, Any]] = []

    def poll_the_other(host: psycopg.Connection[Any]) -> None:
        names, rows = tc.engine.repos.executions.task_poll_and_lease(
            host, worker_id=poller, namespace=NAMESPACE, task_types=None, limit=1, lease=timedelta(seconds=30)
        )
        leased.extend(dict(zip(names, row, strict=True)) for row in rows)

    _while_it_waits(dsn, poll_the_other, lambda: complete(tc, p1, p1.task_id.upper()))
    [p2] = leased
    assert {p1.task_id, p2["task_id"]} == {"p1", "p2"}
    assert general_path == []
    tc.complete_task(p2["execution_id"], poller, p2["fence_token"], p2["task_id"].upper())
    join = poll_one(tc, worker)
    assert join.input["dependencies"] == {"p1": "P1", "p2": "P2"}
    complete(tc, join, "J")
    assert wc.get_workflow(instance.instance_id).output == {"split": "S", "p1": "P1", "p2": "P2", "join": "J"}
    with psycopg.connect(dsn) as conn:
        assert check_invariants(conn).ok


def test_a_stale_snapshot_that_releases_nothing_is_still_one_statement(
    pool: Pool, engine_config: EngineConfig, dsn: str, general_path: list[int]
) -> None:
    # three parts feed the join; one completes in a host transaction while a second one's statement
    # waits for the workflow's lock. That statement's snapshot is behind, but it makes nothing READY
    # and completes no workflow, so it reads nothing from the snapshot and records the part itself;
    # the third part's completion then builds the join's input from all three
    wc, tc = _coordinators(pool, engine_config)
    register(
        wc,
        "fan3",
        [
            TaskDefinition("split"),
            *(TaskDefinition(f"p{i}", depends_on=["split"]) for i in (1, 2, 3)),
            TaskDefinition("join", depends_on=["p1", "p2", "p3"]),
        ],
    )
    instance = start(wc, "fan3")
    worker = new_worker()
    complete(tc, poll_one(tc, worker), "S")
    parts = {e.task_id: e for e in poll_all(tc, worker)}

    def complete_p1(host: psycopg.Connection[Any]) -> None:
        complete_in(tc, host, parts["p1"], "P1")
        general_path.clear()  # a completion in a host's transaction always takes the general path

    _while_it_waits(dsn, complete_p1, lambda: complete(tc, parts["p2"], "P2"))
    assert general_path == []
    complete(tc, parts["p3"], "P3")
    assert general_path == []
    join = poll_one(tc, worker)
    assert join.input["dependencies"] == {"p1": "P1", "p2": "P2", "p3": "P3"}
    complete(tc, join, "J")
    final = wc.get_workflow(instance.instance_id)
    assert final.output == {"split": "S", "p1": "P1", "p2": "P2", "p3": "P3", "join": "J"}
    with psycopg.connect(dsn) as conn:
        assert check_invariants(conn).ok


def test_a_retry_that_revives_the_workflow_while_a_completion_waits_does_not_break_it(
    pool: Pool, engine_config: EngineConfig, dsn: str
) -> None:
    # a failed for good, so the workflow FAILED while b still ran; retry_task moves it back to
    # RUNNING while b's completion waits for the workflow's lock. The row that completion's update
    # scans is the FAILED one of its snapshot, and the row it builds from it is checked against the
    # constraints before the newest is fetched: built from the scanned state, it broke
    # ck_workflow_instances_finished_at
    wc, tc = _coordinators(pool, engine_config)
    register(
        wc,
        "pair",
        [TaskDefinition("a", retry=single_attempt()), TaskDefinition("b", retry=single_attempt())],
    )
    instance = start(wc, "pair")
    worker = new_worker()
    held = {e.task_id: e for e in poll_all(tc, worker)}
    fail(tc, held["a"], "no stock")
    assert wc.get_workflow(instance.instance_id).state is WorkflowState.FAILED
    _while_it_waits(
        dsn,
        lambda host: tc.retry_task(instance.instance_id, "a", conn=host),
        lambda: complete(tc, held["b"], "B"),
    )
    assert wc.get_workflow(instance.instance_id).state is WorkflowState.RUNNING
    again = poll_one(tc, worker)
    assert again.task_id == "a"
    complete(tc, again, "A")
    final = wc.get_workflow(instance.instance_id)
    assert final.state is WorkflowState.COMPLETED
    assert final.output == {"a": "A", "b": "B"}
    with psycopg.connect(dsn) as conn:
        assert check_invariants(conn).ok
