"""Run ``Worker`` processes against one schema: ready together, released together, stopped on demand."""

from __future__ import annotations

import multiprocessing
import queue
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from orchestrator_engine import EngineConfig, create_pool
from orchestrator_engine.worker import TaskContext, Worker

from ._shapes import TASK_TYPE

#: how long worker processes may take to import, connect and open their pools
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class WorkerSpec:
    """What each worker process runs; plain data, so it crosses the process boundary."""

    dsn: str
    schema: str
    concurrency: int = 16
    notify: bool = True
    poll_interval_s: float = 1.0
    #: record each handler start (for the latency workload) instead of the bare ``lambda ctx: None``
    record: bool = False


@dataclass(frozen=True)
class HandlerStart:
    """One handler invocation seen from inside the handler (epoch seconds, both clocks on one machine)."""

    index: int
    wall: float
    ready_at: float
    started_at: float
    #: when the worker sent the poll that leased it, and when that poll returned (epoch seconds);
    #: None for a task its start leased to the worker (direct dispatch)
    poll_sent: float | None
    poll_returned: float | None


@dataclass
class WorkerReport:
    started: int = 0
    completed: int = 0
    failed: int = 0
    dropped: int = 0
    polls: int = 0
    notifications: int = 0
    handler_starts: list[HandlerStart] = field(default_factory=list)
    #: exceptions that killed a worker thread (the worker was restarted each time)
    crashes: list[str] = field(default_factory=list)
    #: CPU seconds the worker process used (all threads) from release to stop
    cpu_s: float = 0.0
    #: context switches of the worker process's threads from release to stop
    switches: int = 0


#: connections in each worker process's pool
POOL_SIZE = 6


def run_workers(
    spec: WorkerSpec,
    processes: int,
    drive: Callable[[], None],
    on_release: Callable[[list[int]], None] | None = None,
) -> list[WorkerReport]:
    """Start ``processes`` workers, release them at once, call ``drive()``, then stop them and report.

    ``on_release`` gets the worker processes' pids as they are released (a profiler can attach then).
    """
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent holds pools with live threads
    barrier = ctx.Barrier(processes + 1)
    stop = ctx.Event()
    reports: multiprocessing.Queue[WorkerReport] = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(spec, barrier, stop, reports), daemon=True)
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    out: list[WorkerReport] = []
    try:
        barrier.wait(STARTUP_TIMEOUT_S)
        if on_release is not None:
            on_release([p.pid for p in procs if p.pid is not None])
        drive()
    finally:
        stop.set()
        deadline = time.monotonic() + 60
        while len(out) < processes and time.monotonic() < deadline:
            try:
                out.append(reports.get(timeout=1))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    if len(out) < processes:
        raise RuntimeError(f"only {len(out)} of {processes} worker processes reported back")
    return out


def _worker_main(
    spec: WorkerSpec,
    barrier: Any,
    stop: Any,
    reports: multiprocessing.Queue[WorkerReport],
) -> None:
    config = EngineConfig(
        dsn=spec.dsn,
        schema=spec.schema,
        notify=spec.notify,
        poll_interval=timedelta(seconds=spec.poll_interval_s),
    )
    starts: list[HandlerStart] = []
    #: (execution id, fence token) -> (poll sent, poll returned), filled before the poll hands the
    #: tasks out; the fence tells a later grant of the same execution (after a lapse) from this one
    polls: dict[tuple[Any, int], tuple[float, float]] = {}

    def record(ctx: TaskContext) -> None:
        wall = time.time()
        e = ctx.execution
        assert e.ready_at is not None
        assert e.started_at is not None
        index = ctx.input["workflow"]["i"]
        sent, returned = polls.get((e.execution_id, e.fence_token), (None, None))
        starts.append(
            HandlerStart(index, wall, e.ready_at.timestamp(), e.started_at.timestamp(), sent, returned)
        )

    def timed_polls(worker: Worker) -> Worker:
        """Wrap the worker's poll statement to time it (the latency workload's breakdown)."""
        lease_ready = worker.tasks._lease_ready

        def timed(*args: Any, **kwargs: Any) -> Any:
            sent = time.time()
            leased = lease_ready(*args, **kwargs)
            returned = time.time()
            for e in leased:
                polls[(e.execution_id, e.fence_token)] = (sent, returned)
            return leased

        worker.tasks._lease_ready = timed  # type: ignore[method-assign]
        return worker

    handler = record if spec.record else lambda ctx: None
    crashes: list[str] = []
    crashed = threading.Event()

    def on_thread_crash(args: threading.ExceptHookArgs) -> None:
        crashes.append(f"{args.exc_type.__name__}: {args.exc_value}")
        crashed.set()

    threading.excepthook = on_thread_crash
    # the handlers use no connection: the poll loop, the completer, the heartbeat and failure reports
    # do; a handler that wrote through ctx.transaction() would need one per thread
    size = POOL_SIZE
    with create_pool(config, min_size=size, max_size=size) as pool:

        def new_worker() -> Worker:
            worker = Worker(pool, {TASK_TYPE: handler}, config=config, concurrency=spec.concurrency)
            return timed_polls(worker) if spec.record else worker

        workers = [new_worker()]
        barrier.wait(STARTUP_TIMEOUT_S)
        cpu0 = time.process_time()
        switches0 = _context_switches()
        workers[-1].start()
        while not stop.wait(0.05):
            if crashed.is_set():
                # the worker's loop died (the exception is reported); restart it as a supervisor would
                crashed.clear()
                workers.append(new_worker())
                workers[-1].start()
        workers[-1].stop(timeout=30)
        report = WorkerReport(
            handler_starts=starts,
            crashes=crashes,
            cpu_s=time.process_time() - cpu0,
            switches=_context_switches() - switches0,
        )
        for w in workers:
            s = w.stats
            report.started += s.started
            report.completed += s.completed
            report.failed += s.failed
            report.dropped += s.dropped
            report.polls += s.polls
            report.notifications += s.notifications
        reports.put(report)


def _context_switches() -> int:
    """Voluntary and involuntary context switches of this process, ended threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw
