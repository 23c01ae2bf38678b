"""Races on real threads and processes: control calls against completions, reclaimers against each other,
pollers against completions, migrators against migrators.

Racing threads meet at a ``threading.Barrier`` so their calls really overlap. Connections carry a
``lock_timeout``, so a deadlock fails the test within seconds instead of hanging it. (Twelve simultaneous
starts of one run_id are specified in tests/test_workflow_coordinator.py.)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from orchestrator_engine import (
    EngineConfig,
    FencingError,
    InvalidStateError,
    RetryPolicy,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
    create_pool,
    pending_migrations,
)
from reliability.conftest import FaultLog, scale

Pool = ConnectionPool[psycopg.Connection[Any]]
W = WorkflowState

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "races"
SCHEMA = "orchestrator"
BRANCHES = 4
#: how long a racing thread may run before the test calls it hung
JOIN_TIMEOUT = 120.0

PATIENT = RetryPolicy(max_attempts=10, initial_interval=timedelta(0), max_interval=timedelta(seconds=1))
FAN = WorkflowDefinition(
    NAMESPACE,
    "fan",
    [
        TaskDefinition("root", task_type="step", compensation="undo", retry=PATIENT),
        *(
            TaskDefinition(
                f"branch{i}", depends_on=["root"], task_type="step", compensation="undo", retry=PATIENT
            )
            for i in range(BRANCHES)
        ),
    ],
)
WIDE = WorkflowDefinition(
    NAMESPACE,
    "wide",
    [
        TaskDefinition("root", task_type="step", retry=PATIENT),
        *(TaskDefinition(f"leaf{i}", depends_on=["root"], task_type="step", retry=PATIENT) for i in range(8)),
    ],
)
SOLO = WorkflowDefinition(NAMESPACE, "solo", [TaskDefinition("only", task_type="step", retry=PATIENT)])


@pytest.fixture
def guarded_pool(engine_config: EngineConfig) -> Iterator[Pool]:
    """Yield a pool whose sessions give up after 5 s of waiting for a lock: a deadlock fails, fast."""
    with create_pool(engine_config, max_size=10, kwargs={"options": "-c lock_timeout=5s"}) as opened:
        yield opened


@pytest.fixture
def wc(guarded_pool: Pool, engine_config: EngineConfig) -> WorkflowCoordinator:
    return WorkflowCoordinator(guarded_pool, engine_config)


@pytest.fixture
def tc(guarded_pool: Pool, engine_config: EngineConfig, wc: WorkflowCoordinator) -> TaskCoordinator:
    return TaskCoordinator(guarded_pool, engine_config, engine=wc.engine)


def run_together(*targets: Callable[[], None]) -> None:
    """Run each target on a thread of its own; fail if one is still running after JOIN_TIMEOUT."""
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a racing thread hung: a deadlock or a lost wake-up"


def start(wc: WorkflowCoordinator, definition: WorkflowDefinition, count: int) -> list[UUID]:
    requests = [
        StartWorkflowRequest(NAMESPACE, definition.name, f"{definition.name}-{i}") for i in range(count)
    ]
    return [instance.instance_id for instance in wc.start_workflows(requests)]


def lease_branches(tc: TaskCoordinator, count: int, worker: UUID) -> dict[UUID, list[TaskExecution]]:
    """Complete every root, then lease every branch; return the leased branches by instance."""
    roots = tc.poll_tasks(worker, limit=count)
    assert len(roots) == count
    for root in roots:
        tc.complete_task(root.execution_id, worker, root.fence_token, {"root": True})
    branches = tc.poll_tasks(worker, limit=count * BRANCHES)
    assert len(branches) == count * BRANCHES
    by_instance: dict[UUID, list[TaskExecution]] = {}
    for branch in branches:
        by_instance.setdefault(branch.workflow_instance_id, []).append(branch)
    return by_instance


def drain(wc: WorkflowCoordinator, tc: TaskCoordinator, instance_ids: list[UUID]) -> None:
    """Resume what is paused and complete whatever is left, compensations included."""
    for iid in instance_ids:
        if wc.get_workflow(iid).state is W.PAUSED:
            wc.resume_workflow(iid)
    worker = uuid.uuid4()
    while leased := tc.poll_tasks(worker, limit=100):
        for execution in leased:
            tc.complete_task(execution.execution_id, worker, execution.fence_token, {"drained": True})


def fetch(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


# -- 6a. control calls racing completions -------------------------------------------------------------

CONTROLS: dict[str, Callable[[WorkflowCoordinator, UUID], object]] = {
    "pause": lambda wc, iid: wc.pause_workflow(iid),
    "cancel": lambda wc, iid: wc.cancel_workflow(iid),
    "trigger_compensation": lambda wc, iid: wc.trigger_compensation(iid, "root"),
}


@dataclass
class RaceOutcome:
    """What happened to one instance: completes accepted and refused, and whether the control call was."""

    accepted: int = 0
    refused: int = 0
    control_refused: bool = False


@pytest.mark.parametrize("control", list(CONTROLS))
def test_control_call_racing_completions_fails_only_with_the_documented_errors(
    control: str, dsn: str, wc: WorkflowCoordinator, tc: TaskCoordinator, fault_log: FaultLog
) -> None:
    count = scale(15, 60)
    wc.register_workflow(FAN)
    instance_ids = start(wc, FAN, count)
    worker = uuid.uuid4()
    leased = lease_branches(tc, count, worker)
    rng = random.Random(f"{control}-{count}")
    # each pair meets at the barrier; the control call then lands somewhere among the four completes
    plan = [(iid, rng.sample(leased[iid], BRANCHES), rng.uniform(0, 0.012)) for iid in instance_ids]
    outcomes = {iid: RaceOutcome() for iid in instance_ids}
    unexpected: list[str] = []
    barrier = threading.Barrier(2, timeout=30)

    def complete_branches() -> None:
        for iid, branches, _ in plan:
            barrier.wait()
            for branch in branches:
                try:
                    tc.complete_task(
                        branch.execution_id, worker, branch.fence_token, {"branch": branch.task_id}
                    )
                    outcomes[iid].accepted += 1
                except FencingError:
                    outcomes[iid].refused += 1
                except Exception as exc:  # anything else is what this test exists to catch
                    unexpected.append(f"complete_task on {iid}: {exc!r}")

    def fire_control() -> None:
        for iid, _, delay in plan:
            barrier.wait()
            time.sleep(delay)
            try:
                CONTROLS[control](wc, iid)
            except InvalidStateError:
                outcomes[iid].control_refused = True
            except Exception as exc:
                unexpected.append(f"{control} on {iid}: {exc!r}")

    run_together(complete_branches, fire_control)
    fault_log.record_fault("race", count)
    fault_log.record_workflows(count)

    assert unexpected == []
    wrong = []
    for iid in instance_ids:
        outcome, state = outcomes[iid], wc.get_workflow(iid).state
        if outcome.accepted + outcome.refused != BRANCHES:
            wrong.append(f"{iid}: {outcome}")
        elif outcome.control_refused or control == "pause":
            # a pause never refuses a leased task; a refused control call found the workflow finished
            if (state, outcome.refused) != (W.COMPLETED, 0):
                wrong.append(f"{iid}: {state} after {outcome}")
        elif control == "cancel":
            if state is not W.CANCELLED or outcome.refused == 0:
                wrong.append(f"{iid}: {state} after {outcome}")
        elif state is not W.COMPENSATING or outcome.refused == 0:
            wrong.append(f"{iid}: {state} after {outcome}")
    assert wrong == []
    shapes = Counter((o.control_refused, o.refused) for o in outcomes.values())
    print(f"\n{control}: (control refused, completes refused) -> instances: {dict(shapes)}")

    drain(wc, tc, instance_ids)
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


# -- 6b. reclaimers racing for one lapsed lease -------------------------------------------------------


def test_only_one_of_four_reclaimers_wins_a_lapsed_lease_with_the_next_fence_token(
    dsn: str,
    guarded_pool: Pool,
    engine_config: EngineConfig,
    wc: WorkflowCoordinator,
    tc: TaskCoordinator,
    fault_log: FaultLog,
) -> None:
    count, reclaimers = scale(15, 60), 4
    # the first holders' leases lapse at once; the reclaimers' 30 s leases cannot lapse mid-race
    short = replace(
        engine_config,
        lease_duration=timedelta(milliseconds=300),
        renewal_interval=timedelta(milliseconds=100),
    )
    first_holder = TaskCoordinator(guarded_pool, short)
    wc.register_workflow(SOLO)
    start(wc, SOLO, count)
    leased = first_holder.poll_tasks(uuid.uuid4(), limit=count)
    assert len(leased) == count
    deadline = time.monotonic() + 10
    while fetch(
        dsn,
        f"SELECT 1 FROM {SCHEMA}.task_executions WHERE state = 'RUNNING' AND lease_expires_at >= now()",
    ):
        assert time.monotonic() < deadline, "the short leases never lapsed"
        time.sleep(0.05)

    workers = [uuid.uuid4() for _ in range(reclaimers)]
    grants: list[list[TaskExecution | None]] = [[None] * count for _ in range(reclaimers)]
    unexpected: list[str] = []
    barrier = threading.Barrier(reclaimers, timeout=30)

    def reclaim(i: int) -> None:
        for k, execution in enumerate(leased):
            barrier.wait()
            try:
                grants[i][k] = tc.acquire_task(execution.execution_id, workers[i])
            except Exception as exc:  # acquire_task answers None when it loses; it never raises here
                unexpected.append(f"acquire_task of {execution.execution_id}: {exc!r}")

    run_together(*(partial(reclaim, i) for i in range(reclaimers)))
    fault_log.record_fault("race", count)
    fault_log.record_workflows(count)

    assert unexpected == []
    for k, execution in enumerate(leased):
        winners = [grants[i][k] for i in range(reclaimers) if grants[i][k] is not None]
        assert len(winners) == 1, f"{execution.execution_id} was granted {len(winners)} times"
        (winner,) = winners
        assert winner is not None
        assert winner.fence_token == execution.fence_token + 1
        assert winner.lease_holder in workers
        tc.complete_task(winner.execution_id, winner.lease_holder, winner.fence_token, {"won": True})
    lapses = fetch(
        dsn,
        f"SELECT payload ->> 'execution_id', count(*) FROM {SCHEMA}.events"
        " WHERE event_type = 'TASK_LEASE_EXPIRED' GROUP BY 1",
    )
    assert sorted(lapses) == sorted((str(e.execution_id), 1) for e in leased), "one lapse recorded each"
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


# -- 6d. pollers racing completions of the same instances --------------------------------------------


def test_pollers_racing_completions_of_the_same_instances_lose_no_sequence_update(
    dsn: str, wc: WorkflowCoordinator, tc: TaskCoordinator, fault_log: FaultLog
) -> None:
    count, pollers = scale(80, 250), 4
    wc.register_workflow(WIDE)
    instance_ids = start(wc, WIDE, count)
    lost: list[str] = []
    unexpected: list[str] = []
    barrier = threading.Barrier(pollers, timeout=30)

    def work_like_a_worker() -> None:
        # every completion rewrites its instance row while the other threads poll that instance's leaves
        worker, idle = uuid.uuid4(), 0
        barrier.wait()
        while idle < 25:
            try:
                leased = tc.poll_tasks(worker, limit=2)
            except AssertionError as exc:
                lost.append(str(exc))
                continue
            except Exception as exc:
                unexpected.append(f"poll_tasks: {exc!r}")
                continue
            idle = 0 if leased else idle + 1
            if not leased:
                time.sleep(0.01)
            for execution in leased:
                try:
                    tc.complete_task(execution.execution_id, worker, execution.fence_token, {"ok": True})
                except Exception as exc:
                    unexpected.append(f"complete_task: {exc!r}")

    run_together(*(work_like_a_worker for _ in range(pollers)))
    fault_log.record_fault("race", count)
    fault_log.record_workflows(count)

    assert unexpected == []
    assert lost == [], f"{len(lost)} polls failed their own invariant: {lost[0]}"
    states = Counter(wc.get_workflow(iid).state for iid in instance_ids)
    assert states == {W.COMPLETED: count}
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


# -- 6e. a retry committed while a poll is already running ---------------------------------------------


def slow_pick(pause: float) -> str:
    """Return next_ready_executions as the latest migration defines it, pausing before its query.

    The pause opens the window between the poll statement's snapshot and the function's own, newer one.
    """
    latest = sorted(
        p for p in (REPO_ROOT / "migrations").glob("*.sql") if "next_ready_executions(" in p.read_text()
    )
    text = latest[-1].read_text(encoding="utf-8")
    start = text.index("CREATE ", text.index("FUNCTION next_ready_executions(") - len("CREATE OR REPLACE "))
    body = text[start : text.index("$$;", start) + len("$$;")]
    body = body.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    assert "\nBEGIN\n" in body, body
    return body.replace("\nBEGIN\n", f"\nBEGIN\n    PERFORM pg_sleep({pause});\n", 1)


def test_a_poll_skips_a_retry_committed_after_it_started_and_keeps_the_sequence_gapless(
    dsn: str, wc: WorkflowCoordinator, tc: TaskCoordinator, fault_log: FaultLog
) -> None:
    # The retry's transaction starts before the poll (so its ready_at is before the poll's now()) and
    # commits while the poll's pick is paused: the pick, reading with its own snapshot, finds and locks
    # the retry, but the poll statement's snapshot predates it. Counting that row would advance the
    # instance's sequence past an event nobody writes; the poll must leave it for the next poll.
    pause = 0.6
    wc.register_workflow(SOLO)
    [instance_id] = start(wc, SOLO, 1)
    first_worker, second_worker = uuid.uuid4(), uuid.uuid4()
    [attempt1] = tc.poll_tasks(first_worker, limit=1)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SET search_path = orchestrator")  # what SET search_path FROM CURRENT keeps
        admin.execute(slow_pick(pause).encode())
    polled: list[list[TaskExecution]] = []
    failures: list[BaseException] = []

    def poll() -> None:
        try:
            polled.append(tc.poll_tasks(second_worker, limit=5))
        except BaseException as exc:
            failures.append(exc)

    with psycopg.connect(dsn) as host, host.transaction():
        tc.fail_task(attempt1.execution_id, first_worker, attempt1.fence_token, "boom", conn=host)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        time.sleep(pause / 3)  # the poll statement has begun; its pick is paused
    poller.join(JOIN_TIMEOUT)  # the retry committed above, while the pick was paused
    fault_log.record_fault("race", 1)
    fault_log.record_workflows(1)

    assert not poller.is_alive()
    assert failures == []
    assert polled == [[]]  # the retry exists for the pick, not for the statement that would lease it
    report = fault_log.check(dsn, require_finished=False)  # the gapless event log among them
    assert report.ok, report.violations
    [attempt2] = tc.poll_tasks(second_worker, limit=5)  # the next poll leases it, pause and all
    assert (attempt2.workflow_instance_id, attempt2.attempt_number) == (instance_id, 2)
    tc.complete_task(attempt2.execution_id, second_worker, attempt2.fence_token, {"ok": True})
    assert wc.get_workflow(instance_id).state is W.COMPLETED
    sequences = fetch(
        dsn,
        "SELECT sequence_number FROM orchestrator.events WHERE workflow_instance_id = %s ORDER BY 1",
        (instance_id,),
    )
    assert [s for (s,) in sequences] == list(range(1, len(sequences) + 1))
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


# -- 6c. migrators racing on an empty database --------------------------------------------------------

MIGRATOR = """
import json, sys
from orchestrator_engine.migrator import migrate
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(migrate(sys.argv[1])), flush=True)
"""


def test_four_processes_migrating_one_empty_database_apply_each_migration_once(
    fresh_database: Callable[..., str], fault_log: FaultLog
) -> None:
    empty = fresh_database(template=False)
    expected = pending_migrations(empty)
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATOR, empty],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:  # a barrier across processes: all have imported the engine before any migrates
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=30)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    fault_log.record_fault("race")

    assert [proc.returncode for proc in procs] == [0] * 4, [err for _, err in outcomes]
    applied = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outcomes), key=len)
    assert applied == [[], [], [], expected]
    assert pending_migrations(empty) == []
    report = fault_log.check(empty, require_finished=True)
    assert report.ok, report.violations
