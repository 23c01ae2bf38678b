"""Factories and checks shared by the engine-core specifications: build rows, drive workers, audit history."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

import orchestrator_engine
from orchestrator_engine import (
    EngineConfig,
    RetryPolicy,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskKind,
    TaskState,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowEvent,
    WorkflowInstance,
    WorkflowState,
)
from orchestrator_engine.models import EVENT_TARGET_STATE, EventType, can_transition_workflow

Pool = ConnectionPool[psycopg.Connection[Any]]
Handler = Callable[[TaskExecution], Any]

NAMESPACE = "spec"
#: short enough that a test can outwait it, long enough that a busy machine does not lapse it by accident
SHORT_LEASE = timedelta(milliseconds=300)
#: the directory that holds the orchestrator_engine package these tests import, for child processes
PACKAGE_ROOT = Path(orchestrator_engine.__file__).resolve().parent.parent
#: every migration the package ships, in the order migrate() applies them
ALL_MIGRATIONS = sorted(p.stem for p in (PACKAGE_ROOT / "migrations").glob("*.sql"))


def short_lease(config: EngineConfig, lease: timedelta = SHORT_LEASE) -> EngineConfig:
    """Return ``config`` with a lease a test can outwait by sleeping."""
    return replace(config, lease_duration=lease, renewal_interval=lease / 3)


def immediate_retry(max_attempts: int = 3) -> RetryPolicy:
    """Return a policy that retries at once, without jitter."""
    return RetryPolicy(max_attempts=max_attempts, initial_interval=timedelta(0), jitter=0)


def single_attempt() -> RetryPolicy:
    """Return a policy under which the first failure is terminal."""
    return RetryPolicy(max_attempts=1, initial_interval=timedelta(0), jitter=0)


def new_worker() -> UUID:
    return uuid.uuid4()


# -- definitions and instances -------------------------------------------------------------------


def register(
    wc: WorkflowCoordinator,
    name: str,
    tasks: Iterable[TaskDefinition],
    *,
    version: int = 1,
    namespace: str = NAMESPACE,
) -> WorkflowDefinition:
    """Register a workflow built from ``tasks`` and return it."""
    definition = WorkflowDefinition(namespace=namespace, name=name, tasks=tuple(tasks), version=version)
    return wc.register_workflow(definition)


def start(
    wc: WorkflowCoordinator,
    name: str,
    input: Any = None,
    *,
    run_id: str | None = None,
    version: int | None = None,
    namespace: str = NAMESPACE,
    conn: psycopg.Connection[Any] | None = None,
) -> WorkflowInstance:
    """Start one run of a registered workflow (a fresh run_id unless one is given)."""
    request = StartWorkflowRequest(
        namespace=namespace,
        workflow_name=name,
        run_id=run_id or f"run-{uuid.uuid4()}",
        input=input,
        version=version,
    )
    return wc.start_workflow(request, conn=conn)


def chain(*task_ids: str, **options: Any) -> list[TaskDefinition]:
    """Return tasks where each depends on the one before it; ``options`` apply to every task."""
    return [
        TaskDefinition(tid, depends_on=task_ids[i - 1 : i] if i else (), **options)
        for i, tid in enumerate(task_ids)
    ]


# -- working the queue ---------------------------------------------------------------------------


def output_of(execution: TaskExecution) -> dict[str, Any]:
    """Return the output the default handler reports: which task and attempt produced it."""
    return {"task": execution.task_id, "attempt": execution.attempt_number}


def poll_one(tc: TaskCoordinator, worker: UUID, *, namespace: str = NAMESPACE) -> TaskExecution:
    """Lease exactly one execution, failing the test if there is none."""
    leased = tc.poll_tasks(worker, namespace=namespace, limit=1)
    assert len(leased) == 1, "expected one ready execution, found none"
    return leased[0]


def poll_all(tc: TaskCoordinator, worker: UUID, *, namespace: str = NAMESPACE) -> list[TaskExecution]:
    """Lease every ready execution of ``namespace`` in one call."""
    return tc.poll_tasks(worker, namespace=namespace, limit=1000)


def complete(tc: TaskCoordinator, execution: TaskExecution, output: Any = None) -> TaskExecution:
    """Complete an execution as its lease holder."""
    assert execution.lease_holder is not None
    return tc.complete_task(execution.execution_id, execution.lease_holder, execution.fence_token, output)


def fail(tc: TaskCoordinator, execution: TaskExecution, message: str = "boom") -> TaskExecution:
    """Fail an attempt as its lease holder."""
    assert execution.lease_holder is not None
    return tc.fail_task(
        execution.execution_id, execution.lease_holder, execution.fence_token, {"message": message}
    )


def drive(
    tc: TaskCoordinator,
    worker: UUID,
    handler: Handler = output_of,
    *,
    namespace: str = NAMESPACE,
    task_types: Iterable[str] | None = None,
) -> list[TaskExecution]:
    """Poll and complete with ``handler``'s output until nothing is ready; return what was completed."""
    types = None if task_types is None else list(task_types)
    done: list[TaskExecution] = []
    while True:
        batch = tc.poll_tasks(worker, namespace=namespace, task_types=types, limit=100)
        if not batch:
            return done
        for execution in batch:
            done.append(
                tc.complete_task(execution.execution_id, worker, execution.fence_token, handler(execution))
            )


@dataclass
class Drained:
    """What concurrent workers were handed, and what their polls raised."""

    leased: dict[UUID, list[TaskExecution]]
    errors: list[BaseException]

    @property
    def execution_ids(self) -> list[UUID]:
        return [e.execution_id for got in self.leased.values() for e in got]


def drain_concurrently(
    tc: TaskCoordinator, workers: int, expected: int, *, limit: int = 1, namespace: str = NAMESPACE
) -> Drained:
    """Let ``workers`` threads, released together, poll until ``expected`` executions were handed out.

    An empty poll does not mean the queue is empty (another poller may hold the instance row), so the
    threads stop on the count, or after 60 s; a poll that raises is recorded and the thread polls on.
    """
    ids = [new_worker() for _ in range(workers)]
    barrier = threading.Barrier(workers, timeout=30)
    lock = threading.Lock()
    result = Drained({w: [] for w in ids}, [])
    deadline = time.monotonic() + 60

    def work(worker: UUID) -> None:
        barrier.wait()
        while time.monotonic() < deadline and len(result.errors) < 100:
            with lock:
                if len(result.execution_ids) >= expected:
                    return
            try:
                batch = tc.poll_tasks(worker, namespace=namespace, limit=limit)
            except Exception as exc:
                with lock:
                    result.errors.append(exc)
                continue
            if not batch:
                time.sleep(0.001)
                continue
            with lock:
                result.leased[worker].extend(batch)

    threads = [threading.Thread(target=work, args=(w,)) for w in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def acquire_when_ready(tc: TaskCoordinator, execution_id: UUID, worker: UUID) -> TaskExecution:
    """Acquire an execution as soon as its backoff lets it go (gives up after 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leased = tc.acquire_task(execution_id, worker)
        if leased is not None:
            return leased
        time.sleep(0.02)
    raise AssertionError(f"execution {execution_id} never became acquirable")


# -- reading state -------------------------------------------------------------------------------


def executions(
    wc: WorkflowCoordinator,
    instance_id: UUID,
    *,
    task_id: str | None = None,
    kind: TaskKind | None = None,
    state: TaskState | None = None,
) -> list[TaskExecution]:
    """Return the instance's executions, oldest first, filtered by task, kind and state."""
    return [
        e
        for e in wc.list_tasks(instance_id)
        if (task_id is None or e.task_id == task_id)
        and (kind is None or e.kind is kind)
        and (state is None or e.state is state)
    ]


def latest(
    wc: WorkflowCoordinator, instance_id: UUID, task_id: str, kind: TaskKind = TaskKind.FORWARD
) -> TaskExecution:
    """Return the newest attempt of one task."""
    found = executions(wc, instance_id, task_id=task_id, kind=kind)
    assert found, f"no {kind.value} execution of {task_id!r}"
    return max(found, key=lambda e: e.attempt_number)


def states(wc: WorkflowCoordinator, instance_id: UUID, kind: TaskKind = TaskKind.FORWARD) -> dict[str, str]:
    """Map each task to the state of its newest attempt of ``kind``."""
    newest: dict[str, TaskExecution] = {}
    for e in executions(wc, instance_id, kind=kind):
        if e.task_id not in newest or e.attempt_number > newest[e.task_id].attempt_number:
            newest[e.task_id] = e
    return {tid: e.state.value for tid, e in sorted(newest.items())}


def event_types(events: Iterable[WorkflowEvent]) -> list[str]:
    return [e.event_type for e in events]


def events_of(wc: WorkflowCoordinator, instance_id: UUID, *types: EventType) -> list[WorkflowEvent]:
    """Return the instance's events of the given types, in order."""
    wanted = {t.value for t in types}
    return [e for e in wc.get_history(instance_id) if e.event_type in wanted]


@dataclass(frozen=True)
class Snapshot:
    """Everything a refused call must leave untouched."""

    instance: WorkflowInstance
    executions: list[TaskExecution]
    history_length: int


def snapshot(wc: WorkflowCoordinator, instance_id: UUID) -> Snapshot:
    return Snapshot(
        instance=wc.get_workflow(instance_id),
        executions=wc.list_tasks(instance_id),
        history_length=len(wc.get_history(instance_id)),
    )


# -- history audit -------------------------------------------------------------------------------


def replay(events: list[WorkflowEvent]) -> WorkflowState:
    """Replay a history through EVENT_TARGET_STATE, asserting gapless numbering and legal edges only."""
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1)), "sequence has gaps"
    assert events, "every instance has a history"
    assert events[0].event_type == EventType.WORKFLOW_STARTED.value
    state: WorkflowState | None = None
    for event in events:
        target = EVENT_TARGET_STATE.get(EventType(event.event_type))
        if target is None:
            continue
        if state is not None:
            assert can_transition_workflow(state, target), (
                f"event {event.sequence_number} {event.event_type} moves {state.value} -> {target.value}"
            )
        state = target
    assert state is not None
    return state


def assert_history_valid(wc: WorkflowCoordinator, instance_id: UUID) -> list[WorkflowEvent]:
    """Check one instance's history and that it ends in the instance's current state."""
    events = wc.get_history(instance_id)
    instance = wc.get_workflow(instance_id)
    assert replay(events) is instance.state
    assert instance.sequence_number == len(events)
    return events


def assert_every_history_valid(pool: Pool, config: EngineConfig) -> int:
    """Audit every instance in the database; return how many were checked."""
    wc = WorkflowCoordinator(pool, config)
    ids = [row["instance_id"] for row in query(pool, config, "SELECT instance_id FROM {}.workflow_instances")]
    for instance_id in ids:
        assert_history_valid(wc, instance_id)
    assert_event_ids_follow_keys(pool, config)
    return len(ids)


def event_id_for(idempotency_key: str) -> UUID:
    """The id the engine gives an event: a name-based UUID (version 8, RFC 9562) of its idempotency key.

    The first 16 bytes of the key's SHA-256, with the version nibble set to 8 and the variant nibble
    to 8 (binary 10 in its top bits): written here from the definition, not from the engine's SQL.
    """
    digits = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return UUID(digits[:12] + "8" + digits[13:16] + "8" + digits[17:])


def assert_event_ids_follow_keys(pool: Pool, config: EngineConfig) -> int:
    """Assert that every event's id is event_id_for(its idempotency key); return how many were checked."""
    rows = query(pool, config, "SELECT event_id, idempotency_key FROM {}.events")
    wrong = [r for r in rows if r["event_id"] != event_id_for(r["idempotency_key"])]
    assert not wrong, f"{len(wrong)} of {len(rows)} event ids do not follow their keys: {wrong[:3]}"
    assert len({r["event_id"] for r in rows}) == len(rows), "two events share an id"
    return len(rows)


# -- direct reads of the engine's tables ---------------------------------------------------------


def query(pool: Pool, config: EngineConfig, template: str, *params: Any) -> list[dict[str, Any]]:
    """Run a read with the engine schema substituted for ``{}``."""
    statement = sql.SQL(template).format(sql.Identifier(config.schema))
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(statement, params)
        return cur.fetchall()


def lease_row(pool: Pool, config: EngineConfig, execution_id: UUID) -> dict[str, Any] | None:
    """Return the execution_leases row that fences ``execution_id``, if any."""
    rows = query(pool, config, "SELECT * FROM {}.execution_leases WHERE lease_key = %s", execution_id)
    return rows[0] if rows else None


def raw_execution(pool: Pool, config: EngineConfig, execution_id: UUID) -> dict[str, Any]:
    """Return the whole task_executions row, including columns the model does not expose."""
    rows = query(pool, config, "SELECT * FROM {}.task_executions WHERE execution_id = %s", execution_id)
    assert rows, f"no execution {execution_id}"
    return rows[0]


def wait_until_lapsed(pool: Pool, config: EngineConfig, execution_id: UUID) -> None:
    """Sleep until the database clock is past the execution's lease (gives up after 10 s)."""
    deadline = time.monotonic() + 10
    template = "SELECT lease_expires_at < now() AS lapsed FROM {}.task_executions WHERE execution_id = %s"
    while time.monotonic() < deadline:
        if query(pool, config, template, execution_id)[0]["lapsed"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"the lease of {execution_id} never lapsed")


# -- a worker in another process -----------------------------------------------------------------

#: exit codes of the child worker
EXIT_FENCED = 10
EXIT_ACCEPTED = 11
EXIT_NOTHING_TO_DO = 12

_CHILD_WORKER = f"""
import json, sys, time, uuid
from datetime import timedelta
from orchestrator_engine import EngineConfig, FencingError, TaskCoordinator, create_pool

dsn, lease_ms, namespace = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lease = timedelta(milliseconds=lease_ms)
config = EngineConfig(dsn=dsn, lease_duration=lease, renewal_interval=lease / 3)
pool = create_pool(config, min_size=1, max_size=1)
tasks = TaskCoordinator(pool, config)
worker = uuid.uuid4()
deadline = time.monotonic() + 30
leased = []
while not leased:
    if time.monotonic() > deadline:
        sys.exit({EXIT_NOTHING_TO_DO})
    leased = tasks.poll_tasks(worker, namespace=namespace)
execution = leased[0]
print(json.dumps({{"execution_id": str(execution.execution_id), "fence_token": execution.fence_token,
                  "worker_id": str(worker)}}), flush=True)
sys.stdin.readline()  # the test suspends or kills this process while it waits here
try:
    tasks.complete_task(execution.execution_id, worker, execution.fence_token, {{"by": "child"}})
except FencingError:
    print("FENCED", flush=True)
    code = {EXIT_FENCED}
else:
    print("ACCEPTED", flush=True)
    code = {EXIT_ACCEPTED}
pool.close()
sys.exit(code)
"""


@dataclass(frozen=True)
class ChildLease:
    execution_id: UUID
    fence_token: int
    worker_id: UUID


def spawn_child_worker(dsn: str, namespace: str, lease: timedelta = SHORT_LEASE) -> subprocess.Popen[str]:
    """Start a worker process that leases one task of ``namespace``, then waits for a line on stdin."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
    }
    lease_ms = str(round(lease.total_seconds() * 1000))
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD_WORKER, dsn, lease_ms, namespace],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_child_lease(child: subprocess.Popen[str]) -> ChildLease:
    """Wait for the child worker to report the lease it holds."""
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        _, err = child.communicate(timeout=10)
        raise AssertionError(f"child worker exited with {child.returncode} before leasing: {err}")
    data = json.loads(line)
    return ChildLease(UUID(data["execution_id"]), int(data["fence_token"]), UUID(data["worker_id"]))


def reap(child: subprocess.Popen[str]) -> None:
    """Make sure a child worker is gone, whatever state the test left it in."""
    if child.poll() is None:
        child.kill()
    child.communicate(timeout=30)


# -- worker processes ---------------------------------------------------------------------------------

#: the repository checkout, put on a worker process's PYTHONPATH
REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_SCRIPT = Path(__file__).resolve().parent / "worker_process.py"


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until ``condition()`` holds; the timeout bounds a failing test, it measures nothing."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(0.005)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    worker_id: UUID
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextmanager
def worker_process(dsn: str, tmp_path: Path, *options: str) -> Iterator[WorkerProcess]:
    """Run tests/worker_process.py; it is killed on the way out if the test left it running."""
    worker_id = uuid.uuid4()
    log = tmp_path / f"worker-{worker_id}.log"
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "WORKER_DSN": dsn, "PYTHONPATH": path}
    command = [sys.executable, str(WORKER_SCRIPT), "--worker-id", str(worker_id), *options]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield WorkerProcess(proc, worker_id, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
