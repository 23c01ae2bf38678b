"""Start latency: an idle worker, workflows started one at a time, ready -> handler start measured."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orchestrator_engine import EngineConfig, WorkflowCoordinator, create_pool

from ._env import drop_schema
from ._fleet import HandlerStart, WorkerSpec, run_workers
from ._shapes import requests, single
from ._sql import bench_queries
from ._throughput import wait_until_finished

#: workflows run before measuring, so every pooled connection has prepared its statements
WARMUP = 20
#: the idle worker's threads; it never has more than one or two tasks at a time
CONCURRENCY = 8


@dataclass(frozen=True)
class Percentiles:
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Percentiles:
        ms = sorted(s * 1000 for s in seconds)
        return cls(_quantile(ms, 0.50), _quantile(ms, 0.99), ms[-1])


def _quantile(ordered: list[float], q: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q * 100) - 1]


@dataclass(frozen=True)
class Latency:
    """Three views of one start: ready_at (DB) -> handler, ready_at -> started_at (DB), commit -> handler.

    And the path's steps, each timed on its own: the start_workflow call, then for the tasks a poll
    leased, start returned -> poll sent (NOTIFY delivery and the worker's wake-up), the poll call, poll
    returned -> handler start (None when the start leased every task to the worker: ``direct``).
    """

    ready_to_handler: Percentiles
    ready_to_lease: Percentiles
    commit_to_handler: Percentiles
    start_call: Percentiles
    commit_to_poll: Percentiles | None
    poll_call: Percentiles | None
    poll_to_handler: Percentiles | None
    samples: int
    #: how many of the samples their start leased to the idle worker (direct dispatch, no poll)
    direct: int


def measure(config: EngineConfig, count: int, gap_s: float = 0.02) -> Latency:
    """Start ``count`` single-task workflows ``gap_s`` (jittered) apart with one idle worker running."""
    spec = WorkerSpec(
        dsn=config.dsn,
        schema=config.schema,
        concurrency=CONCURRENCY,
        notify=config.notify,
        poll_interval_s=config.poll_interval.total_seconds(),
        record=True,
    )
    called: dict[int, float] = {}
    committed: dict[int, float] = {}
    rng = random.Random(8)

    def drive() -> None:
        with create_pool(config, min_size=1, max_size=1) as pool:
            workflows = WorkflowCoordinator(pool, config)
            workflows.register_workflow(single())
            todo = requests(single(), WARMUP + count)
            time.sleep(0.5)  # let the worker's listener connect: the first NOTIFY must find it
            for i, request in enumerate(todo):
                called[i] = time.time()
                workflows.start_workflow(request)
                committed[i] = time.time()
                time.sleep(gap_s * rng.uniform(0.5, 1.5))
            wait_until_finished(config, timeout=60)

    reports = run_workers(spec, 1, drive)
    starts = [s for r in reports for s in r.handler_starts if s.index >= WARMUP]
    return summarise(starts, called, committed)


def summarise(starts: list[HandlerStart], called: dict[int, float], committed: dict[int, float]) -> Latency:
    polled = [(s, s.poll_sent, s.poll_returned) for s in starts if s.poll_sent and s.poll_returned]

    def over_polled(values: list[float]) -> Percentiles | None:
        return Percentiles.of(values) if values else None

    return Latency(
        ready_to_handler=Percentiles.of([s.wall - s.ready_at for s in starts]),
        ready_to_lease=Percentiles.of([s.started_at - s.ready_at for s in starts]),
        commit_to_handler=Percentiles.of([s.wall - committed[s.index] for s in starts]),
        start_call=Percentiles.of([committed[s.index] - called[s.index] for s in starts]),
        commit_to_poll=over_polled([sent - committed[s.index] for s, sent, _ in polled]),
        poll_call=over_polled([returned - sent for _, sent, returned in polled]),
        poll_to_handler=over_polled([s.wall - returned for s, _, returned in polled]),
        samples=len(starts),
        direct=len(starts) - len(polled),
    )


def commit_floor(dsn: str, schema: str, count: int, gap_s: float = 0.02) -> Percentiles:
    """Time ``count`` one-row autocommit UPDATEs on one idle connection, ``gap_s`` (jittered) apart.

    The floor under ready -> handler start: that path holds two such commits in series (the start's
    and the poll's), each a round trip to a server woken from idle plus one WAL flush.
    """
    drop_schema(dsn, schema)
    q = bench_queries(schema)
    rng = random.Random(8)
    samples: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(q["baseline_create"])
        conn.execute(q["baseline_fill"], {"rows": 1})
        for i in range(WARMUP + count):
            t0 = time.perf_counter()
            conn.execute(q["baseline_bump"], {"id": 0}).fetchone()
            if i >= WARMUP:
                samples.append(time.perf_counter() - t0)
            time.sleep(gap_s * rng.uniform(0.5, 1.5))
    drop_schema(dsn, schema)
    return Percentiles.of(samples)
