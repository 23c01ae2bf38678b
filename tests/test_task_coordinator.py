"""Specification of TaskCoordinator: leases, fencing, retries with backoff, lapses, timeouts and DAG order."""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from helpers import (
    EXIT_FENCED,
    NAMESPACE,
    Pool,
    acquire_when_ready,
    assert_history_valid,
    chain,
    complete,
    drain_concurrently,
    event_types,
    events_of,
    executions,
    fail,
    immediate_retry,
    latest,
    lease_row,
    new_worker,
    poll_all,
    poll_one,
    query,
    raw_execution,
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
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskNotFoundError,
    TaskState,
    WorkflowCoordinator,
    WorkflowState,
    create_pool,
)

W = WorkflowState
T = TaskState


@pytest.fixture
def stc(pool: Pool, engine_config: EngineConfig) -> TaskCoordinator:
    """Return a TaskCoordinator whose leases are short enough to outwait."""
    return TaskCoordinator(pool, short_lease(engine_config))


#: after every test, each instance's history is replayed through the transition table
pytestmark = pytest.mark.usefixtures("every_history_follows_legal_edges")


def started_tokens(wc: WorkflowCoordinator, execution: TaskExecution) -> list[int]:
    """Return the fence tokens of every TASK_STARTED event of one execution, in history order."""
    return [
        e.payload["fence_token"]
        for e in events_of(wc, execution.workflow_instance_id, EventType.TASK_STARTED)
        if e.payload["execution_id"] == str(execution.execution_id)
    ]


# -- handing out work ----------------------------------------------------------------------------


def test_each_of_500_ready_executions_is_handed_out_exactly_once_to_8_concurrent_workers(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    wc.start_workflows([StartWorkflowRequest(NAMESPACE, "single", f"run-{i}") for i in range(500)])

    drained = drain_concurrently(tc, workers=8, expected=500, limit=3)

    assert [repr(e) for e in drained.errors] == []
    assert len(drained.execution_ids) == 500
    assert len(set(drained.execution_ids)) == 500, "an execution was handed out twice"
    assert tc.poll_tasks(new_worker(), limit=1000) == []
    rows = query(pool, engine_config, "SELECT execution_id, state, lease_holder FROM {}.task_executions")
    assert {r["execution_id"]: (r["state"], r["lease_holder"]) for r in rows} == {
        e.execution_id: ("RUNNING", worker) for worker, got in drained.leased.items() for e in got
    }
    [started] = query(
        pool, engine_config, "SELECT count(*) AS n FROM {}.events WHERE event_type = 'TASK_STARTED'"
    )
    assert started["n"] == 500


def test_each_branch_of_a_wide_fan_out_is_handed_out_exactly_once_to_8_concurrent_workers(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    # unlike separate instances, every poll here contends for one instance row and its sequence number
    branches = 1000
    register(wc, "wide", [TaskDefinition(f"b{i:04}") for i in range(branches)])
    instance = start(wc, "wide")

    drained = drain_concurrently(tc, workers=8, expected=branches, limit=4)

    assert [repr(e) for e in drained.errors] == []
    assert len(drained.execution_ids) == branches
    assert len(set(drained.execution_ids)) == branches, "an execution was handed out twice"
    history = assert_history_valid(wc, instance.instance_id)
    assert event_types(history).count("TASK_STARTED") == branches


def test_acquire_task_leases_a_ready_execution_and_records_the_holder(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    instance = start(wc, "single")
    [ready] = wc.list_tasks(instance.instance_id)
    worker = new_worker()

    leased = tc.acquire_task(ready.execution_id, worker)
    assert leased is not None
    assert (leased.state, leased.lease_holder, leased.fence_token) == (T.RUNNING, worker, 1)
    assert leased.lease_expires_at is not None
    lease = lease_row(pool, engine_config, ready.execution_id)
    assert lease is not None
    assert (lease["holder_id"], lease["fence_token"]) == (worker, 1)
    [event] = events_of(wc, instance.instance_id, EventType.TASK_STARTED)
    assert event.payload["worker_id"] == str(worker)
    assert event.payload["fence_token"] == 1


def test_acquire_task_returns_none_for_unknown_held_finished_waiting_cancelled_or_paused_executions(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", [*chain("a", "b"), TaskDefinition("c")])
    worker, rival = new_worker(), new_worker()
    assert tc.acquire_task(uuid.uuid4(), worker) is None

    busy = start(wc, "shop")
    [held] = tc.poll_tasks(rival, task_types=["a"])
    finished = tc.acquire_task(latest(wc, busy.instance_id, "c").execution_id, rival)
    assert finished is not None
    complete(tc, finished, "done")
    waiting = latest(wc, busy.instance_id, "b")
    before = snapshot(wc, busy.instance_id)
    assert tc.acquire_task(held.execution_id, worker) is None
    assert tc.acquire_task(finished.execution_id, worker) is None
    assert tc.acquire_task(waiting.execution_id, worker) is None
    after = snapshot(wc, busy.instance_id)
    # a refused acquire may touch updated_at, but it writes no event and moves nothing
    assert (after.executions, after.history_length) == (before.executions, before.history_length)
    assert after.instance.sequence_number == before.instance.sequence_number

    paused = start(wc, "shop")
    wc.pause_workflow(paused.instance_id)
    assert tc.acquire_task(latest(wc, paused.instance_id, "a").execution_id, worker) is None

    cancelled = start(wc, "shop")
    wc.cancel_workflow(cancelled.instance_id)
    assert tc.acquire_task(latest(wc, cancelled.instance_id, "a").execution_id, worker) is None


def test_poll_hands_out_only_the_requested_namespace_and_task_types(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    notify = [TaskDefinition("mail", task_type="email"), TaskDefinition("text", task_type="sms")]
    register(wc, "notify", notify, namespace="alpha")
    register(wc, "notify", notify, namespace="beta")
    start(wc, "notify", namespace="alpha")
    start(wc, "notify", namespace="beta")
    worker = new_worker()

    def taken(**filters: Any) -> list[tuple[str, str]]:
        return sorted((e.namespace, e.task_type) for e in tc.poll_tasks(worker, limit=10, **filters))

    assert taken(namespace="beta", task_types=["sms"]) == [("beta", "sms")]
    assert taken(namespace="beta") == [("beta", "email")]
    assert taken(task_types=["email"]) == [("alpha", "email")]
    assert taken(namespace="gamma") == []
    assert taken() == [("alpha", "sms")]


@pytest.mark.parametrize("limit", [0, -1, 1001, True])
def test_poll_limit_must_be_between_1_and_1000(tc: TaskCoordinator, limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        tc.poll_tasks(new_worker(), limit=limit)


# -- leases and fencing --------------------------------------------------------------------------


def test_worker_that_stops_renewing_loses_its_task_to_another_worker_with_a_higher_fence(
    wc: WorkflowCoordinator, stc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    instance = start(wc, "single")
    stale, fresh = new_worker(), new_worker()
    first = poll_one(stc, stale)
    wait_until_lapsed(pool, engine_config, first.execution_id)

    second = poll_one(stc, fresh)
    assert second.execution_id == first.execution_id
    assert second.lease_holder == fresh
    assert second.fence_token > first.fence_token

    before = snapshot(wc, instance.instance_id)
    with pytest.raises(FencingError) as caught:
        complete(stc, first, "from the stale worker")
    assert (caught.value.execution_id, caught.value.fence_token) == (first.execution_id, first.fence_token)
    assert snapshot(wc, instance.instance_id) == before

    complete(stc, second, "from the new holder")
    finished = wc.get_workflow(instance.instance_id)
    assert (finished.state, finished.output) == (W.COMPLETED, {"work": "from the new holder"})
    [expired] = events_of(wc, instance.instance_id, EventType.TASK_LEASE_EXPIRED)
    assert expired.payload["worker_id"] == str(stale)
    assert expired.payload["fence_token"] == first.fence_token


def test_fence_tokens_strictly_increase_with_every_grant_of_an_execution(
    wc: WorkflowCoordinator, stc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry(5))])
    instance = start(wc, "single")
    workers = [new_worker() for _ in range(3)]

    grants = [poll_one(stc, workers[0])]
    for worker in workers[1:]:
        wait_until_lapsed(pool, engine_config, grants[-1].execution_id)
        # the same execution comes back through both doors: a targeted acquire and a poll
        if len(grants) == 1:
            again = stc.acquire_task(grants[-1].execution_id, worker)
            assert again is not None
        else:
            again = poll_one(stc, worker)
        grants.append(again)
        lease = lease_row(pool, engine_config, again.execution_id)
        assert lease is not None
        assert (lease["holder_id"], lease["fence_token"]) == (worker, again.fence_token)

    assert len({g.execution_id for g in grants}) == 1
    tokens = [g.fence_token for g in grants]
    assert tokens == sorted(set(tokens)), f"tokens {tokens} are not strictly increasing"
    assert started_tokens(wc, grants[0]) == tokens
    complete(stc, grants[-1], "last holder")
    assert wc.get_workflow(instance.instance_id).state is W.COMPLETED


@pytest.mark.slow
def test_stale_worker_in_a_suspended_process_is_fenced_after_it_resumes(
    wc: WorkflowCoordinator, stc: TaskCoordinator, pool: Pool, engine_config: EngineConfig, dsn: str
) -> None:
    register(wc, "single", [TaskDefinition("work")], namespace="suspended")
    instance = start(wc, "single", namespace="suspended")
    child = spawn_child_worker(dsn, "suspended")
    try:
        stale = read_child_lease(child)
        os.kill(child.pid, signal.SIGSTOP)
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)

        wait_until_lapsed(pool, engine_config, stale.execution_id)
        taker = poll_one(stc, new_worker(), namespace="suspended")
        assert taker.execution_id == stale.execution_id
        assert taker.fence_token > stale.fence_token
        complete(stc, taker, {"by": "taker"})

        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=60)
    finally:
        reap(child)

    assert (child.returncode, out.strip().splitlines()[-1:]) == (EXIT_FENCED, ["FENCED"]), err
    finished = wc.get_workflow(instance.instance_id)
    assert (finished.state, finished.output) == (W.COMPLETED, {"work": {"by": "taker"}})
    assert event_types(events_of(wc, instance.instance_id, EventType.TASK_COMPLETED)) == ["TASK_COMPLETED"]


@pytest.mark.parametrize("outcome", ["complete", "fail"])
def test_result_from_a_worker_that_does_not_hold_the_lease_is_refused_and_changes_nothing(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool, engine_config: EngineConfig, outcome: str
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry())])
    instance = start(wc, "single")
    held = poll_one(tc, new_worker())
    before = snapshot(wc, instance.instance_id)
    lease_before = lease_row(pool, engine_config, held.execution_id)

    report = tc.complete_task if outcome == "complete" else tc.fail_task
    with pytest.raises(FencingError):
        report(held.execution_id, new_worker(), held.fence_token, "intruder")
    assert snapshot(wc, instance.instance_id) == before
    assert lease_row(pool, engine_config, held.execution_id) == lease_before


@pytest.mark.parametrize("outcome", ["complete", "fail"])
def test_result_with_a_token_newer_than_the_lease_is_refused_and_changes_nothing(
    wc: WorkflowCoordinator, tc: TaskCoordinator, outcome: str
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry())])
    instance = start(wc, "single")
    held = poll_one(tc, new_worker())
    before = snapshot(wc, instance.instance_id)

    report = tc.complete_task if outcome == "complete" else tc.fail_task
    assert held.lease_holder is not None
    with pytest.raises(FencingError):
        report(held.execution_id, held.lease_holder, held.fence_token + 1, "from the future")
    assert snapshot(wc, instance.instance_id) == before


@pytest.mark.parametrize("outcome", ["complete", "fail"])
def test_result_with_an_older_token_of_the_same_worker_is_refused_and_changes_nothing(
    wc: WorkflowCoordinator, stc: TaskCoordinator, pool: Pool, engine_config: EngineConfig, outcome: str
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry())])
    instance = start(wc, "single")
    worker = new_worker()
    old = poll_one(stc, worker)
    wait_until_lapsed(pool, engine_config, old.execution_id)
    current = poll_one(stc, worker)
    assert current.fence_token > old.fence_token
    before = snapshot(wc, instance.instance_id)

    report = stc.complete_task if outcome == "complete" else stc.fail_task
    with pytest.raises(FencingError):
        report(old.execution_id, worker, old.fence_token, "from the past")
    assert snapshot(wc, instance.instance_id) == before


def test_repeating_an_accepted_complete_is_a_no_op(wc: WorkflowCoordinator, tc: TaskCoordinator) -> None:
    register(wc, "shop", chain("a", "b"))
    instance = start(wc, "shop")
    a = poll_one(tc, new_worker())
    first = complete(tc, a, {"n": 1})
    before = snapshot(wc, instance.instance_id)

    again = complete(tc, a, {"n": 1})
    assert again == first
    assert snapshot(wc, instance.instance_id) == before


def test_repeating_an_accepted_fail_is_a_no_op_and_schedules_one_retry(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry())])
    instance = start(wc, "single")
    held = poll_one(tc, new_worker())
    first = fail(tc, held)
    before = snapshot(wc, instance.instance_id)

    assert fail(tc, held) == first
    assert snapshot(wc, instance.instance_id) == before
    assert [e.attempt_number for e in wc.list_tasks(instance.instance_id)] == [1, 2]


def test_complete_after_an_accepted_fail_with_the_same_token_is_refused(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry())])
    instance = start(wc, "single")
    held = poll_one(tc, new_worker())
    fail(tc, held)
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(FencingError):
        complete(tc, held, "changed my mind")
    assert snapshot(wc, instance.instance_id) == before


def test_renew_lease_extends_the_lease_of_its_holder_only(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    start(wc, "single")
    holder = new_worker()
    held = poll_one(tc, holder)
    granted = raw_execution(pool, engine_config, held.execution_id)["lease_expires_at"]

    assert tc.renew_lease(held.execution_id, new_worker()) is False
    assert raw_execution(pool, engine_config, held.execution_id)["lease_expires_at"] == granted

    assert tc.renew_lease(held.execution_id, holder) is True
    renewed = raw_execution(pool, engine_config, held.execution_id)["lease_expires_at"]
    assert renewed > granted
    lease = lease_row(pool, engine_config, held.execution_id)
    assert lease is not None
    assert lease["expires_at"] == renewed

    complete(tc, held, "done")
    assert tc.renew_lease(held.execution_id, holder) is False, "a finished execution has no lease"


def test_renew_lease_fails_once_the_lease_has_lapsed(
    wc: WorkflowCoordinator, stc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    start(wc, "single")
    holder = new_worker()
    held = poll_one(stc, holder)
    wait_until_lapsed(pool, engine_config, held.execution_id)
    assert stc.renew_lease(held.execution_id, holder) is False


def test_renew_lease_fails_after_another_worker_took_the_task_over(
    wc: WorkflowCoordinator, stc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    start(wc, "single")
    stale, fresh = new_worker(), new_worker()
    held = poll_one(stc, stale)
    wait_until_lapsed(pool, engine_config, held.execution_id)
    poll_one(stc, fresh)
    assert stc.renew_lease(held.execution_id, stale) is False
    assert stc.renew_lease(held.execution_id, fresh) is True


# -- retries -------------------------------------------------------------------------------------


def test_failed_attempt_is_retried_after_exponential_backoff_until_attempts_run_out(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    policy = RetryPolicy(
        max_attempts=3, initial_interval=timedelta(milliseconds=200), backoff_coefficient=2, jitter=0
    )
    register(wc, "single", [TaskDefinition("work", retry=policy)])
    instance = start(wc, "single")
    worker = new_worker()
    held = poll_one(tc, worker)

    for attempt, delay_ms in ((1, 200), (2, 400)):
        assert held.attempt_number == attempt
        failed = fail(tc, held, f"failure {attempt}")
        retry = latest(wc, instance.instance_id, "work")
        assert (retry.attempt_number, retry.state) == (attempt + 1, T.READY)
        # both timestamps are the failing transaction's now(), so their gap is exactly the delay
        assert retry.ready_at is not None
        assert failed.finished_at is not None
        assert retry.ready_at - failed.finished_at == timedelta(milliseconds=delay_ms)
        held = acquire_when_ready(tc, retry.execution_id, worker)

    fail(tc, held, "failure 3")
    assert [e.attempt_number for e in wc.list_tasks(instance.instance_id)] == [1, 2, 3]
    assert wc.get_workflow(instance.instance_id).state is W.FAILED
    scheduled = events_of(wc, instance.instance_id, EventType.TASK_RETRY_SCHEDULED)
    assert [(e.payload["attempt"], e.payload["delay_s"]) for e in scheduled] == [(2, 0.2), (3, 0.4)]
    [failed_event] = events_of(wc, instance.instance_id, EventType.WORKFLOW_FAILED)
    assert failed_event.payload == {"failed_task": "work", "error": {"message": "failure 3"}}


def test_retry_is_not_handed_out_before_its_backoff_elapses(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    policy = RetryPolicy(max_attempts=2, initial_interval=timedelta(minutes=1), jitter=0)
    register(wc, "single", [TaskDefinition("work", retry=policy)])
    instance = start(wc, "single")
    worker = new_worker()
    fail(tc, poll_one(tc, worker))
    retry = latest(wc, instance.instance_id, "work")
    assert retry.state is T.READY
    assert tc.poll_tasks(worker, limit=10) == []
    assert tc.acquire_task(retry.execution_id, worker) is None


def test_zero_initial_interval_makes_the_retry_ready_at_once(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry())])
    instance = start(wc, "single")
    worker = new_worker()
    failed = fail(tc, poll_one(tc, worker))
    retry = poll_one(tc, worker)
    assert retry.attempt_number == 2
    assert retry.ready_at == failed.finished_at
    scheduled = events_of(wc, instance.instance_id, EventType.TASK_SCHEDULED)
    assert [e.payload["attempt"] for e in scheduled] == [1, 2]


def test_attempt_numbers_count_from_one_and_idempotency_keys_are_unique(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "pair", [TaskDefinition(t, retry=immediate_retry(3)) for t in ("x", "y")])
    instance = start(wc, "pair")
    worker = new_worker()
    for _ in range(2):
        for held in poll_all(tc, worker):
            fail(tc, held)
    for held in poll_all(tc, worker):
        complete(tc, held)

    attempts = wc.list_tasks(instance.instance_id)
    for task_id in ("x", "y"):
        assert sorted(e.attempt_number for e in attempts if e.task_id == task_id) == [1, 2, 3]
    assert len({e.idempotency_key for e in attempts}) == len(attempts) == 6
    assert wc.get_workflow(instance.instance_id).state is W.COMPLETED


def test_retry_task_schedules_the_next_attempt_and_resumes_the_failed_workflow(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", chain("a", "b", retry=single_attempt()))
    instance = start(wc, "shop", {"order": 9})
    worker = new_worker()
    complete(tc, poll_one(tc, worker), "a-out")
    first_b = poll_one(tc, worker)
    fail(tc, first_b)
    assert wc.get_workflow(instance.instance_id).state is W.FAILED

    retried = tc.retry_task(instance.instance_id, "b")
    assert (retried.task_id, retried.attempt_number, retried.state) == ("b", 2, T.READY)
    assert retried.input == first_b.input == {"workflow": {"order": 9}, "dependencies": {"a": "a-out"}}
    assert wc.get_workflow(instance.instance_id).state is W.RUNNING
    [resumed] = events_of(wc, instance.instance_id, EventType.WORKFLOW_RETRIED)
    assert resumed.payload == {"retried_task": "b"}

    complete(tc, poll_one(tc, worker), "b-out")
    finished = wc.get_workflow(instance.instance_id)
    assert (finished.state, finished.output) == (W.COMPLETED, {"a": "a-out", "b": "b-out"})


def test_retry_task_with_an_input_replaces_the_input_of_the_new_attempt(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=single_attempt())])
    instance = start(wc, "single", {"bad": True})
    worker = new_worker()
    fail(tc, poll_one(tc, worker))
    tc.retry_task(instance.instance_id, "work", {"fixed": True})
    assert poll_one(tc, worker).input == {"fixed": True}


@pytest.mark.parametrize("situation", ["pending", "ready", "running", "completed", "retry-scheduled"])
def test_retry_task_refuses_a_task_whose_latest_attempt_has_not_failed(
    wc: WorkflowCoordinator, tc: TaskCoordinator, situation: str
) -> None:
    register(wc, "shop", chain("a", "b", retry=immediate_retry(2)))
    instance = start(wc, "shop")
    worker = new_worker()
    task_id = {"pending": "b", "ready": "a"}.get(situation, "a")
    if situation == "running":
        poll_one(tc, worker)
    elif situation == "completed":
        complete(tc, poll_one(tc, worker))
    elif situation == "retry-scheduled":
        fail(tc, poll_one(tc, worker))
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(InvalidStateError):
        tc.retry_task(instance.instance_id, task_id)
    assert snapshot(wc, instance.instance_id) == before


def test_retry_task_refuses_a_task_of_a_cancelled_workflow(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=single_attempt())])
    instance = start(wc, "single")
    fail(tc, poll_one(tc, new_worker()))
    wc.cancel_workflow(instance.instance_id)
    with pytest.raises(InvalidStateError, match="CANCELLED"):
        tc.retry_task(instance.instance_id, "work")


def test_retry_task_of_an_unknown_task_raises_task_not_found(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    instance = start(wc, "single")
    with pytest.raises(TaskNotFoundError):
        tc.retry_task(instance.instance_id, "nope")


# -- lapses and timeouts -------------------------------------------------------------------------


def test_lease_lapses_count_against_max_attempts(
    wc: WorkflowCoordinator, stc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry(2))])
    instance = start(wc, "single")
    [execution] = wc.list_tasks(instance.instance_id)

    for grant in (1, 2):
        held = stc.acquire_task(execution.execution_id, new_worker())
        assert held is not None, f"grant {grant} was refused"
        wait_until_lapsed(pool, engine_config, held.execution_id)
        assert stc.reclaim_expired_leases() == 1

    [gone] = wc.list_tasks(instance.instance_id)
    assert gone.state is T.FAILED
    assert gone.error["type"] == "LeaseLapsed"
    assert wc.get_workflow(instance.instance_id).state is W.FAILED
    assert len(events_of(wc, instance.instance_id, EventType.TASK_STARTED)) == 2
    assert len(events_of(wc, instance.instance_id, EventType.TASK_LEASE_EXPIRED)) == 1


def test_polls_look_for_lapsed_leases_once_per_reclaim_interval(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    # a 60 s lease caps the interval at 6 s: far longer than this test takes
    config = replace(engine_config, lease_duration=timedelta(seconds=60), reclaim_interval=timedelta(hours=1))
    tc = TaskCoordinator(pool, config)
    register(wc, "single", [TaskDefinition("work")])
    instance = start(wc, "single")
    first, second = new_worker(), new_worker()
    [held] = tc.poll_tasks(first)  # this poll looked for lapsed leases (none) and starts the interval
    for table, column, key in (
        ("task_executions", "lease_expires_at", "execution_id"),
        ("execution_leases", "expires_at", "lease_key"),
    ):
        query(
            pool,
            engine_config,
            f"UPDATE {{}}.{table} SET {column} = now() - interval '1 minute' WHERE {key} = %s RETURNING 1",
            held.execution_id,
        )

    assert tc.poll_tasks(second) == [], "within the interval a poll does not look for lapsed leases"
    assert tc.reclaim_expired_leases() == 1
    [again] = tc.poll_tasks(second)
    assert (again.execution_id, again.fence_token) == (held.execution_id, held.fence_token + 1)
    assert wc.get_workflow(instance.instance_id).state is W.RUNNING


def test_lapses_and_failures_draw_on_one_budget_of_attempts(
    wc: WorkflowCoordinator, stc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=immediate_retry(3))])
    instance = start(wc, "single")
    worker = new_worker()
    fail(stc, poll_one(stc, worker))
    lapsing = poll_one(stc, worker)
    wait_until_lapsed(pool, engine_config, lapsing.execution_id)
    fail(stc, poll_one(stc, worker))

    assert wc.get_workflow(instance.instance_id).state is W.FAILED
    assert len(events_of(wc, instance.instance_id, EventType.TASK_STARTED)) == 3


def test_task_timeout_caps_the_lease_and_fails_the_attempt_with_a_timeout_error(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    # the configured lease (30 s) is far longer than the task may run
    timeout = timedelta(milliseconds=300)
    register(wc, "single", [TaskDefinition("slow", timeout=timeout, retry=immediate_retry(2))])
    instance = start(wc, "single")
    worker = new_worker()
    held = poll_one(tc, worker)
    assert held.started_at is not None
    deadline = held.started_at + timeout
    assert raw_execution(pool, engine_config, held.execution_id)["deadline_at"] == deadline
    assert held.lease_expires_at == deadline

    tc.renew_lease(held.execution_id, worker)
    assert raw_execution(pool, engine_config, held.execution_id)["lease_expires_at"] == deadline
    wait_until_lapsed(pool, engine_config, held.execution_id)
    assert tc.renew_lease(held.execution_id, worker) is False

    tc.reclaim_expired_leases()
    [timed_out] = executions(wc, instance.instance_id, state=T.FAILED)
    assert timed_out.error["type"] == "TimeoutError"
    [failed_event] = events_of(wc, instance.instance_id, EventType.TASK_FAILED)
    assert failed_event.payload["lease_lapsed"] is True
    retry = latest(wc, instance.instance_id, "slow")
    assert (retry.attempt_number, retry.state) == (2, T.READY), "the timed-out attempt is retried"

    with pytest.raises(FencingError):
        complete(tc, held, "too slow")
    complete(tc, poll_one(tc, worker), "in time")
    assert wc.get_workflow(instance.instance_id).state is W.COMPLETED


# -- DAG order and inputs ------------------------------------------------------------------------


def test_chain_runs_one_task_at_a_time_and_hands_each_output_to_the_next(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", chain("a", "b", "c"))
    instance = start(wc, "shop", {"order": 7})
    worker = new_worker()
    previous: dict[str, Any] = {}
    for task_id in ("a", "b", "c"):
        [held] = poll_all(tc, worker)
        assert held.task_id == task_id
        assert held.input == {"workflow": {"order": 7}, "dependencies": previous}
        complete(tc, held, f"{task_id}-out")
        previous = {task_id: f"{task_id}-out"}

    finished = wc.get_workflow(instance.instance_id)
    assert finished.output == {"a": "a-out", "b": "b-out", "c": "c-out"}
    per_task = ["TASK_SCHEDULED", "TASK_STARTED", "TASK_COMPLETED"]
    history = assert_history_valid(wc, instance.instance_id)
    assert event_types(history) == ["WORKFLOW_STARTED", *per_task * 3, "WORKFLOW_COMPLETED"]
    assert [e.payload.get("task_id") for e in history[1:-1]] == [t for t in "abc" for _ in per_task]


def test_diamond_runs_both_branches_together_and_joins_their_outputs(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(
        wc,
        "shop",
        [
            TaskDefinition("root"),
            TaskDefinition("left", depends_on=["root"]),
            TaskDefinition("right", depends_on=["root"]),
            TaskDefinition("join", depends_on=["left", "right"]),
        ],
    )
    instance = start(wc, "shop", "in")
    worker = new_worker()
    complete(tc, poll_one(tc, worker), "r")
    branches = poll_all(tc, worker)
    assert sorted(e.task_id for e in branches) == ["left", "right"]
    assert all(e.input == {"workflow": "in", "dependencies": {"root": "r"}} for e in branches)
    for e in branches:
        complete(tc, e, e.task_id.upper())
    [join] = poll_all(tc, worker)
    assert join.input == {"workflow": "in", "dependencies": {"left": "LEFT", "right": "RIGHT"}}
    complete(tc, join, "j")
    assert wc.get_workflow(instance.instance_id).state is W.COMPLETED


def test_fifty_way_fan_out_and_fan_in_completes_with_every_output(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    branches = [f"b{i:02}" for i in range(50)]
    register(
        wc,
        "wide",
        [
            TaskDefinition("split"),
            *(TaskDefinition(b, depends_on=["split"]) for b in branches),
            TaskDefinition("merge", depends_on=branches),
        ],
    )
    instance = start(wc, "wide", {"n": 50})
    worker = new_worker()
    complete(tc, poll_one(tc, worker), "s")
    fanned = poll_all(tc, worker)
    assert sorted(e.task_id for e in fanned) == branches
    for e in fanned:
        assert states(wc, instance.instance_id)["merge"] == "PENDING"
        complete(tc, e, int(e.task_id[1:]))
    [merge] = poll_all(tc, worker)
    assert merge.input == {"workflow": {"n": 50}, "dependencies": {b: int(b[1:]) for b in branches}}
    complete(tc, merge, "m")

    finished = wc.get_workflow(instance.instance_id)
    assert finished.state is W.COMPLETED
    assert finished.output == {"split": "s", "merge": "m", **{b: int(b[1:]) for b in branches}}
    history = assert_history_valid(wc, instance.instance_id)
    assert event_types(history).count("TASK_COMPLETED") == 52


def test_the_updates_of_a_running_workflows_row_are_hot_updates(engine_config: EngineConfig) -> None:
    # No index of workflow_instances names a column that a running workflow's updates change (0004), so
    # with room on the page each poll and each recorded result updates the row in place (a HOT update,
    # no new index entries); only the update that finishes the workflow sets an indexed column.
    with create_pool(engine_config, min_size=1, max_size=2) as pool:
        wc, tc = WorkflowCoordinator(pool, engine_config), TaskCoordinator(pool, engine_config)
        register(wc, "shop", chain("a", "b", "c"))
        instance = start(wc, "shop")
        worker = uuid.uuid4()
        for _ in range(3):
            (execution,) = tc.poll_tasks(worker, limit=1)
            tc.complete_task(execution.execution_id, worker, execution.fence_token, None)
        assert wc.get_workflow(instance.instance_id).state is WorkflowState.COMPLETED
    # the pool's sessions have ended, and a session sends its statistics when it ends
    deadline = time.monotonic() + 20
    with psycopg.connect(engine_config.dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                " WHERE schemaname = %s AND relname = 'workflow_instances'",
                (engine_config.schema,),
            ).fetchone()
            assert row is not None
            if row[0] >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert tuple(row) == (6, 5), "3 polls and 3 results updated the row; all but the last were HOT"
