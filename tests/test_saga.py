"""Specification of sagas: completed tasks are undone in reverse dependency order when a workflow gives up."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from uuid import UUID

import pytest
from helpers import (
    Pool,
    assert_history_valid,
    complete,
    drive,
    event_types,
    events_of,
    executions,
    fail,
    immediate_retry,
    new_worker,
    poll_all,
    poll_one,
    read_child_lease,
    reap,
    register,
    short_lease,
    single_attempt,
    snapshot,
    spawn_child_worker,
    start,
    states,
    wait_until_lapsed,
)

from orchestrator_engine import (
    EngineConfig,
    EventType,
    FencingError,
    InvalidStateError,
    RetryPolicy,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskKind,
    TaskNotFoundError,
    TaskState,
    WorkflowCoordinator,
    WorkflowState,
)

W = WorkflowState
T = TaskState
UNDO = TaskKind.COMPENSATION


#: after every test, each instance's history is replayed through the transition table
pytestmark = pytest.mark.usefixtures("every_history_follows_legal_edges")


def step(task_id: str, *deps: str, undo: bool = True, retry: RetryPolicy | None = None) -> TaskDefinition:
    """Return a task that is undone by ``undo_<task_id>`` unless ``undo`` is False."""
    return TaskDefinition(
        task_id,
        depends_on=deps,
        compensation=f"undo_{task_id}" if undo else None,
        retry=retry or single_attempt(),
    )


def run_until(tc: TaskCoordinator, worker: UUID, last: str) -> None:
    """Complete forward tasks one by one (output = task id in capitals) until ``last`` is done."""
    while True:
        held = poll_one(tc, worker)
        complete(tc, held, held.task_id.upper())
        if held.task_id == last:
            return


def compensation_trail(wc: WorkflowCoordinator, instance_id: UUID) -> list[tuple[str, str]]:
    """Return (event, task) for every compensation-task event, in history order."""
    return [
        (e.event_type.removeprefix("COMPENSATION_TASK_"), e.payload["task_id"])
        for e in wc.get_history(instance_id)
        if e.event_type.startswith("COMPENSATION_TASK_")
    ]


def undo_types(leased: list[TaskExecution]) -> list[str]:
    assert all(e.kind is UNDO for e in leased)
    return sorted(e.task_type for e in leased)


# -- automatic compensation ----------------------------------------------------------------------


def test_terminal_failure_in_a_chain_undoes_completed_tasks_in_reverse_order(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a"), step("b", "a"), step("c", "b")])
    instance = start(wc, "trip", {"trip": 1})
    worker = new_worker()
    run_until(tc, worker, "b")
    fail(tc, poll_one(tc, worker), "no seats")

    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATING
    assert states(wc, instance.instance_id, kind=UNDO) == {"a": "PENDING", "b": "READY"}
    undo_b = poll_all(tc, worker)
    assert undo_types(undo_b) == ["undo_b"]
    assert poll_all(tc, new_worker()) == [], "undo_a waits while undo_b is held"
    complete(tc, undo_b[0], "b undone")

    undo_a = poll_all(tc, worker)
    assert undo_types(undo_a) == ["undo_a"]
    complete(tc, undo_a[0], "a undone")

    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED
    history = assert_history_valid(wc, instance.instance_id)
    [started] = [e for e in history if e.event_type == "COMPENSATION_STARTED"]
    assert started.payload["cause"] == {"failed_task": "c"}
    assert started.payload["tasks"] == ["a", "b"]
    assert compensation_trail(wc, instance.instance_id) == [
        ("SCHEDULED", "b"),
        ("STARTED", "b"),
        ("COMPLETED", "b"),
        ("SCHEDULED", "a"),
        ("STARTED", "a"),
        ("COMPLETED", "a"),
    ]
    assert history[-1].event_type == "WORKFLOW_COMPENSATED"
    assert states(wc, instance.instance_id) == {"a": "COMPLETED", "b": "COMPLETED", "c": "FAILED"}


def test_diamond_undoes_both_branches_in_parallel_and_the_root_after_both(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(
        wc, "trip", [step("root"), step("left", "root"), step("right", "root"), step("join", "left", "right")]
    )
    instance = start(wc, "trip")
    worker = new_worker()
    complete(tc, poll_one(tc, worker))
    for held in poll_all(tc, worker):
        complete(tc, held)
    fail(tc, poll_one(tc, worker))

    first, second = poll_one(tc, new_worker()), poll_one(tc, new_worker())
    assert undo_types([first, second]) == ["undo_left", "undo_right"]
    assert poll_all(tc, worker) == []
    complete(tc, first)
    assert poll_all(tc, worker) == [], "the root waits for both branches"
    complete(tc, second)

    [root] = poll_all(tc, worker)
    assert undo_types([root]) == ["undo_root"]
    complete(tc, root)
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED


def test_tasks_without_a_compensation_are_skipped(wc: WorkflowCoordinator, tc: TaskCoordinator) -> None:
    register(wc, "trip", [step("a"), step("b", "a", undo=False), step("c", "b"), step("d", "c")])
    instance = start(wc, "trip")
    worker = new_worker()
    run_until(tc, worker, "c")
    fail(tc, poll_one(tc, worker))

    [started] = events_of(wc, instance.instance_id, EventType.COMPENSATION_STARTED)
    assert started.payload["tasks"] == ["a", "c"]
    undone = drive(tc, worker)
    assert [e.task_type for e in undone] == ["undo_c", "undo_a"]
    assert {e.task_id for e in executions(wc, instance.instance_id, kind=UNDO)} == {"a", "c"}
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED


def test_failure_after_only_uncompensable_tasks_completed_fails_the_workflow(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a", undo=False), step("b", "a")])
    instance = start(wc, "trip")
    worker = new_worker()
    complete(tc, poll_one(tc, worker))
    fail(tc, poll_one(tc, worker), "broken")

    assert wc.get_workflow(instance.instance_id).state is W.FAILED
    [failed] = events_of(wc, instance.instance_id, EventType.WORKFLOW_FAILED)
    assert failed.payload == {"failed_task": "b", "error": {"message": "broken"}}
    assert events_of(wc, instance.instance_id, EventType.COMPENSATION_STARTED) == []


def test_failure_before_any_task_completed_fails_the_workflow_without_compensating(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a"), step("b", "a")])
    instance = start(wc, "trip")
    fail(tc, poll_one(tc, new_worker()), "broken")

    assert wc.get_workflow(instance.instance_id).state is W.FAILED
    [failed] = events_of(wc, instance.instance_id, EventType.WORKFLOW_FAILED)
    assert failed.payload == {"failed_task": "a", "error": {"message": "broken"}}
    assert executions(wc, instance.instance_id, kind=UNDO) == []


def test_branch_still_leased_when_its_sibling_fails_is_fenced_and_not_undone(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("root"), step("left", "root"), step("right", "root")])
    instance = start(wc, "trip")
    worker = new_worker()
    complete(tc, poll_one(tc, worker))
    branches = {e.task_id: e for e in poll_all(tc, worker)}
    fail(tc, branches["left"])

    [started] = events_of(wc, instance.instance_id, EventType.COMPENSATION_STARTED)
    assert started.payload["cancelled_executions"] == 1
    assert states(wc, instance.instance_id)["right"] == "CANCELLED"
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(FencingError):
        complete(tc, branches["right"], "too late")
    assert snapshot(wc, instance.instance_id) == before

    assert [e.task_type for e in drive(tc, worker)] == ["undo_root"]
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED


def test_compensation_input_carries_the_original_task_id_input_and_output(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("book"), step("pay", "book")])
    start(wc, "trip", {"city": "Oslo"})
    worker = new_worker()
    complete(tc, poll_one(tc, worker), {"booking": 17})
    fail(tc, poll_one(tc, worker))

    undo = poll_one(tc, worker)
    assert undo.input == {
        "task_id": "book",
        "input": {"workflow": {"city": "Oslo"}, "dependencies": {}},
        "output": {"booking": 17},
    }


# -- manual compensation -------------------------------------------------------------------------


def test_manual_compensation_from_a_middle_task_fences_the_leased_later_task(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a"), step("b", "a"), step("c", "b"), step("d", "c")])
    instance = start(wc, "trip")
    worker = new_worker()
    run_until(tc, worker, "c")
    leased_d = poll_one(tc, worker)

    compensating = wc.trigger_compensation(instance.instance_id, "b")
    assert compensating.state is W.COMPENSATING
    [started] = events_of(wc, instance.instance_id, EventType.COMPENSATION_STARTED)
    assert started.payload["cause"] == {"trigger": "manual", "from_task": "b"}
    assert states(wc, instance.instance_id)["d"] == "CANCELLED"

    before = snapshot(wc, instance.instance_id)
    with pytest.raises(FencingError):
        complete(tc, leased_d, "D")
    assert snapshot(wc, instance.instance_id) == before

    assert [e.task_type for e in drive(tc, worker)] == ["undo_c", "undo_b", "undo_a"]
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED


def test_manual_compensation_of_an_unknown_task_raises_task_not_found(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a")])
    instance = start(wc, "trip")
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(TaskNotFoundError):
        wc.trigger_compensation(instance.instance_id, "nope")
    assert snapshot(wc, instance.instance_id) == before


def _compensating(wc: WorkflowCoordinator, tc: TaskCoordinator, instance_id: UUID) -> None:
    run_until(tc, new_worker(), "a")
    wc.trigger_compensation(instance_id, "a")


def _compensated(wc: WorkflowCoordinator, tc: TaskCoordinator, instance_id: UUID) -> None:
    _compensating(wc, tc, instance_id)
    drive(tc, new_worker())


def _cancelled(wc: WorkflowCoordinator, tc: TaskCoordinator, instance_id: UUID) -> None:
    wc.cancel_workflow(instance_id)


def _completed(wc: WorkflowCoordinator, tc: TaskCoordinator, instance_id: UUID) -> None:
    drive(tc, new_worker())


@pytest.mark.parametrize(
    ("state", "bring"),
    [
        ("COMPENSATING", _compensating),
        ("COMPENSATED", _compensated),
        ("CANCELLED", _cancelled),
        ("COMPLETED", _completed),
    ],
)
def test_manual_compensation_is_refused_once_a_workflow_is_finished_or_already_undoing(
    wc: WorkflowCoordinator,
    tc: TaskCoordinator,
    state: str,
    bring: Callable[[WorkflowCoordinator, TaskCoordinator, UUID], None],
) -> None:
    register(wc, "trip", [step("a"), step("b", "a")])
    instance = start(wc, "trip")
    bring(wc, tc, instance.instance_id)
    before = snapshot(wc, instance.instance_id)
    assert before.instance.state.value == state
    with pytest.raises(InvalidStateError):
        wc.trigger_compensation(instance.instance_id, "a")
    assert snapshot(wc, instance.instance_id) == before


def test_paused_workflow_can_be_compensated(wc: WorkflowCoordinator, tc: TaskCoordinator) -> None:
    register(wc, "trip", [step("a"), step("b", "a")])
    instance = start(wc, "trip")
    worker = new_worker()
    run_until(tc, worker, "a")
    wc.pause_workflow(instance.instance_id)
    wc.trigger_compensation(instance.instance_id, "b")
    assert [e.task_type for e in drive(tc, worker)] == ["undo_a"]
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED


def test_failed_workflow_keeps_late_results_and_can_then_be_compensated(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("hotel"), step("flight", undo=False)])
    instance = start(wc, "trip")
    worker = new_worker()
    leased = {e.task_id: e for e in poll_all(tc, worker)}
    fail(tc, leased["flight"])
    assert wc.get_workflow(instance.instance_id).state is W.FAILED

    complete(tc, leased["hotel"], "room 12")
    assert states(wc, instance.instance_id)["hotel"] == "COMPLETED"
    wc.trigger_compensation(instance.instance_id, "hotel")
    undone = drive(tc, worker)
    assert [(e.task_type, e.input["output"]) for e in undone] == [("undo_hotel", "room 12")]
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED


# -- failing compensations -----------------------------------------------------------------------


def test_compensation_that_fails_once_is_retried_under_the_original_task_policy(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a", retry=immediate_retry(2)), step("b", "a")])
    instance = start(wc, "trip")
    worker = new_worker()
    run_until(tc, worker, "a")
    fail(tc, poll_one(tc, worker))

    fail(tc, poll_one(tc, worker), "undo hiccup")
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATING
    retry = poll_one(tc, worker)
    assert (retry.kind, retry.task_type, retry.attempt_number) == (UNDO, "undo_a", 2)
    complete(tc, retry)

    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED
    assert compensation_trail(wc, instance.instance_id) == [
        ("SCHEDULED", "a"),
        ("STARTED", "a"),
        ("FAILED", "a"),
        ("RETRY_SCHEDULED", "a"),
        ("SCHEDULED", "a"),
        ("STARTED", "a"),
        ("COMPLETED", "a"),
    ]


def test_compensation_that_fails_terminally_fails_the_workflow_until_retry_task_resumes_it(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a"), step("b", "a"), step("c", "b")])
    instance = start(wc, "trip")
    worker = new_worker()
    run_until(tc, worker, "b")
    fail(tc, poll_one(tc, worker))
    fail(tc, poll_one(tc, worker), "cannot refund")

    assert wc.get_workflow(instance.instance_id).state is W.FAILED
    [failed] = events_of(wc, instance.instance_id, EventType.WORKFLOW_FAILED)
    assert failed.payload == {"compensation_failed": "b", "error": {"message": "cannot refund"}}
    assert states(wc, instance.instance_id, kind=UNDO) == {"a": "PENDING", "b": "FAILED"}
    assert poll_all(tc, worker) == []

    retried = tc.retry_task(instance.instance_id, "b")
    assert (retried.kind, retried.task_type, retried.attempt_number, retried.state) == (
        UNDO,
        "undo_b",
        2,
        T.READY,
    )
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATING
    [resumed] = events_of(wc, instance.instance_id, EventType.COMPENSATION_RESUMED)
    assert resumed.payload == {"retried_task": "b"}

    assert [e.task_type for e in drive(tc, worker)] == ["undo_b", "undo_a"]
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED
    assert event_types(assert_history_valid(wc, instance.instance_id))[-1] == "WORKFLOW_COMPENSATED"


def test_forward_task_cannot_be_retried_once_compensation_has_started(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a"), step("b", "a")])
    instance = start(wc, "trip")
    worker = new_worker()
    run_until(tc, worker, "a")
    fail(tc, poll_one(tc, worker))
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(InvalidStateError):
        tc.retry_task(instance.instance_id, "b")
    assert snapshot(wc, instance.instance_id) == before


def test_forward_task_cannot_be_retried_after_its_compensation_failed(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "trip", [step("a"), step("b", "a"), step("c", "b")])
    instance = start(wc, "trip")
    worker = new_worker()
    run_until(tc, worker, "b")
    fail(tc, poll_one(tc, worker))
    complete(tc, poll_one(tc, worker), "b undone")
    fail(tc, poll_one(tc, worker), "cannot undo a")
    assert wc.get_workflow(instance.instance_id).state is W.FAILED

    # b is already undone: running c now would complete a workflow whose effects are half rolled back
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(InvalidStateError):
        tc.retry_task(instance.instance_id, "c")
    assert snapshot(wc, instance.instance_id) == before


@pytest.mark.slow
def test_compensation_held_by_a_killed_worker_is_finished_by_another(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig, dsn: str
) -> None:
    stc = TaskCoordinator(pool, short_lease(engine_config))
    # a lapse counts as an attempt, so the undo needs a second one for the survivor
    register(wc, "trip", [step("a", retry=immediate_retry(2)), step("b", "a")], namespace="killed")
    instance = start(wc, "trip", namespace="killed")
    worker = new_worker()
    complete(stc, poll_one(stc, worker, namespace="killed"), "A")
    fail(stc, poll_one(stc, worker, namespace="killed"))

    child = spawn_child_worker(dsn, "killed")
    try:
        held = read_child_lease(child)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        reap(child)
    assert child.returncode == -signal.SIGKILL

    wait_until_lapsed(pool, engine_config, held.execution_id)
    taken = poll_one(stc, worker, namespace="killed")
    assert (taken.execution_id, taken.kind) == (held.execution_id, UNDO)
    assert taken.fence_token > held.fence_token
    complete(stc, taken, "undone by the survivor")
    assert wc.get_workflow(instance.instance_id).state is W.COMPENSATED
    [undo] = executions(wc, instance.instance_id, kind=UNDO)
    assert (undo.state, undo.output) == (T.COMPLETED, "undone by the survivor")
