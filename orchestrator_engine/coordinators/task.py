"""TaskCoordinator: leases with fencing tokens, completion, failure, retries and lapsed-lease recovery."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from .. import telemetry
from ..config import EngineConfig
from ..errors import FencingError, InvalidStateError, OrchestratorError, PayloadError, TaskNotFoundError
from ..models import (
    DISPATCHABLE,
    EventType,
    TaskExecution,
    WorkflowState,
    execution_from_row,
    executions_from_values,
)
from ..repositories.executions import FinishResult
from ..telemetry import traced
from ._engine import Engine
from ._ids import as_name, as_uuid
from ._unit import COMPENSATION, FORWARD, InstanceUnit, flush_units

W = WorkflowState
Row = dict[str, Any]
#: lapsed leases reclaimed per acquisition call, so one poll never turns into a long sweep
RECLAIM_PER_CALL = 8
#: the instance columns task_finish_if_fenced returns with each finished execution
_INSTANCE_COLUMNS = (
    "namespace",
    "workflow_name",
    "workflow_version",
    "state",
    "sequence_number",
    "pending_tasks",
    "pending_compensations",
)


def _first_of_each(results: Sequence[FinishResult]) -> list[FinishResult]:
    """Return ``results`` with each execution once: the first of repeated ids wins."""
    return list({r[0]: r for r in reversed(results)}.values())


def _fence(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"fence_token must be an int, got {type(value).__name__}")
    return value


class TaskCoordinator:
    """Hand out task executions under leases and accept their results only from the lease holder."""

    def __init__(
        self, pool: ConnectionPool[Any], config: EngineConfig, *, engine: Engine | None = None
    ) -> None:
        self._engine = engine or Engine(pool, config)
        self._config = config
        self._reclaim_every = min(config.reclaim_interval, config.lease_duration / 10).total_seconds()
        self._next_reclaim = 0.0
        self._reclaim_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- acquisition -----------------------------------------------------------------------------

    @traced("orchestrator.acquire_task")
    def acquire_task(self, execution_id: UUID | str, worker_id: UUID | str) -> TaskExecution | None:
        """Lease one READY (or lapsed) execution; None when it is not acquirable."""
        eid = as_uuid(execution_id, "execution_id")
        wid = as_uuid(worker_id, "worker_id")
        repos = self._engine.repos
        with self._engine.transaction() as c:
            row = repos.executions.task_get(c, eid)
            if row is None:
                return None
            unit = self._engine.lock(c, row["workflow_instance_id"])
            if unit.state not in DISPATCHABLE:
                return None
            row = repos.executions.task_get(c, eid)
            assert row is not None
            if row["state"] == "RUNNING":
                unit.task_lapsed(
                    row
                )  # guarded in SQL by lease_expires_at < now(): a live lease is left alone
            granted = repos.executions.task_lease_if_acquirable(c, eid, wid, self._config.lease_duration)
            if granted is not None:
                if granted["leases_written"] != 1:
                    raise AssertionError("grant lost its lease row")  # pragma: no cover - invariant
                unit.emit(
                    EventType.TASK_STARTED
                    if granted["kind"] == FORWARD
                    else EventType.COMPENSATION_TASK_STARTED,
                    {
                        "execution_id": str(eid),
                        "task_id": granted["task_id"],
                        "kind": granted["kind"],
                        "attempt": granted["attempt_number"],
                        "worker_id": str(wid),
                        "fence_token": granted["fence_token"],
                    },
                    key=f"started:{eid}:{granted['fence_token']}",
                )
            unit.flush()
        return None if granted is None else execution_from_row(granted)

    def poll_tasks(
        self,
        worker_id: UUID | str,
        *,
        namespace: str | None = None,
        task_types: Iterable[str] | None = None,
        limit: int = 1,
    ) -> list[TaskExecution]:
        """Lease up to ``limit`` ready executions, oldest first, in one statement; never the same twice."""
        wid = as_uuid(worker_id, "worker_id")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be an int between 1 and 1000, got {limit!r}")
        if isinstance(task_types, str):
            raise TypeError("task_types must be a list of task types, not a string")
        if namespace is not None:
            as_name(namespace, "namespace")
        types = None if task_types is None else [as_name(t, "task_type") for t in task_types]
        self._reclaim_if_due()
        return self._lease_ready(wid, namespace, types, limit)

    @traced("orchestrator.poll_tasks")
    def _lease_ready(
        self, wid: UUID, namespace: str | None, types: list[str] | None, limit: int
    ) -> list[TaskExecution]:
        """Lease up to ``limit`` ready executions in one autocommit statement (arguments checked)."""
        with self._engine.single() as c:
            names, rows = self._engine.repos.executions.task_poll_and_lease(
                c,
                worker_id=wid,
                namespace=namespace,
                task_types=types,
                limit=limit,
                lease=self._config.lease_duration,
            )
        if not rows:
            return []
        first = dict(zip(names, rows[0], strict=True))
        if first["bumped_instances"] != first["picked_instances"]:
            raise AssertionError("poll lost an instance sequence update")  # pragma: no cover - invariant
        if first["leases_written"] != len(rows):
            raise AssertionError("poll lost a lease row")  # pragma: no cover - invariant
        return executions_from_values(names, rows)

    def _reclaim_if_due(self) -> None:
        """Reclaim a few lapsed leases (SKIP LOCKED) if ``reclaim_interval`` has passed since the last look.

        Recovery needs no daemon: polls call this. The Worker calls it after handing its leased tasks
        to their handlers, so the scan is never between a task becoming ready and its handler starting.
        """
        if self._reclaim_due() and self.reclaim_expired_leases(limit=RECLAIM_PER_CALL) == RECLAIM_PER_CALL:
            self._next_reclaim = 0.0  # more may be waiting: look again on the next poll

    def _reclaim_due(self) -> bool:
        """Tell whether this poll should look for lapsed leases; most polls skip the scan."""
        now = time.monotonic()
        with self._reclaim_lock:
            if now < self._next_reclaim:
                return False
            self._next_reclaim = now + self._reclaim_every
            return True

    @traced("orchestrator.reclaim_expired_leases")
    def reclaim_expired_leases(self, *, limit: int = 100) -> int:
        """Requeue (or fail, when out of tries or past the timeout) executions whose lease lapsed."""
        with self._engine.transaction() as c:
            return self._reclaim(c, limit)

    def _reclaim(self, c: psycopg.Connection[Any], limit: int) -> int:
        repos = self._engine.repos
        lapsed = repos.executions.task_select_lapsed(c, limit)
        by_instance: dict[UUID, list[UUID]] = {}
        for r in lapsed:
            by_instance.setdefault(r["workflow_instance_id"], []).append(r["execution_id"])
        for instance_id, execution_ids in by_instance.items():
            unit = self._engine.lock(c, instance_id)  # already locked by task_select_lapsed: no wait
            for eid in execution_ids:
                row = repos.executions.task_get(c, eid)
                if row is not None and row["state"] == "RUNNING":
                    unit.task_lapsed(row)
            unit.flush()
        telemetry.count("orchestrator.leases.lapsed", len(lapsed))
        return len(lapsed)

    # -- results ---------------------------------------------------------------------------------

    @traced("orchestrator.complete_task")
    def complete_task(
        self,
        execution_id: UUID | str,
        worker_id: UUID | str,
        fence_token: int,
        output: Any = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> TaskExecution:
        """Accept a result from the current lease holder; repeating an accepted call is a no-op."""
        eid = as_uuid(execution_id, "execution_id")
        wid = as_uuid(worker_id, "worker_id")
        token = _fence(fence_token)
        output_text = self._engine.encode(output, "task output")
        return self._finish_one(conn, wid, (eid, token, "COMPLETED", output_text, None))

    @traced("orchestrator.fail_task")
    def fail_task(
        self,
        execution_id: UUID | str,
        worker_id: UUID | str,
        fence_token: int,
        error: Any = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> TaskExecution:
        """Record a failed attempt from the current lease holder; the retry policy decides what follows."""
        eid = as_uuid(execution_id, "execution_id")
        wid = as_uuid(worker_id, "worker_id")
        token = _fence(fence_token)
        if not isinstance(error, dict):
            if error is None:
                error = {"message": "the task failed without saying why"}
            else:
                error = {"message": error if isinstance(error, str) else json.dumps(error, default=repr)}
        error_text = self._engine.encode(error, "task error")
        return self._finish_one(conn, wid, (eid, token, "FAILED", None, error_text))

    def complete_tasks(
        self, worker_id: UUID | str, results: Iterable[tuple[UUID | str, int, Any]]
    ) -> dict[UUID, TaskExecution | OrchestratorError]:
        """Complete many executions held by one worker in one transaction (one commit for all).

        ``results`` holds ``(execution_id, fence_token, output)``. Each result is judged on its own:
        the answer maps each execution id to its completed TaskExecution, or to the FencingError or
        PayloadError that refused it. Forward tasks of running workflows are recorded by one statement
        (one round trip) whatever the batch size, the others by three statements in one transaction
        after it. Instances are locked in instance order, so concurrent batches cannot deadlock. A
        database error may leave part of the batch recorded; retrying the batch is safe.
        """
        return self._executions(self._complete_batch(worker_id, results, whole=True))

    def _executions(
        self, accepted: dict[UUID, Row | OrchestratorError]
    ) -> dict[UUID, TaskExecution | OrchestratorError]:
        """Make each accepted row a TaskExecution, reading the rows that came back with a few columns.

        The one-statement completion and a refusal's read answer with whole rows; ``_finish_in``
        (the general path) with a few columns, which are read whole here, after the commit.
        """
        fetch = [
            eid for eid, v in accepted.items() if not isinstance(v, OrchestratorError) and "input" not in v
        ]
        full: dict[UUID, Row] = {}
        if fetch:
            with self._engine.reading() as c:
                full = {r["execution_id"]: r for r in self._engine.repos.executions.task_get_many(c, fetch)}
        return {
            eid: value if isinstance(value, OrchestratorError) else execution_from_row(full.get(eid, value))
            for eid, value in accepted.items()
        }

    @traced("orchestrator.complete_tasks")
    def _complete_batch(
        self, worker_id: UUID | str, results: Iterable[tuple[UUID | str, int, Any]], *, whole: bool
    ) -> dict[UUID, Row | OrchestratorError]:
        """Like ``complete_tasks``, but answer accepted results with rows, not TaskExecutions.

        The rows the one-statement completion wrote are whole if ``whole``, else their ids only; those
        of the general path have a few columns (``_executions`` reads them whole). The worker's group
        commit asks for no whole rows: it only tells accepted results from refused ones.
        """
        wid = as_uuid(worker_id, "worker_id")
        outcome: dict[UUID, Row | OrchestratorError] = {}
        todo: list[FinishResult] = []
        for execution_id, fence_token, output in results:
            eid = as_uuid(execution_id, "execution_id")
            try:
                todo.append(
                    (eid, _fence(fence_token), "COMPLETED", self._engine.encode(output, "task output"), None)
                )
            except PayloadError as exc:
                outcome[eid] = exc
        if todo:
            outcome.update(self._complete_at_once(wid, todo, whole=whole))
        return outcome

    def _complete_at_once(
        self, wid: UUID, results: Sequence[FinishResult], *, whole: bool
    ) -> dict[UUID, Row | OrchestratorError]:
        """Record completions ``wid`` holds, as ``_finish_in`` would: in one statement (one round trip,
        one commit) for forward tasks of running workflows, the rest with ``_finish_in`` after it.

        The statement leaves alone a workflow that is not running, has a compensation in the batch or
        changed while the statement waited for its lock (see task_complete_many); a refused result
        is explained by a read of its own.
        """
        unique = _first_of_each(results)
        channel = self._engine.channel if self._engine.config.notify else None
        with self._engine.single() as c:
            rows = self._engine.repos.executions.task_complete_many(c, wid, unique, channel, whole=whole)
        outcome: dict[UUID, Row | OrchestratorError] = {
            row["execution_id"]: row for row in rows if row["execution_id"] is not None
        }
        left = set(rows[0]["general"])
        if left:
            with self._engine.transaction() as c:
                outcome.update(self._finish_in(c, wid, [r for r in unique if r[0] in left]))
        refused = [r for r in unique if r[0] not in outcome]
        if refused:
            with self._engine.reading() as c:
                for eid, token, state, _, _ in refused:
                    outcome[eid] = self._refused(c, eid, wid, token, state)
        return outcome

    def _finish_one(
        self, conn: psycopg.Connection[Any] | None, wid: UUID, result: FinishResult
    ) -> TaskExecution:
        eid = result[0]
        if conn is None and result[2] == "COMPLETED":
            done = self._executions(self._complete_at_once(wid, [result], whole=True))[eid]
            if isinstance(done, OrchestratorError):
                raise done
            return done
        with self._engine.transaction(conn) as c:
            outcome = self._finish_in(c, wid, [result])[eid]
            if isinstance(outcome, OrchestratorError):
                raise outcome
            row = self._engine.repos.executions.task_get(c, eid)
        assert row is not None
        return execution_from_row(row)

    def _finish_in(
        self, c: psycopg.Connection[Any], wid: UUID, results: Sequence[FinishResult]
    ) -> dict[UUID, Row | OrchestratorError]:
        """Record results of executions ``wid`` holds: one statement finishes them all under their
        fences, one releases the dependents of every completed task, one writes every instance."""
        repos = self._engine.repos
        unique = _first_of_each(results)
        rows = repos.executions.task_finish_if_fenced(c, wid, unique)
        outcome: dict[UUID, Row | OrchestratorError] = {}
        units: dict[UUID, InstanceUnit] = {}
        finished: list[tuple[InstanceUnit, Row]] = []
        for row in rows:
            iid = row["workflow_instance_id"]
            unit = units.get(iid)
            if unit is None:
                instance = {"instance_id": iid, **{k: row["w_" + k] for k in _INSTANCE_COLUMNS}}
                unit = units[iid] = self._engine.unit(c, instance)
            finished.append((unit, row))
            outcome[row["execution_id"]] = row
        release: list[tuple[UUID, str, str]] = []
        for unit, row in finished:
            if row["state"] == "COMPLETED":
                unit.record_completion(row)
                if unit.releases_dependents(row):
                    release.append((unit.instance_id, row["task_id"], row["kind"]))
        if release:
            for ready in repos.executions.task_release_dependents(c, release):
                units[ready["workflow_instance_id"]].scheduled_events([ready])
        for unit, row in finished:
            if row["state"] == "COMPLETED":
                unit.count_completion(row)
            else:
                unit.task_failed(row)
        flush_units(self._engine, c, list(units.values()))
        for eid, token, state, _, _ in unique:
            if eid not in outcome:
                outcome[eid] = self._refused(c, eid, wid, token, state)
        return outcome

    def _refused(
        self, c: psycopg.Connection[Any], eid: UUID, wid: UUID, token: int, state: str
    ) -> Row | OrchestratorError:
        """Explain a result the fence refused: a retried call whose first try committed is accepted."""
        latest = self._engine.repos.executions.task_get(c, eid)
        if latest is None:
            return FencingError(f"no execution {eid}", execution_id=eid, fence_token=token)
        if latest["state"] == state and latest["lease_holder"] == wid and latest["fence_token"] == token:
            return latest
        return FencingError(
            f"execution {eid} is not held by worker {wid} with fence token {token} "
            f"(state {latest['state']}, token {latest['fence_token']})",
            execution_id=eid,
            fence_token=token,
        )

    def renew_lease(self, execution_id: UUID | str, worker_id: UUID | str) -> bool:
        """Extend the lease to now + lease_duration; False when the worker no longer holds it."""
        eid = as_uuid(execution_id, "execution_id")
        return eid in self.renew_leases([eid], worker_id)

    @traced("orchestrator.renew_leases")
    def renew_leases(self, execution_ids: Iterable[UUID | str], worker_id: UUID | str) -> set[UUID]:
        """Renew many leases in one statement; return the ids still held."""
        ids = [as_uuid(e, "execution_id") for e in execution_ids]
        wid = as_uuid(worker_id, "worker_id")
        if not ids:
            return set()
        with self._engine.transaction() as c:
            return self._engine.repos.executions.task_renew_many_if_held(
                c, ids, wid, self._config.lease_duration
            )

    # -- operator actions ------------------------------------------------------------------------

    @traced("orchestrator.retry_task")
    def retry_task(
        self,
        workflow_instance_id: UUID | str,
        task_id: str,
        input: Any = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> TaskExecution:
        """Schedule a new attempt of a task whose latest attempt FAILED; a FAILED workflow resumes."""
        iid = as_uuid(workflow_instance_id, "workflow_instance_id")
        input_text = None if input is None else self._engine.encode(input, "task input")
        repos = self._engine.repos
        with self._engine.transaction(conn) as c:
            unit = self._engine.lock(c, iid)
            if not isinstance(task_id, str) or task_id not in unit.definition.by_id:
                raise TaskNotFoundError(f"workflow {iid} has no task {task_id!r}")
            latest = repos.executions.task_latest_for_task(c, iid, task_id)
            if latest is None or latest["state"] != "FAILED":
                state = "none" if latest is None else latest["state"]
                raise InvalidStateError(
                    f"task {task_id!r} cannot be retried: its latest attempt is {state}", state=state
                )
            if unit.state not in (W.FAILED, W.RUNNING, W.PAUSED, W.COMPENSATING):
                raise InvalidStateError(
                    f"cannot retry a task of a {unit.state.value} workflow", state=unit.state.value
                )
            if latest["kind"] == FORWARD and unit.compensation_began():
                # once undo steps have run, redoing forward work would report success for undone tasks
                raise InvalidStateError(
                    "forward work stopped when compensation started", state=unit.state.value
                )
            new = unit.schedule_attempt(latest, delay_s=0, manual=True, input_text=input_text)
            if unit.state is W.FAILED:
                if latest["kind"] == COMPENSATION:
                    unit.move(W.COMPENSATING, EventType.COMPENSATION_RESUMED, {"retried_task": task_id})
                else:
                    unit.move(W.RUNNING, EventType.WORKFLOW_RETRIED, {"retried_task": task_id})
            unit.flush()
        return execution_from_row(new)
