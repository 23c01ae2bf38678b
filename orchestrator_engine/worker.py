"""Worker: poll in batches, run handlers on threads, keep leases alive, report results under the fence."""

from __future__ import annotations

import hashlib
import logging
import queue
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from . import telemetry
from .config import EngineConfig
from .coordinators import TaskCoordinator
from .coordinators._engine import Engine, notify_channel
from .coordinators._ids import as_name
from .errors import FencingError, LeaseLostError, OrchestratorError, PayloadError
from .models import TaskExecution, execution_from_row

log = logging.getLogger("orchestrator_engine.worker")

Handler = Callable[["TaskContext"], Any]
R = TypeVar("R")

#: how much of an error's message and traceback is stored with a failed attempt
MAX_ERROR_MESSAGE = 2_000
MAX_TRACEBACK = 8_000
#: after a poll that leased work, a short poll comes back this soon for this long
BUSY_REPOLL = 0.02
BUSY_WINDOW = 1.0
#: how often a result is re-sent after a dropped connection before the lease is left to lapse
RESULT_RETRIES = 8
#: results waiting for their group commit may hold this many times ``concurrency`` leases in all
PIPELINE_DEPTH = 2
#: an idle worker rewrites its waiting_workers row this often (a start takes only one seen in the last
#: ten seconds, so a frozen worker stops getting tasks soon), and wakes at least this often meanwhile
WAIT_REFRESH = 3.0
#: and rewrites it no more often than this when its free slots change
WAIT_MIN_GAP = 0.1
#: tries (50 ms apart) to take the advisory lock that shows a worker's listener is alive
LOCK_TRIES = 20
#: WorkerStats keeps at least this many of the latest ready -> started latencies, at most twice as many
LATENCY_WINDOW = 10_000
#: guards the first use of a TaskContext's lease_lost event (made lazily)
_LEASE_LOST_LOCK = threading.Lock()


@dataclass
class WorkerStats:
    """Counters a worker keeps about itself."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    dropped: int = 0
    polls: int = 0
    notifications: int = 0
    listener_reconnects: int = 0
    #: tasks a start leased to this worker directly (no poll)
    direct: int = 0
    #: ready -> started, in seconds, of the latest tasks this worker was leased: the oldest are dropped
    #: once there are 2 x LATENCY_WINDOW, so that a worker that runs for months does not keep one
    #: number per task (a list, so reading it while the worker appends never raises)
    start_latencies: list[float] = field(default_factory=list)


class TaskContext:
    """What a handler gets: the leased execution, its input, and ways to keep or use the lease."""

    def __init__(self, worker: Worker, execution: TaskExecution) -> None:
        self._worker = worker
        self.execution = execution
        self._lease_lost: threading.Event | None = None  # made on first use: most tasks never ask
        self.output: Any = None
        self._completed_in_transaction = False

    @property
    def lease_lost(self) -> threading.Event:
        """Set when this lease is lost (a renewal refused, a stale fence): check it or wait on it."""
        event = self._lease_lost
        if event is None:
            with _LEASE_LOST_LOCK:
                if self._lease_lost is None:
                    self._lease_lost = threading.Event()
                event = self._lease_lost
        return event

    def _lost(self) -> bool:
        """Tell whether the lease is known lost, without making the event."""
        event = self._lease_lost
        return event is not None and event.is_set()

    @property
    def input(self) -> Any:
        return self.execution.input

    @property
    def attempt(self) -> int:
        return self.execution.attempt_number

    @property
    def fence_token(self) -> int:
        return self.execution.fence_token

    @property
    def task_id(self) -> str:
        return self.execution.task_id

    def heartbeat(self) -> bool:
        """Renew this lease now; return False (and set ``lease_lost``) when it is no longer held."""
        held = self._worker.tasks.renew_lease(self.execution.execution_id, self._worker.worker_id)
        if not held:
            self.lease_lost.set()
        return held

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """Yield a connection whose transaction also records this task's completion under the fence.

        Write your database effects through the yielded connection and set ``ctx.output`` inside the
        block. On a clean exit the completion is recorded in the same transaction; if the fence is stale,
        everything rolls back (LeaseLostError), so the effects happen exactly once.
        """
        with self._worker.pool.connection() as conn, conn.transaction():
            yield conn
            try:
                self._worker.tasks.complete_task(
                    self.execution.execution_id,
                    self._worker.worker_id,
                    self.execution.fence_token,
                    self.output,
                    conn=conn,
                )
            except FencingError as exc:
                self.lease_lost.set()
                raise LeaseLostError(str(exc)) from exc
        self._completed_in_transaction = True


class Worker:
    """Run handlers for task types; ``run()`` blocks, ``start()``/``stop()`` run it in the background.

    ``handlers`` maps task type -> callable(TaskContext) returning a JSON value. Results are reported
    with the lease's fence token; a handler runs at least once per task and its result is accepted once.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        handlers: Mapping[str, Handler],
        *,
        namespace: str | None = None,
        concurrency: int = 4,
        config: EngineConfig | None = None,
        worker_id: UUID | str | None = None,
    ) -> None:
        if not handlers:
            raise ValueError("a worker needs at least one handler")
        for task_type, handler in handlers.items():
            if not isinstance(task_type, str) or not callable(handler):
                raise TypeError("handlers must map task type strings to callables")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive int, got {concurrency!r}")
        self.pool = pool
        if config is None:
            conninfo = pool.conninfo
            config = EngineConfig(dsn=conninfo if isinstance(conninfo, str) else conninfo())
        self.config = config
        self.handlers = dict(handlers)
        self.namespace = namespace
        self.concurrency = concurrency
        self.worker_id = uuid.uuid4() if worker_id is None else UUID(str(worker_id))
        self.tasks = TaskCoordinator(pool, self.config, engine=Engine(pool, self.config))
        self.stats = WorkerStats()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        #: leased executions whose outcome is not recorded yet (handler running or result queued)
        self._inflight: dict[UUID, TaskContext] = {}
        #: handlers running now; a handler's slot frees when it returns, before its result commits
        self._busy = 0
        self._inflight_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._shutdown_timeout = 30.0
        self._gauge: Any = None
        self._completer = _GroupCompleter(self)
        # direct dispatch (migration 0007): starts lease tasks to this worker while it waits idle
        self._direct = self.config.notify and self.config.direct_dispatch
        self._channel = f"orchestrator_worker_{self.worker_id.hex}"
        self._lock_key = worker_lock_key(self.worker_id)
        #: direct grants handed out in this run (id -> when): each is handed out once, however it is
        #: found (told, adopted); forgotten once its lease would have lapsed
        self._direct_seen: dict[UUID, float] = {}
        #: whether this run has written its waiting_workers row yet (the grants it has seen since are
        #: stats.direct)
        self._waited = False
        #: set while the listener holds the lock (starts may take this worker); cleared when it drops
        self._listening = threading.Event()
        #: look for leases held but not known (grants whose notification was lost) on the next round
        self._adopt = threading.Event()
        #: what the waiting_workers row says (None: no row written by this run), and when it was written
        self._waiting: int | None = None
        self._waiting_at = float("-inf")
        #: the running worker's handler threads (the listener hands direct grants to them)
        self._handlers: _HandlerThreads | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self, *, shutdown_timeout: float = 30.0) -> None:
        """Work until ``stop()`` or SIGTERM/SIGINT, then drain running handlers for up to the timeout."""
        self._shutdown_timeout = shutdown_timeout
        restore = self._install_signal_handlers()
        handlers = _HandlerThreads(self._execute, self.concurrency)
        self._handlers = handlers
        helpers = [
            threading.Thread(target=self._heartbeat_loop, name="orchestrator-heartbeat", daemon=True),
        ]
        completer = threading.Thread(target=self._completer.run, name="orchestrator-completer", daemon=True)
        completer.start()
        if self.config.notify:
            helpers.append(
                threading.Thread(target=self._listen_loop, name="orchestrator-listener", daemon=True)
            )
        for t in helpers:
            t.start()
        self._gauge = telemetry.observe_queue_depth(self, self.namespace, self._queue_depth)
        log.info(
            "worker %s started: types=%s concurrency=%d",
            self.worker_id,
            sorted(self.handlers),
            self.concurrency,
        )
        try:
            self._poll_loop(handlers)
        finally:
            self._stopping.set()
            self._drain(self._shutdown_timeout)
            with self._inflight_lock:
                self._handlers = None  # a grant the listener reads from now on is left to lapse (one
                # it checked just before is queued behind the threads' ends and lapses too)
            handlers.close()
            self._completer.close()
            completer.join(timeout=5)
            self._done.set()  # releases the heartbeat thread at once
            telemetry.forget_queue_depth(self)
            for t in helpers:
                t.join(timeout=2)
            restore()
            log.info("worker %s stopped: %s", self.worker_id, self._summary())

    def start(self) -> Worker:
        """Run the worker on a background thread and return it."""
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self.run, name="orchestrator-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work, wait up to ``timeout`` s for running handlers, then return."""
        self._shutdown_timeout = timeout
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 5)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running_count(self) -> int:
        """Leased executions whose outcome is not recorded yet: running, or waiting for their commit."""
        with self._inflight_lock:
            return len(self._inflight)

    def _free_slots(self) -> int:
        """Handler slots free now, bounded so queued results never hold too many leases at once."""
        with self._inflight_lock:
            return min(self.concurrency - self._busy, PIPELINE_DEPTH * self.concurrency - len(self._inflight))

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("worker %s received signal %d: draining", self.worker_id, signum)
            self._stopping.set()
            self._wake.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.running_count and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.running_count:
            log.warning(
                "worker %s left %d handlers running; their leases will lapse",
                self.worker_id,
                self.running_count,
            )

    def _queue_depth(self) -> int | None:
        if self._done.is_set():
            return None  # a stopped worker reports nothing; the gauge cannot be unregistered
        try:
            with self.pool.connection(timeout=1.0) as conn:
                return self.tasks.engine.repos.maintenance.maintenance_ready_depth(conn, self.namespace)
        except Exception:  # a metrics callback must never break the exporter
            log.debug("worker %s could not read the queue depth", self.worker_id, exc_info=True)
            return None

    def _summary(self) -> str:
        s = self.stats
        return f"started={s.started} completed={s.completed} failed={s.failed} dropped={s.dropped}"

    # -- polling ---------------------------------------------------------------------------------

    def _poll_loop(self, handlers: _HandlerThreads) -> None:
        backoff = 0.05
        last_work = float("-inf")
        types = [as_name(t, "task_type") for t in sorted(self.handlers)]
        if self.namespace is not None:
            as_name(self.namespace, "namespace")
        interval = self.config.poll_interval.total_seconds()
        while not self._stopping.is_set():
            # cleared before the slots are counted: a slot freed from here on sets it again (_nudge)
            self._wake.clear()
            if self._adopt.is_set():
                self._take_grants(handlers)
            free = self._free_slots()
            if free <= 0:
                self._wake.wait(interval)
                continue
            try:
                leased = self.tasks._lease_ready(self.worker_id, self.namespace, types, min(free, 1000))
                backoff = 0.05
            except (psycopg.Error, OrchestratorError) as exc:
                # connection trouble or an engine refusal: a worker keeps polling, with backoff
                log.warning(
                    "worker %s poll failed (%s); retrying in %.2fs",
                    self.worker_id,
                    type(exc).__name__,
                    backoff,
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self.stats.polls += 1
            for execution in leased:
                self._hand_out(execution, handlers)
            try:
                self.tasks._reclaim_if_due()  # after the hand-off: never between ready and handler start
            except (psycopg.Error, OrchestratorError) as exc:
                log.warning("worker %s lease reclaim failed (%s)", self.worker_id, type(exc).__name__)
            now = time.monotonic()
            if leased:
                last_work = now
            if self._direct:
                self._wait_for_grants(drained=len(leased) < free, types=types)
            if len(leased) < free:
                # Queue drained: sleep until NOTIFY, a free slot, or the backstop. Right after work was
                # flowing, re-poll soon instead: another poller holding a hot instance can make a poll
                # come back short while ready tasks remain, and their NOTIFY has already been spent.
                idle = min(interval, WAIT_REFRESH) if self._waiting else interval
                self._wake.wait(BUSY_REPOLL if now - last_work < BUSY_WINDOW else idle)
        if self._direct:
            self._leave(handlers)

    def _hand_out(self, execution: TaskExecution, handlers: _HandlerThreads, *, direct: bool = False) -> None:
        """Give a leased execution to a handler thread (a direct grant once, however often it is found)."""
        ctx = TaskContext(self, execution)
        with self._inflight_lock:
            if direct:
                if execution.execution_id in self._direct_seen or self._handlers is not handlers:
                    return  # told on the channel and found by adopting too; or the worker has stopped
                self._direct_seen[execution.execution_id] = time.monotonic()
                self.stats.direct += 1
                if self._waiting:
                    self._waiting -= 1  # the start took one of the slots the row offered
            self._inflight[execution.execution_id] = ctx
            self._busy += 1
            busy = self._busy
            self.stats.started += 1
        handlers.submit(ctx, busy)
        telemetry.count("orchestrator.tasks.started", 1, task_type=execution.task_type)
        if execution.ready_at is not None and execution.started_at is not None:
            latency = (execution.started_at - execution.ready_at).total_seconds()
            latencies = self.stats.start_latencies
            latencies.append(latency)
            if len(latencies) > 2 * LATENCY_WINDOW:
                del latencies[:-LATENCY_WINDOW]  # amortised: once per LATENCY_WINDOW tasks
            telemetry.record_seconds(
                "orchestrator.tasks.ready_to_start", latency, task_type=execution.task_type
            )

    # -- direct dispatch -------------------------------------------------------------------------

    def _take_grants(self, handlers: _HandlerThreads) -> None:
        """Adopt: hand out the tasks starts leased to this worker that it was not told of (or not yet)."""
        self._adopt.clear()
        forget = time.monotonic() - 2 * self.config.lease_duration.total_seconds()
        with self._inflight_lock:
            for eid, at in list(self._direct_seen.items()):
                if at < forget and eid not in self._inflight:  # a long task's lease is renewed
                    del self._direct_seen[eid]
        repos = self.tasks.engine.repos
        try:
            with self.tasks.engine.single() as c:
                # a grant told while the listener was away: its lease is held, nobody else runs it
                held = repos.workers.worker_held(c, self.worker_id)
                with self._inflight_lock:
                    ids = [i for i in held if i not in self._direct_seen]
                rows = repos.workers.worker_granted(c, self.worker_id, ids) if ids else []
        except (psycopg.Error, OrchestratorError) as exc:
            # looked for again on the next round; a lease nobody runs lapses and is reclaimed
            log.warning("worker %s could not read its granted tasks (%s)", self.worker_id, type(exc).__name__)
            self._adopt.set()
            self._stopping.wait(0.05)
            return
        for row in rows:
            self._hand_out(execution_from_row(row), handlers, direct=True)

    def _on_grant(self, conn: psycopg.Connection[Any], payload: str) -> None:
        """Take a grant's notification; a payload that is not an execution id (anyone may NOTIFY on
        the channel) is logged and dropped, and the listener goes on."""
        try:
            execution_id = UUID(payload)
        except ValueError:
            log.warning("worker %s ignored a notification that names no execution", self.worker_id)
            return
        self._receive_grant(conn, execution_id)

    def _receive_grant(self, conn: psycopg.Connection[Any], execution_id: UUID) -> None:
        """On the listener's thread and connection, awake from delivering the notification: read the
        granted execution and hand it out at once (the poll loop stays out of the task's path)."""
        handlers = self._handlers
        with self._inflight_lock:
            if handlers is None or execution_id in self._direct_seen:
                return  # stopped (the lease lapses), or handed out already
        # a failure here drops the listener's connection: it reconnects and adopts what it holds
        for row in self.tasks.engine.repos.workers.worker_granted(conn, self.worker_id, [execution_id]):
            self._hand_out(execution_from_row(row), handlers, direct=True)

    def _wait_for_grants(self, *, drained: bool, types: list[str]) -> None:
        """Keep this worker's waiting_workers row true: free slots while the queue is dry, else none."""
        if not self._listening.is_set():
            self._waiting = None  # rewritten once the listener holds its lock again
            return
        # free slots while the queue is dry; none while polls keep it busy (direct grants are for idle
        # workers). Rewritten when that changes, at most every WAIT_MIN_GAP (a worker whose queue runs
        # dry between polls under load would otherwise commit after most polls), and every WAIT_REFRESH.
        free = max(self._free_slots(), 0) if drained else 0
        age = time.monotonic() - self._waiting_at
        if free == self._waiting and age < WAIT_REFRESH:
            return
        if self._waiting is not None and age < WAIT_MIN_GAP:
            return
        if free == 0 and not self._waiting:
            return  # nothing offered, nothing to take back
        repos = self.tasks.engine.repos
        try:
            with self.tasks.engine.single() as c:
                repos.workers.worker_wait(
                    c,
                    worker_id=self.worker_id,
                    namespace=self.namespace,
                    task_types=types,
                    free=free,
                    seen=self.stats.direct,
                    fresh=not self._waited,
                    lease=self.config.lease_duration,
                    lock_key=self._lock_key,
                    channel=self._channel,
                )
            refreshed = time.monotonic() - self._waiting_at >= WAIT_REFRESH
            self._waiting, self._waiting_at, self._waited = free, time.monotonic(), True
            if refreshed:
                # now and then: a grant whose notification never came (an old driver's, say) runs
                self._adopt.set()
                with self.tasks.engine.single() as c:
                    repos.workers.worker_forget_dead(c, self.worker_id)
        except (psycopg.Error, OrchestratorError) as exc:
            log.warning("worker %s could not update its wait (%s)", self.worker_id, type(exc).__name__)
            self._waiting = None

    def _leave(self, handlers: _HandlerThreads) -> None:
        """Stop taking direct grants, then hand out any made before: they run in the drain."""
        try:
            with self.tasks.engine.single() as c:
                self.tasks.engine.repos.workers.worker_leave(c, self.worker_id)
        except (psycopg.Error, OrchestratorError) as exc:
            # the row stays; starts stop taking this worker once its listener connection closes
            log.warning("worker %s could not leave the waiting list (%s)", self.worker_id, type(exc).__name__)
            return
        self._waiting = None
        self._adopt.set()
        self._take_grants(handlers)

    # -- running one task ------------------------------------------------------------------------

    def _execute(self, ctx: TaskContext) -> None:
        """Run one handler; its slot frees once everything here is done, the span included."""
        execution = ctx.execution
        queued = False
        try:
            with telemetry.span(
                "orchestrator.task",
                execution_id=execution.execution_id,
                instance_id=execution.workflow_instance_id,
                task_id=execution.task_id,
                task_type=execution.task_type,
                attempt=execution.attempt_number,
                kind=execution.kind.value,
            ):
                queued = self._execute_in_span(ctx)
        finally:
            # only now is this thread free for the next handler (_HandlerThreads counts on it)
            with self._inflight_lock:
                self._busy -= 1
                if not queued:
                    self._forget(execution.execution_id)
            self._nudge()

    def _execute_in_span(self, ctx: TaskContext) -> bool:
        """Run the handler and dispose of its outcome; True when the result went to the completer."""
        execution = ctx.execution
        handler = self.handlers[execution.task_type]
        try:
            result = handler(ctx)
        except LeaseLostError:
            self._drop(ctx, "the fence was stale when completing in the handler's transaction")
            return False
        except Exception as exc:
            self._report_failure(ctx, _error_of(exc))
            return False
        if ctx._completed_in_transaction:
            self.stats.completed += 1
            return False
        if ctx._lost():
            self._drop(ctx, "its lease was lost while the handler ran")
            return False
        # the completer thread records the result with others in one commit; the slot frees before
        self._completer.submit(ctx, result)
        return True

    def _finished(self, ctx: TaskContext) -> None:
        """Forget an execution whose outcome is recorded (or dropped); its slot in the pipeline frees."""
        with self._inflight_lock:
            self._forget(ctx.execution.execution_id)
        self._nudge()

    def _forget(self, execution_id: UUID) -> None:
        """Drop an execution from the in-flight set (hold the lock). A direct grant stays known for two
        lease durations from now: its lease, if its result was dropped, lapses before adopting could
        hand it out again under the same fence."""
        self._inflight.pop(execution_id, None)
        if execution_id in self._direct_seen:
            self._direct_seen[execution_id] = time.monotonic()

    def _nudge(self) -> None:
        """Wake the poll loop after freeing a slot, unless a wake-up is already pending.

        The slot was freed before the flag is read, and the loop clears the flag before counting free
        slots, so a skipped set never hides a slot; it spares the Event's lock and notify_all, twice
        per task, while the loop is busy polling.
        """
        if not self._wake.is_set():
            self._wake.set()

    def _report_failure(self, ctx: TaskContext, error: Any) -> None:
        """Record a failed attempt under the fence, resending after connection trouble."""
        execution = ctx.execution
        if ctx._lost():
            self._drop(ctx, "its lease was lost while the handler ran")
            return
        try:
            sent = self._resending(
                f"execution {execution.execution_id}: reporting",
                lambda: self.tasks.fail_task(
                    execution.execution_id, self.worker_id, execution.fence_token, error
                ),
            )
        except FencingError:
            self._drop(ctx, "the engine refused its fence token")
            return
        if sent is None:
            self._drop(ctx, "the database stayed unreachable; the lease will lapse")
            return
        self.stats.failed += 1
        telemetry.count("orchestrator.tasks.failed", 1, task_type=execution.task_type)
        log.debug("execution %s reported (failed)", execution.execution_id)

    def _resending(self, what: str, send: Callable[[], R]) -> R | None:
        """Return ``send()``, calling it again after connection trouble; None once all tries failed.

        An ambiguous commit is safe to resend: an accepted result repeated is a no-op. A FencingError
        is an answer, not trouble: it propagates at once.
        """
        delay = 0.05
        for attempt in range(RESULT_RETRIES):
            try:
                return send()
            except FencingError:
                raise
            except (psycopg.Error, OrchestratorError) as exc:
                log.warning("%s failed (%s), attempt %d", what, type(exc).__name__, attempt + 1)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return None

    def _drop(self, ctx: TaskContext, why: str) -> None:
        self.stats.dropped += 1
        log.info(
            "dropping the result of execution %s (task %s): %s",
            ctx.execution.execution_id,
            ctx.execution.task_id,
            why,
            extra={
                "execution_id": str(ctx.execution.execution_id),
                "instance_id": str(ctx.execution.workflow_instance_id),
            },
        )

    # -- heartbeat and notifications -------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval = self.config.renewal_interval.total_seconds()
        while not self._done.wait(interval):
            with self._inflight_lock:
                held = dict(self._inflight)
            if not held:
                continue
            try:
                renewed = self.tasks.renew_leases(list(held), self.worker_id)
            except (psycopg.Error, OrchestratorError) as exc:
                log.warning("worker %s lease renewal failed: %s", self.worker_id, type(exc).__name__)
                continue
            for eid, ctx in held.items():
                if eid not in renewed and not ctx._lost():
                    with self._inflight_lock:
                        still_running = eid in self._inflight
                    if still_running:
                        ctx.lease_lost.set()
                        log.info("worker %s lost the lease of execution %s", self.worker_id, eid)

    def _listen_loop(self) -> None:
        channel = notify_channel(self.config.schema)
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.config.dsn, autocommit=True, connect_timeout=5) as conn:
                    direct = self._direct and self._hold_lock(conn)
                    # the shared channel first: a listener seen LISTENing hears every wake-up; a grant
                    # told before its own channel is listened to is adopted below
                    for name in (channel, self._channel) if direct else (channel,):
                        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(name)))
                    if direct:
                        self._adopt.set()  # grants told while it was away are looked for next round
                        self._listening.set()
                    backoff = 0.1
                    self._wake.set()  # anything announced while we were not listening is picked up now
                    while not self._stopping.is_set():
                        # taken out first: the generator holds the connection's lock while it yields,
                        # and a grant is read on this connection (those arriving meanwhile are kept)
                        for note in list(conn.notifies(timeout=0.25, stop_after=1)):
                            self.stats.notifications += 1
                            if note.channel == self._channel:
                                self._on_grant(conn, note.payload)
                            else:
                                self._wake.set()
            except psycopg.Error as exc:
                self._listening.clear()
                if self._stopping.is_set():
                    return
                self.stats.listener_reconnects += 1
                log.warning(
                    "worker %s listener dropped (%s); reconnecting in %.1fs",
                    self.worker_id,
                    type(exc).__name__,
                    backoff,
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _hold_lock(self, conn: psycopg.Connection[Any]) -> bool:
        """Take this worker's lock on the listener connection: held, it tells starts the worker lives."""
        workers = self.tasks.engine.repos.workers
        for _ in range(LOCK_TRIES):
            # a start that found this worker's previous connection gone holds it shared, briefly
            if workers.worker_lock(conn, self._lock_key):
                return True
            if self._stopping.wait(0.05):
                return False
        log.warning("worker %s could not take its lock: no direct dispatch to it", self.worker_id)
        return False


def worker_lock_key(worker_id: UUID) -> int:
    """Return the advisory lock key a worker's listener holds while it lives (a hash of its id)."""
    return int.from_bytes(hashlib.blake2b(worker_id.bytes, digest_size=8).digest(), "big", signed=True)


class _HandlerThreads:
    """The threads that run handlers, fed by one queue; a thread starts when every one is busy.

    Lighter than a ThreadPoolExecutor, which makes a Future (and its Condition) per task and checks
    for an idle thread on every submit: the worker reports each outcome itself and knows how many
    handlers it has handed out (a handler counts as busy until ``run`` returns, so a thread is free
    when the count says so). The worker never hands out more than ``concurrency`` at once, so no more
    threads than that ever start.
    """

    def __init__(self, run: Callable[[TaskContext], None], limit: int) -> None:
        self._run = run
        #: never more threads than this (direct grants past the free slots wait in the queue)
        self._limit = limit
        self._queue: queue.SimpleQueue[TaskContext | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, ctx: TaskContext, busy: int) -> None:
        """Queue ``ctx``; ``busy`` counts the handlers handed out, this one included."""
        self._queue.put(ctx)
        if busy > len(self._threads) and len(self._threads) < self._limit:
            # daemon threads, like the worker's own: a process whose worker was never stopped still
            # exits, and a handler still running when the shutdown timeout ends does not hold it
            # open (its lease lapses and the task runs again)
            thread = threading.Thread(
                target=self._loop, name=f"orchestrator-handler_{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Drop what no thread has started (those leases lapse) and let each thread end when free."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put(None)

    def _loop(self) -> None:
        while (ctx := self._queue.get()) is not None:
            try:
                self._run(ctx)
            except BaseException:  # a handler thread outlives whatever one task raised
                log.exception("handler thread failed on execution %s", ctx.execution.execution_id)


class _GroupCompleter:
    """Group commit for results, on a thread of its own.

    Handler threads queue their results and return at once, so their slots take new work while the
    results are being written. This thread takes everything queued (up to MAX_BATCH) and records it
    as one batch, as ``complete_tasks`` would (one statement and one commit, one WAL flush, whatever
    its size, unless part of it needs the general path), answered with ids, not whole rows; a lone
    result is written at once, so batching adds no latency. Connection trouble resends
    the batch (an accepted result repeated is a no-op); a refused fence drops that one result.
    """

    MAX_BATCH = 256

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._cond = threading.Condition()
        self._queue: list[tuple[TaskContext, Any]] = []
        self._closed = False

    def submit(self, ctx: TaskContext, value: Any) -> None:
        with self._cond:
            self._queue.append((ctx, value))
            self._cond.notify()

    def close(self) -> None:
        """Finish what is queued, then let ``run`` return."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[: self.MAX_BATCH], self._queue[self.MAX_BATCH :]
            try:
                self._flush(batch)
            except Exception:  # never let the thread die: each result is then left to lapse
                log.exception("worker %s could not record %d results", self._worker.worker_id, len(batch))
                for ctx, _ in batch:
                    self._worker._finished(ctx)

    def _flush(self, batch: list[tuple[TaskContext, Any]]) -> None:
        worker = self._worker
        live = []
        for ctx, value in batch:
            if ctx._lost():
                worker._drop(ctx, "its lease was lost while the handler ran")
                worker._finished(ctx)
            else:
                live.append((ctx, value))
        results = self._send(live)
        for ctx, _ in live:
            execution = ctx.execution
            outcome = None if results is None else results.get(execution.execution_id)
            if results is None:
                worker._drop(ctx, "the database stayed unreachable; the lease will lapse")
            elif isinstance(outcome, PayloadError):
                worker._report_failure(ctx, {"type": "PayloadError", "message": str(outcome)})
            elif isinstance(outcome, FencingError):
                worker._drop(ctx, "the engine refused its fence token")
            elif isinstance(outcome, OrchestratorError) or outcome is None:
                worker._drop(ctx, f"the engine refused it ({outcome})")
            else:
                worker.stats.completed += 1
                telemetry.count("orchestrator.tasks.completed", 1, task_type=execution.task_type)
            worker._finished(ctx)

    def _send(self, live: list[tuple[TaskContext, Any]]) -> dict[UUID, Any] | None:
        """Record the batch, resending after connection trouble; None when the database stayed away."""
        if not live:
            return {}
        worker = self._worker
        items = [(ctx.execution.execution_id, ctx.execution.fence_token, value) for ctx, value in live]
        return worker._resending(
            f"worker {worker.worker_id}: recording {len(items)} results",
            lambda: dict(worker.tasks._complete_batch(worker.worker_id, items, whole=False)),
        )


def _error_of(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:MAX_ERROR_MESSAGE],
        "traceback": "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:],
    }
