"""Fault injection: real worker processes on real PostgreSQL, killed, frozen, cut off and restarted.

Workers are processes of ``fault_worker.py``; each records its handler runs in ``public.handler_runs``.
Every scenario ends with the invariant checker finding nothing, and, where every workflow should have
finished, with every workflow finished.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import conninfo
from psycopg_pool import ConnectionPool

from orchestrator_engine import (
    EngineConfig,
    RetryPolicy,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskState,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
    create_pool,
    migrate,
)
from orchestrator_engine.embedded import EmbeddedPostgres, postgres_bin_dir
from reliability.conftest import FaultLog, scale
from reliability.proxy import CutMode, FaultProxy

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).resolve().with_name("fault_worker.py")
NAMESPACE = "faults"
SCHEMA = "orchestrator"
#: the test's own connections carry this name, so terminating the engine's backends spares them
DRIVER_APP = "reliability-driver"
ENGINE_APP = EngineConfig.application_name
FINISHED = ("COMPLETED", "CANCELLED", "COMPENSATED", "FAILED")

# Lease lapses count against max_attempts: a storm of kills must not use up a task's tries.
PATIENT = RetryPolicy(max_attempts=100, initial_interval=timedelta(0), max_interval=timedelta(seconds=1))
DIAMOND = WorkflowDefinition(
    NAMESPACE,
    "diamond",
    [
        TaskDefinition("fetch", task_type="step", retry=PATIENT),
        TaskDefinition("left", depends_on=["fetch"], task_type="step", retry=PATIENT),
        TaskDefinition("right", depends_on=["fetch"], task_type="step", retry=PATIENT),
        TaskDefinition("merge", depends_on=["left", "right"], task_type="step", retry=PATIENT),
    ],
)
SOLO = WorkflowDefinition(NAMESPACE, "solo", [TaskDefinition("only", task_type="step", retry=PATIENT)])

CREATE_HANDLER_RUNS = """
CREATE TABLE public.handler_runs (
    execution_id uuid NOT NULL,
    task_id text NOT NULL,
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
TERMINATE_ENGINE_BACKENDS = """
SELECT pid, query LIKE 'LISTEN %%' AS listener, pg_terminate_backend(pid)
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND (application_name = %s OR query LIKE 'LISTEN %%')
"""


# -- database helpers ---------------------------------------------------------------------------------


def fetch(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one query on a connection of its own (a pool would hand back connections a fault killed)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5, application_name=DRIVER_APP) as conn:
        return conn.execute(query, params).fetchall()


def fetch_value(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    (row,) = fetch(dsn, query, params)
    return row[0]


def create_handler_runs(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(CREATE_HANDLER_RUNS)


def states_by_count(dsn: str) -> dict[str, int]:
    rows = fetch(dsn, f"SELECT state, count(*) FROM {SCHEMA}.workflow_instances GROUP BY state")
    return {str(state): int(count) for state, count in rows}


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``condition`` until it holds; database errors mid-fault count as "not yet"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except psycopg.OperationalError:
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_until_finished(dsn: str, total: int, timeout: float, stall: float = 45.0) -> dict[str, int]:
    """Wait until ``total`` instances have finished; return the instances per state.

    Give up at ``timeout``, or sooner once no event was written for ``stall`` seconds (longer than a
    pool's 30 s checkout timeout), so a run that stopped moving fails without waiting out ``timeout``;
    the caller's assertion on the states then says what is missing.
    """
    query = (
        f"SELECT (SELECT count(*) FROM {SCHEMA}.events),"
        f" (SELECT count(*) FROM {SCHEMA}.workflow_instances WHERE state = ANY(%s))"
    )
    deadline = time.monotonic() + timeout
    last, moved = (-1, -1), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - moved < stall:
        try:
            (progress,) = fetch(dsn, query, (list(FINISHED),))
        except psycopg.OperationalError:
            progress = last  # the server is away: that is no progress
        if progress[1] >= total:
            break
        if progress != last:
            last, moved = progress, time.monotonic()
        time.sleep(0.2)
    return states_by_count(dsn)


@contextmanager
def driver(dsn: str, **pool_options: Any) -> Iterator[WorkflowCoordinator]:
    """Yield a WorkflowCoordinator on a pool of the test's own (named DRIVER_APP)."""
    config = EngineConfig(dsn=dsn, application_name=DRIVER_APP)
    with create_pool(config, **{"max_size": 3, **pool_options}) as pool:
        yield WorkflowCoordinator(pool, config)


def requests(definition: WorkflowDefinition, prefix: str, count: int) -> list[StartWorkflowRequest]:
    return [StartWorkflowRequest(NAMESPACE, definition.name, f"{prefix}-{i}", {"i": i}) for i in range(count)]


class Feeder(threading.Thread):
    """Start workflows in batches spread over ``seconds``, so faults land while work keeps arriving."""

    def __init__(
        self, wc: WorkflowCoordinator, definition: WorkflowDefinition, total: int, seconds: float
    ) -> None:
        super().__init__(name="feeder", daemon=True)
        self._wc = wc
        self._pending = requests(definition, "fed", total)
        self._batches = max(1, round(seconds / 0.4))
        self.error: BaseException | None = None

    def run(self) -> None:
        size = -(-len(self._pending) // self._batches)
        try:
            for start in range(0, len(self._pending), size):
                self._wc.start_workflows(self._pending[start : start + size])
                time.sleep(0.4)
        except BaseException as exc:  # reported by the test, not lost on a thread
            self.error = exc

    def finish(self) -> None:
        self.join(timeout=60)
        assert not self.is_alive(), "the feeder never finished starting workflows"
        assert self.error is None, f"starting workflows failed: {self.error!r}"


# -- worker processes ---------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    worker_id: UUID
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def last_line(self) -> str:
        """Return the last line the worker wrote: after a crash, the exception that killed it."""
        lines = [line for line in self.output().splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"

    def counters(self) -> dict[str, Any]:
        """Return the counters the worker printed when it stopped ({} if it never got that far)."""
        for line in reversed(self.output().splitlines()):
            if line.startswith("{"):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        return {}


class Fleet:
    """Spawn fault_worker.py processes; on exit every one still running is stopped, killed if need be."""

    def __init__(
        self,
        dsn: str,
        logs: Path,
        *,
        lease_ms: int = 1000,
        renewal_ms: int = 300,
        concurrency: int = 4,
        sleep_ms: int = 5,
        pool_min: int = 2,
    ) -> None:
        config = [str(lease_ms), str(renewal_ms), str(concurrency), "--sleep-ms", str(sleep_ms)]
        config += ["--pool-min", str(pool_min)]
        self._argv = [dsn, SCHEMA, *config]
        self._logs = logs
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self._env = {**os.environ, "PYTHONPATH": path}
        self.spawned: list[WorkerProcess] = []

    def spawn(self) -> WorkerProcess:
        worker_id = uuid.uuid4()
        log = self._logs / f"worker-{len(self.spawned):03d}.log"
        command = [sys.executable, str(WORKER_SCRIPT), *self._argv, "--worker-id", str(worker_id)]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self._env)
        worker = WorkerProcess(worker_id, proc, log)
        self.spawned.append(worker)
        return worker

    def kill(self, worker: WorkerProcess) -> bool:
        """SIGKILL the worker; return False if it had already exited by itself."""
        if worker.proc.poll() is not None:
            return False
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)
        return True

    def crashed(self) -> list[str]:
        """Describe each worker that exited by itself with an error, rather than by our signal."""
        return [
            f"worker pid {w.pid} exited with {w.proc.returncode}: {w.last_line()}"
            for w in self.spawned
            if w.proc.poll() not in (None, 0, -signal.SIGKILL)
        ]

    def stop(self, *workers: WorkerProcess, timeout: float = 15.0) -> list[dict[str, Any]]:
        """SIGTERM the workers (each drains, then prints its counters) and return those counters."""
        running = [w for w in workers if w.proc.poll() is None]
        for worker in running:
            worker.proc.send_signal(signal.SIGCONT)  # a frozen worker cannot act on SIGTERM
            worker.proc.terminate()
        # signalled together, so their drains overlap
        deadline = time.monotonic() + timeout
        for worker in running:
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        return [w.counters() for w in workers]

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(*self.spawned)


def engine_backends(dsn: str) -> int:
    return int(
        fetch_value(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s",
            (ENGINE_APP,),
        )
    )


def freeze_between_transactions(dsn: str, worker: WorkerProcess) -> None:
    """SIGSTOP the only running worker, at a moment when none of its transactions is open.

    Frozen inside a transaction it would keep its row locks, and a reclaimer skips locked rows: the
    lease would lapse but never be taken over. (A real freeze there is a liveness question for
    ``idle_in_transaction_session_timeout``, not one this test asks.)
    """
    open_transactions = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND state <> 'idle'"
    )
    for _ in range(50):
        worker.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.01)  # let a statement already sent finish on the server
        if fetch_value(dsn, open_transactions, (ENGINE_APP,)) == 0:
            return
        worker.proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError("the worker never paused between transactions")


# -- 1. SIGKILL storm ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_storm_finishes_every_workflow_and_accepts_each_task_once(
    dsn: str, tmp_path: Path, fault_log: FaultLog
) -> None:
    total, min_kills = scale(150, 400), scale(20, 60)
    tasks = total * len(DIAMOND.tasks)
    rng = random.Random(20240607)
    create_handler_runs(dsn)

    with driver(dsn) as wc, Fleet(dsn, tmp_path) as fleet:
        wc.register_workflow(DIAMOND)
        slots = [fleet.spawn() for _ in range(3)]
        feeder = Feeder(wc, DIAMOND, total, seconds=min_kills * 0.3)
        feeder.start()
        kills = 0
        deadline = time.monotonic() + 120
        while (kills < min_kills or feeder.is_alive()) and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 0.4))
            slot = rng.randrange(len(slots))
            kills += fleet.kill(slots[slot])
            slots[slot] = fleet.spawn()
        fault_log.record_fault("sigkill", kills)
        feeder.finish()
        fault_log.record_workflows(total)
        states = wait_until_finished(dsn, total, timeout=90)
        crashed = fleet.crashed()

    assert crashed == [], "a worker must survive every fault but SIGKILL"
    assert kills >= min_kills
    assert states == {"COMPLETED": total}
    completed = fetch(
        dsn,
        f"SELECT count(*), count(DISTINCT (workflow_instance_id, task_id)) FROM {SCHEMA}.task_executions"
        " WHERE state = 'COMPLETED'",
    )
    assert completed == [(tasks, tasks)], "each task has exactly one COMPLETED execution"
    runs = fetch_value(dsn, "SELECT count(*) FROM public.handler_runs")
    assert runs >= tasks, "every accepted result came from a handler run"
    unseen = fetch_value(
        dsn,
        f"SELECT count(*) FROM {SCHEMA}.task_executions e WHERE e.state = 'COMPLETED' AND NOT EXISTS"
        " (SELECT 1 FROM public.handler_runs r WHERE r.execution_id = e.execution_id)",
    )
    assert unseen == 0
    lapsed = fetch_value(dsn, f"SELECT count(*) FROM {SCHEMA}.events WHERE event_type = 'TASK_LEASE_EXPIRED'")
    assert lapsed > 0, "no kill caught a worker holding a lease: the storm tested nothing"
    print(f"\n{kills} SIGKILLs: {runs} handler runs for {tasks} tasks, {lapsed} lapsed leases reclaimed")
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


# -- 2. SIGSTOP past the lease ------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_frozen_past_its_lease_has_its_late_completion_refused(
    dsn: str, tmp_path: Path, fault_log: FaultLog
) -> None:
    create_handler_runs(dsn)
    with driver(dsn) as wc, Fleet(dsn, tmp_path) as fleet:
        wc.register_workflow(SOLO)
        # long enough that the test freezes the worker inside the handler, not after it
        instance = wc.start_workflow(StartWorkflowRequest(NAMESPACE, "solo", "frozen", {"sleep_ms": 800}))
        frozen = fleet.spawn()
        wait_for(
            "the first worker to start the handler",
            lambda: fetch(dsn, "SELECT 1 FROM public.handler_runs WHERE pid = %s", (frozen.pid,)) != [],
        )
        freeze_between_transactions(dsn, frozen)
        fault_log.record_fault("sigstop")
        try:
            taker = fleet.spawn()
            wait_for(
                "the second worker to complete the workflow",
                lambda: fleet.crashed() != [] or states_by_count(dsn) == {"COMPLETED": 1},
            )
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        assert fleet.crashed() == [], "a worker must survive every fault but SIGKILL"
        (execution,) = wc.list_tasks(instance.instance_id)
        wait_for(
            "the thawed worker to drop its result",
            lambda: f"dropping the result of execution {execution.execution_id}" in frozen.output(),
            timeout=15,
        )
        frozen_counters, taker_counters = fleet.stop(frozen, taker)
        fault_log.record_workflows(1)

    assert execution.state is TaskState.COMPLETED
    assert execution.lease_holder == taker.worker_id
    assert execution.fence_token == 2
    assert execution.output == {"pid": taker.pid}
    completions = fetch_value(
        dsn,
        f"SELECT count(*) FROM {SCHEMA}.events WHERE workflow_instance_id = %s"
        " AND event_type = 'TASK_COMPLETED'",
        (instance.instance_id,),
    )
    assert completions == 1
    runners = fetch(dsn, "SELECT pid FROM public.handler_runs ORDER BY at")
    assert runners == [(frozen.pid,), (taker.pid,)], "both ran the handler; only one result counts"
    assert (frozen_counters["completed"], frozen_counters["dropped"]) == (0, 1), frozen.output()[-3000:]
    assert (taker_counters["completed"], taker_counters["dropped"]) == (1, 0), taker.output()[-3000:]
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


# -- 3. pg_terminate_backend --------------------------------------------------------------------------


@pytest.mark.slow
def test_workers_recover_when_their_backends_are_terminated_mid_run(
    dsn: str, tmp_path: Path, fault_log: FaultLog
) -> None:
    total, min_rounds = scale(60, 200), scale(6, 20)
    create_handler_runs(dsn)
    with driver(dsn) as wc, Fleet(dsn, tmp_path) as fleet:
        wc.register_workflow(DIAMOND)
        workers = [fleet.spawn() for _ in range(2)]
        wait_for("both workers to connect", lambda: engine_backends(dsn) >= 4)
        feeder = Feeder(wc, DIAMOND, total, seconds=min_rounds * 0.5)
        feeder.start()
        rounds = terminated = listeners = 0
        deadline = time.monotonic() + 90
        with psycopg.connect(dsn, autocommit=True, application_name=DRIVER_APP) as admin:
            while (rounds < min_rounds or feeder.is_alive()) and time.monotonic() < deadline:
                time.sleep(0.5)
                killed = admin.execute(TERMINATE_ENGINE_BACKENDS, (ENGINE_APP,)).fetchall()
                rounds += 1
                terminated += len(killed)
                listeners += sum(1 for _, listener, _ in killed if listener)
        fault_log.record_fault("pg_terminate_backend", terminated)
        feeder.finish()
        fault_log.record_workflows(total)
        faults_ended = time.monotonic()
        states = wait_until_finished(dsn, total, timeout=90)
        recovery = time.monotonic() - faults_ended
        counters = fleet.stop(*workers)
        crashed = fleet.crashed()

    print(
        f"\n{rounds} rounds terminated {terminated} engine backends ({listeners} LISTEN backends);"
        f" the last workflows finished {recovery:.1f}s after the last round"
    )
    assert crashed == [], "a worker must survive every fault but SIGKILL"
    assert rounds >= min_rounds
    assert terminated >= rounds, "most rounds found engine backends to terminate"
    assert listeners >= 1, "the LISTEN backends were among those terminated"
    assert sum(c.get("listener_reconnects", 0) for c in counters) >= 1, counters
    assert states == {"COMPLETED": total}
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


#: how soon an idle worker must take new work after losing its connections (a healthy path needs well
#: under a second: the listener reconnects at once and the poll interval is 0.1 s)
RESUME_WITHIN = 8.0


@pytest.mark.slow
def test_idle_worker_takes_new_work_within_seconds_after_its_pooled_connections_are_killed(
    dsn: str, tmp_path: Path, fault_log: FaultLog
) -> None:
    create_handler_runs(dsn)
    # a fixed-size pool (min_size = max_size = 7) keeps every connection open, as many deployments do
    with driver(dsn) as wc, Fleet(dsn, tmp_path, pool_min=7) as fleet:
        wc.register_workflow(SOLO)
        worker = fleet.spawn()
        wait_for("the worker to open its whole pool", lambda: engine_backends(dsn) >= 7)
        wc.start_workflow(StartWorkflowRequest(NAMESPACE, "solo", "before-the-kill"))
        wait_for("the first workflow to complete", lambda: states_by_count(dsn) == {"COMPLETED": 1})
        with psycopg.connect(dsn, autocommit=True, application_name=DRIVER_APP) as admin:
            killed = admin.execute(TERMINATE_ENGINE_BACKENDS, (ENGINE_APP,)).fetchall()
        fault_log.record_fault("pg_terminate_backend", len(killed))
        fault_log.record_workflows(2)
        began = time.monotonic()
        wc.start_workflow(StartWorkflowRequest(NAMESPACE, "solo", "after-the-kill"))
        try:
            wait_for(
                f"the idle worker to complete new work within {RESUME_WITHIN:.0f}s of losing"
                f" its {len(killed)} connections",
                lambda: states_by_count(dsn) == {"COMPLETED": 2},
                timeout=RESUME_WITHIN,
            )
        except AssertionError as exc:
            worker.proc.send_signal(signal.SIGUSR1)  # the worker prints its threads' stacks
            time.sleep(0.3)
            stuck = "Current thread" + worker.output().rpartition("Current thread")[2]
            raise AssertionError(f"{exc}; its poll loop is waiting in:\n{stuck[:2500]}") from None
        print(f"\nthe worker took new work {time.monotonic() - began:.1f}s after {len(killed)} backends died")
        assert fleet.crashed() == []

    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


# -- 4. PostgreSQL restart ----------------------------------------------------------------------------


@pytest.fixture
def private_server() -> Iterator[EmbeddedPostgres]:
    """Yield an embedded server of this test's own, which it may crash and restart."""
    try:
        postgres_bin_dir()
    except ImportError as exc:
        pytest.skip(str(exc))
    settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    with EmbeddedPostgres(settings=settings) as server:
        yield server


@pytest.mark.slow
def test_workers_and_pool_recover_from_an_immediate_postgres_restart(
    private_server: EmbeddedPostgres, tmp_path: Path, fault_log: FaultLog
) -> None:
    dsn = private_server.dsn()
    migrate(dsn)
    create_handler_runs(dsn)
    half, restarts = scale(40, 150), scale(1, 3)
    with driver(dsn, min_size=2) as wc, Fleet(dsn, tmp_path) as fleet:
        wc.register_workflow(DIAMOND)
        wc.start_workflows(requests(DIAMOND, "before", half))
        workers = [fleet.spawn() for _ in range(2)]
        restarted = time.monotonic()
        for i in range(restarts):
            goal = half * (i + 1) // (restarts + 1)
            wait_for(
                f"{goal} workflows to complete before restart {i + 1}",
                lambda: states_by_count(dsn).get("COMPLETED", 0) >= goal,  # noqa: B023 - called right here
            )
            private_server.restart(mode="immediate")
            fault_log.record_fault("pg_restart")
            restarted = time.monotonic()
        # the host's pool replaces the connections the crash killed without being told to
        wc.start_workflows(requests(DIAMOND, "after", half))
        fault_log.record_workflows(2 * half)
        states = wait_until_finished(dsn, 2 * half, timeout=120)
        recovery = time.monotonic() - restarted
        counters = fleet.stop(*workers)
        crashed = fleet.crashed()
    print(f"\n{restarts} immediate restart(s); every workflow finished {recovery:.1f}s after the last")

    assert crashed == [], "a worker must survive every fault but SIGKILL"
    assert states == {"COMPLETED": 2 * half}, counters
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations


# -- 5. ambiguous commit ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "committed"),
    [
        pytest.param("after_commit", True, id="reply-to-commit-lost"),
        pytest.param("before_commit", False, id="commit-never-arrived"),
    ],
)
def test_completion_retried_after_a_cut_commit_is_accepted_exactly_once(
    mode: CutMode,
    committed: bool,
    dsn: str,
    pool: ConnectionPool[psycopg.Connection[Any]],
    engine_config: EngineConfig,
    fault_log: FaultLog,
) -> None:
    wc = WorkflowCoordinator(pool, engine_config)
    tc = TaskCoordinator(pool, engine_config, engine=wc.engine)
    wc.register_workflow(SOLO)
    instance = wc.start_workflow(StartWorkflowRequest(NAMESPACE, "solo", f"cut-{mode}"))
    worker = uuid.uuid4()
    (leased,) = tc.poll_tasks(worker)
    server = conninfo.conninfo_to_dict(dsn)

    with FaultProxy(str(server.get("host") or "127.0.0.1"), int(server.get("port") or 5432)) as proxy:
        proxied = psycopg.connect(proxy.dsn(dsn), autocommit=True)
        try:
            proxy.arm(mode)
            # the host's own transaction: its COMMIT is the one the proxy cuts
            with pytest.raises(psycopg.OperationalError), proxied.transaction():
                tc.complete_task(leased.execution_id, worker, leased.fence_token, "first", conn=proxied)
        finally:
            proxied.close()
        fault_log.record_fault("ambiguous_commit")
        if committed:
            assert proxy.cut.wait(10), "the server never answered the forwarded COMMIT"

    (seen,) = wc.list_tasks(instance.instance_id)
    assert seen.state is (TaskState.COMPLETED if committed else TaskState.RUNNING)

    retried = tc.complete_task(leased.execution_id, worker, leased.fence_token, "retry")
    assert retried.state is TaskState.COMPLETED
    assert (retried.lease_holder, retried.fence_token) == (worker, leased.fence_token)
    assert retried.output == ("first" if committed else "retry"), "a repeat never overwrites a result"
    fault_log.record_workflows(1)
    completions = fetch_value(
        dsn,
        f"SELECT count(*) FROM {SCHEMA}.events WHERE workflow_instance_id = %s"
        " AND event_type = 'TASK_COMPLETED'",
        (instance.instance_id,),
    )
    assert completions == 1
    assert [t.state for t in wc.list_tasks(instance.instance_id)] == [TaskState.COMPLETED]
    assert wc.get_workflow(instance.instance_id).state is WorkflowState.COMPLETED
    report = fault_log.check(dsn, require_finished=True)
    assert report.ok, report.violations
