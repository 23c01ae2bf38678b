"""Throughput workloads: the raw commit ceiling, starting workflows, and draining them with workers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from orchestrator_engine import EngineConfig, WorkflowCoordinator, WorkflowDefinition
from orchestrator_engine.coordinators.workflow import _start_plan, start_one_parameters
from orchestrator_engine.sql import native_queries

from ._env import drop_schema
from ._fleet import WorkerSpec, run_workers
from ._shapes import requests
from ._sql import bench_queries

#: a drain that has not finished by then is reported as broken, not as slow
DRAIN_TIMEOUT_S = 900.0


def commit_ceiling(dsn: str, schema: str, connections: int, seconds: float) -> float:
    """Return single-row autocommit UPDATEs per second over ``connections`` threads, each on its own row."""
    drop_schema(dsn, schema)
    q = bench_queries(schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(q["baseline_create"])
        conn.execute(q["baseline_fill"], {"rows": connections})
    ready = threading.Barrier(connections + 1)
    stop = threading.Event()
    counts = [0] * connections

    def bump(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            ready.wait()
            n = 0
            while not stop.is_set():
                conn.execute(q["baseline_bump"], {"id": i}).fetchone()
                n += 1
            counts[i] = n

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    drop_schema(dsn, schema)
    return sum(counts) / elapsed


def start_rate(
    pool: ConnectionPool[Any],
    config: EngineConfig,
    definition: WorkflowDefinition,
    count: int,
    *,
    batch: int,
    threads: int,
) -> float:
    """Start ``count`` runs from ``threads`` threads and return runs/s.

    ``batch`` 1 means one ``start_workflow`` call (one transaction) per run, else ``start_workflows``
    calls of ``batch`` runs. Each thread takes every ``threads``-th request, and all start together.
    """
    workflows = WorkflowCoordinator(pool, config)
    workflows.register_workflow(definition)
    todo = requests(definition, count)
    shares = [todo[i::threads] for i in range(threads)]
    go = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def start(share: list[Any]) -> None:
        go.wait()
        try:
            if batch == 1:
                for request in share:
                    workflows.start_workflow(request)
            else:
                for i in range(0, len(share), batch):
                    workflows.start_workflows(share[i : i + batch])
        except BaseException as exc:  # reported below: a failed start is a broken run, not a slow one
            errors.append(exc)

    workers = [threading.Thread(target=start, args=(share,)) for share in shares]
    for t in workers:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return count / elapsed


def single_start_rates(
    call_pool: ConnectionPool[Any],
    call_config: EngineConfig,
    alone_pool: ConnectionPool[Any],
    alone_config: EngineConfig,
    definition: WorkflowDefinition,
    count: int,
    *,
    block: int = 500,
) -> tuple[float, float]:
    """Start ``count`` runs with ``start_workflow`` and ``count`` more by sending its statement alone,
    from one thread, in alternating blocks of ``block``; return both rates (runs/s).

    The statement alone is the floor under the call: the same statement (workflow_start_one, prepared,
    notifying as the call does), its parameters made beforehand by the engine's own code, sent through
    a bare cursor on one connection. What the call runs slower is the engine's Python and the pool's
    checkout around the statement. Alternating keeps a change in the machine's speed out of the ratio.
    Each runs in its own schema (``call_config``'s is drained afterwards).
    """
    calls = WorkflowCoordinator(call_pool, call_config)
    calls.register_workflow(definition)
    to_call = requests(definition, count)
    alone = WorkflowCoordinator(alone_pool, alone_config)
    alone.register_workflow(definition)
    engine = alone._engine
    query = native_queries(alone_config.schema)["workflow_start_one"]
    call_s = alone_s = 0.0
    started = 0
    with alone_pool.connection() as conn:
        stored = engine.latest_definition(conn, definition.namespace, definition.name, cached=False)
        plan = engine.start_plan(stored, _start_plan)
        channel = engine.channel if alone_config.notify else None
        values = []
        for request in requests(definition, count, prefix="statement"):
            text = engine.encode(request.input, "workflow input")
            params = start_one_parameters(request, text, stored, plan, channel)
            values.append([params[n] for n in query.names])
        with psycopg.RawCursor(conn) as cur:
            for i in range(0, count, block):
                t0 = time.perf_counter()
                for request in to_call[i : i + block]:
                    calls.start_workflow(request)
                t1 = time.perf_counter()
                for params in values[i : i + block]:
                    cur.execute(query.text, params, prepare=True)
                    started += cur.fetchone()[0] is not None  # type: ignore[index]
                t2 = time.perf_counter()
                call_s += t1 - t0
                alone_s += t2 - t1
    if started != count:  # a statement that started nothing would pass for a faster floor
        raise RuntimeError(f"the start statement started {started} of {count} runs")
    return count / call_s, count / alone_s


@dataclass(frozen=True)
class Drain:
    """What a drain did, timed by the database: first lease granted to last workflow completed."""

    tasks: int
    workflows: int
    seconds: float
    #: exceptions that killed a worker's loop during the drain (each time the worker was restarted)
    crashes: tuple[str, ...] = ()

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds

    @property
    def workflows_per_s(self) -> float:
        return self.workflows / self.seconds


def drain(config: EngineConfig, processes: int, concurrency: int) -> Drain:
    """Run ``processes`` workers until every workflow in ``config.schema`` has finished."""
    spec = WorkerSpec(dsn=config.dsn, schema=config.schema, concurrency=concurrency)
    reports = run_workers(spec, processes, lambda: wait_until_finished(config))
    window = read_window(config)
    return replace(window, crashes=tuple(c for r in reports for c in r.crashes))


def wait_until_finished(config: EngineConfig, timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Return once no workflow in the schema is open; raise after ``timeout`` seconds."""
    q = bench_queries(config.schema)
    deadline = time.monotonic() + timeout
    with psycopg.connect(config.dsn, autocommit=True) as conn:
        while True:
            busy = conn.execute(q["bench_busy"]).fetchone()
            if busy is not None and not busy[0]:
                # nothing queued or leased: confirm with the exact (and dearer) count of open workflows
                row = conn.execute(q["bench_progress"]).fetchone()
                assert row is not None
                if row[0] == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workflows in {config.schema} still open after {timeout:.0f} s")
            time.sleep(0.2)


def read_window(config: EngineConfig) -> Drain:
    with psycopg.connect(config.dsn, autocommit=True, row_factory=dict_row) as conn:
        row = conn.execute(bench_queries(config.schema)["bench_window"]).fetchone()
    assert row is not None
    if row["first_started"] is None or row["last_completed"] is None:
        raise RuntimeError(f"nothing was drained in schema {config.schema}")
    seconds = (row["last_completed"] - row["first_started"]).total_seconds()
    return Drain(tasks=row["tasks"], workflows=row["workflows"], seconds=seconds)
