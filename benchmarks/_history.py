"""History: does a task cost more when the tables already hold a million finished executions?"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass

import psycopg

from orchestrator_engine import (
    EngineConfig,
    StartWorkflowRequest,
    TaskCoordinator,
    WorkflowCoordinator,
    create_pool,
)

from ._env import vacuum_analyze
from ._shapes import NAMESPACE, TASK_TYPE, single
from ._sql import bench_queries

#: rows generated per statement; one transaction per chunk keeps WAL and memory bounded
CHUNK = 100_000
#: cycles run on one schema before switching to the other, so drift (checkpoints) hits both alike
BLOCK = 50


def populate(config: EngineConfig, rows: int) -> None:
    """Fill the schema with ``rows`` finished single-task workflows, their executions and events."""
    with create_pool(config, min_size=1, max_size=1) as pool:
        WorkflowCoordinator(pool, config).register_workflow(single())
    q = bench_queries(config.schema)
    with psycopg.connect(config.dsn, autocommit=True) as conn:
        for first in range(1, rows + 1, CHUNK):
            params = {
                "first": first,
                "last": min(first + CHUNK - 1, rows),
                "namespace": NAMESPACE,
                "workflow_name": single().name,
            }
            with conn.transaction():
                for name in ("history_instances", "history_executions", "history_events"):
                    conn.execute(q[name], params)
    vacuum_analyze(config.dsn, config.schema)


@dataclass(frozen=True)
class History:
    empty_ms: float
    full_ms: float
    start_empty_ms: float
    start_full_ms: float
    rows: int
    cycles: int

    @property
    def ratio(self) -> float:
        return self.full_ms / self.empty_ms


def add_backlog(config: EngineConfig, count: int) -> None:
    """Queue ``count`` ready workflows that stay queued: each cycle then serves the oldest and adds one."""
    with create_pool(config, min_size=1, max_size=1) as pool:
        workflows = WorkflowCoordinator(pool, config)
        requests = [
            StartWorkflowRequest(NAMESPACE, single().name, f"backlog-{i}", {"i": i}) for i in range(count)
        ]
        for i in range(0, count, 500):
            workflows.start_workflows(requests[i : i + 500])
    vacuum_analyze(config.dsn, config.schema)


def compare(empty: EngineConfig, full: EngineConfig, rows: int, cycles: int) -> History:
    """Time ``cycles`` start + poll + complete cycles on each schema; medians in ms."""
    timings = {empty.schema: _Cycler(empty), full.schema: _Cycler(full)}
    try:
        for cycler in timings.values():
            cycler.run(BLOCK, record=False)  # warm caches and prepared statements
        done, order = 0, list(timings.values())
        while done < cycles:
            n = min(BLOCK, cycles - done)
            for cycler in order:
                cycler.run(n)
            order.reverse()  # neither schema always goes first after the other's block
            done += n
    finally:
        for cycler in timings.values():
            cycler.close()
    e, f = timings[empty.schema], timings[full.schema]
    return History(
        empty_ms=statistics.median(e.task_s) * 1000,
        full_ms=statistics.median(f.task_s) * 1000,
        start_empty_ms=statistics.median(e.start_s) * 1000,
        start_full_ms=statistics.median(f.start_s) * 1000,
        rows=rows,
        cycles=cycles,
    )


class _Cycler:
    """One schema's start -> poll -> complete loop, timing the start and the acquire+complete apart."""

    def __init__(self, config: EngineConfig) -> None:
        self.pool = create_pool(config, min_size=2, max_size=2)
        self.workflows = WorkflowCoordinator(self.pool, config)
        self.workflows.register_workflow(single())
        self.tasks = TaskCoordinator(self.pool, config)
        self.worker_id = uuid.uuid4()
        self.start_s: list[float] = []
        self.task_s: list[float] = []
        self._n = _run_ids_used(config)

    def run(self, n: int, *, record: bool = True) -> None:
        for _ in range(n):
            self._n += 1
            t0 = time.perf_counter()
            self.workflows.start_workflow(
                StartWorkflowRequest(NAMESPACE, single().name, f"cycle-{self._n}", {"i": self._n})
            )
            t1 = time.perf_counter()
            leased = self.tasks.poll_tasks(self.worker_id, task_types=[TASK_TYPE], limit=1)
            if len(leased) != 1:
                raise RuntimeError(f"expected to lease one task, got {len(leased)}")
            self.tasks.complete_task(leased[0].execution_id, self.worker_id, leased[0].fence_token, None)
            t2 = time.perf_counter()
            if record:
                self.start_s.append(t1 - t0)
                self.task_s.append(t2 - t1)

    def close(self) -> None:
        self.pool.close()


def _run_ids_used(config: EngineConfig) -> int:
    """Return how many cycles earlier comparisons ran on this schema, so run ids never repeat."""
    with psycopg.connect(config.dsn, autocommit=True) as conn:
        row = conn.execute(bench_queries(config.schema)["history_cycles_run"]).fetchone()
    return 0 if row is None else int(row[0])
