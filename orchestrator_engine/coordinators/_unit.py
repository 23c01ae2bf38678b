"""One transaction's changes to one locked workflow instance, and the rules that drive them.

Every change goes through an InstanceUnit: it checks each state edge against the transition table,
collects the events, and finally writes them with a guarded ``UPDATE ... WHERE sequence_number =
expected``. Because the instance row is locked first, the guard never fails in practice; it is kept so a
caller that forgot the lock gets ConcurrencyConflictError instead of a lost update.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg

from ..definitions import WorkflowDefinition
from ..errors import ConcurrencyConflictError, InvalidStateError
from ..models import DISPATCHABLE, EventType, TaskKind, WorkflowState, can_transition_workflow
from ._ids import new_id

if TYPE_CHECKING:
    from ..repositories import Row
    from ._engine import Engine

W = WorkflowState
FORWARD = TaskKind.FORWARD.value
#: states that keep executions READY but not leasable: their ready_at is NULL (parked) until the
#: instance runs again, so the poll's index only ever yields executions of runnable instances
PARKING = (W.PAUSED, W.FAILED)
COMPENSATION = TaskKind.COMPENSATION.value


def _event_name(kind: str, suffix: str) -> str:
    return ("TASK_" if kind == FORWARD else "COMPENSATION_TASK_") + suffix


def execution_key(instance_id: UUID, kind: str, task_id: str, attempt: int) -> str:
    """Return the idempotency key of one attempt: unique per (instance, kind, task, attempt)."""
    prefix = "" if kind == FORWARD else "compensate:"
    return f"{instance_id}:{prefix}{task_id}:{attempt}"


class InstanceUnit:
    """Changes to one locked instance within one transaction."""

    def __init__(
        self, engine: Engine, conn: psycopg.Connection[Any], row: Row, definition: WorkflowDefinition
    ) -> None:
        self.engine = engine
        self.repos = engine.repos
        self.conn = conn
        self.row = row
        self.definition = definition
        self.instance_id: UUID = row["instance_id"]
        self._iid = str(self.instance_id)  # formatted once: every event and key of the unit carries it
        self.state = W(row["state"])
        self.expected: int = row["sequence_number"]
        self.pending_tasks: int = row["pending_tasks"]
        self.pending_compensations: int = row["pending_compensations"]
        self.collect_output = False
        self.events: list[dict[str, Any]] = []
        self.scheduled = False

    # -- bookkeeping -----------------------------------------------------------------------------

    def emit(self, event_type: EventType | str, payload: dict[str, Any], key: str | None = None) -> None:
        """Queue an event; its sequence number follows the ones queued before it."""
        seq = self.expected + len(self.events) + 1
        name = event_type.value if isinstance(event_type, EventType) else event_type
        self.events.append(
            {
                "workflow_instance_id": self._iid,
                "sequence_number": seq,
                "event_type": name,
                "payload": payload,
                "idempotency_key": f"{self._iid}:{key}" if key else f"{self._iid}:{name.lower()}:{seq}",
            }
        )

    def move(self, target: WorkflowState, event: EventType, payload: dict[str, Any]) -> None:
        """Move the workflow along a legal edge, or raise InvalidStateError."""
        if not can_transition_workflow(self.state, target):
            raise InvalidStateError(
                f"workflow {self.instance_id} cannot go from {self.state.value} to {target.value}",
                state=self.state.value,
            )
        self.state = target
        self.emit(event, payload)

    def flush(self) -> None:
        """Write the queued events and the instance row under the sequence guard."""
        flush_units(self.engine, self.conn, [self])

    def flush_and_read(self) -> Row:
        """Flush, then return the instance row as the database now holds it."""
        self.flush()
        row = self.repos.instances.workflow_get(self.conn, self.instance_id)
        assert row is not None  # locked by this transaction
        self.row = row
        return row

    def plan(self) -> dict[str, Any]:
        """Describe this unit's instance update for ``workflow_update_if_sequence``."""
        return {
            "instance_id": self._iid,
            "expected": self.expected,
            "new_sequence": self.expected + len(self.events),
            "state": self.state.value,
            "pending_tasks": self.pending_tasks,
            "pending_compensations": self.pending_compensations,
            "collect_output": self.collect_output,
        }

    def changed(self) -> bool:
        return bool(self.events) or self.state.value != self.row["state"]

    def flushed(self) -> None:
        """Take the written state as the new baseline."""
        self.row = {
            **self.row,
            "state": self.state.value,
            "sequence_number": self.expected + len(self.events),
            "pending_tasks": self.pending_tasks,
            "pending_compensations": self.pending_compensations,
        }
        self.expected += len(self.events)
        self.events = []
        self.scheduled = False
        self.collect_output = False

    def scheduled_events(self, rows: list[Row]) -> None:
        for row in rows:
            if row["state"] == "READY":
                self.scheduled = True
                self.emit(
                    _event_name(row["kind"], "SCHEDULED"),
                    {
                        "execution_id": str(row["execution_id"]),
                        "task_id": row["task_id"],
                        "attempt": row["attempt_number"],
                    },
                    # a lapsed lease schedules the same execution again: lapse_count tells them apart
                    key=f"scheduled:{row['execution_id']}:{row['lapse_count']}",
                )

    def _task_payload(self, row: Row, eid: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "execution_id": eid or str(row["execution_id"]),
            "task_id": row["task_id"],
            "kind": row["kind"],
            "attempt": row["attempt_number"],
            "fence_token": row["fence_token"],
            **extra,
        }

    # -- task outcomes ---------------------------------------------------------------------------

    # An accepted completion (the statement that accepted it already deleted the lease row) is
    # recorded in three steps, so a batch of them releases every dependent in one statement:
    # record_completion, then task_release_dependents for those that releases_dependents, then
    # count_completion (TaskCoordinator._finish_in).

    def record_completion(self, row: Row) -> None:
        """Emit the completion event."""
        eid = str(row["execution_id"])
        self.emit(_event_name(row["kind"], "COMPLETED"), self._task_payload(row, eid), key=f"completed:{eid}")

    def releases_dependents(self, row: Row) -> bool:
        """Tell whether completing this execution can make other executions ready."""
        return row["kind"] != FORWARD or bool(self.definition.dependents[row["task_id"]])

    def count_completion(self, row: Row) -> None:
        """Count a completion; the last forward task completes the workflow, the last undo compensates it."""
        if row["kind"] == FORWARD:
            self.pending_tasks -= 1
            if self.pending_tasks == 0 and self.state in (W.RUNNING, W.PAUSED):
                self.collect_output = True  # the final update gathers every task's output
                self.move(W.COMPLETED, EventType.WORKFLOW_COMPLETED, {})
        else:
            self.pending_compensations -= 1
            if self.pending_compensations == 0 and self.state is W.COMPENSATING:
                self.move(W.COMPENSATED, EventType.WORKFLOW_COMPENSATED, {})

    def task_failed(self, row: Row, *, lapsed: bool = False) -> None:
        """Record a failed attempt: schedule the next one, or fail terminally."""
        kind = row["kind"]
        self.emit(
            _event_name(kind, "FAILED"),
            self._task_payload(row, error=row["error"], lease_lapsed=lapsed),
            key=f"failed:{row['execution_id']}",
        )
        tries = row["attempt_number"] + row["lapse_count"]
        if tries < row["max_attempts"] and self.state not in (W.CANCELLED, W.COMPENSATED, W.COMPLETED):
            policy = self.definition.by_id[row["task_id"]].retry
            delay = policy.delay_after(row["attempt_number"])
            self.schedule_attempt(row, delay_s=delay.total_seconds(), manual=False)
            return
        self.terminal_failure(row)

    def schedule_attempt(
        self, row: Row, *, delay_s: float, manual: bool, input_text: str | None = None
    ) -> Row:
        attempt = row["attempt_number"] + 1
        new = self.repos.executions.task_insert_retry(
            self.conn,
            execution_id=row["execution_id"],
            new_execution_id=new_id(),
            idempotency_key=execution_key(self.instance_id, row["kind"], row["task_id"], attempt),
            # a manual retry is always allowed one more try, whatever the policy says
            min_max_attempts=attempt + row["lapse_count"] if manual else 1,
            input=input_text,
            delay_s=delay_s,
        )
        assert new is not None
        self.emit(
            _event_name(row["kind"], "RETRY_SCHEDULED"),
            {
                "execution_id": str(new["execution_id"]),
                "task_id": new["task_id"],
                "attempt": attempt,
                "delay_s": round(delay_s, 3),
                "manual": manual,
            },
            key=f"retry:{new['execution_id']}",
        )
        if delay_s <= 0:
            self.scheduled_events([new])
        return new

    def terminal_failure(self, row: Row) -> None:
        if row["kind"] == COMPENSATION:
            if self.state is W.COMPENSATING:
                self.move(
                    W.FAILED,
                    EventType.WORKFLOW_FAILED,
                    {"compensation_failed": row["task_id"], "error": row["error"]},
                )
            return
        if self.state not in (W.RUNNING, W.PAUSED):
            return  # already failed, or forward work was stopped by cancel/compensation
        completed = self.repos.executions.task_completed_forward(self.conn, self.instance_id)
        if any(self.definition.by_id[r["task_id"]].compensation for r in completed):
            self.start_compensation(
                {r["task_id"] for r in completed}, {"failed_task": row["task_id"]}, completed
            )
        else:
            self.move(
                W.FAILED, EventType.WORKFLOW_FAILED, {"failed_task": row["task_id"], "error": row["error"]}
            )

    def task_lapsed(self, row: Row) -> None:
        """Hand a lapsed lease back to the queue, or fail the attempt when it timed out or is out of tries."""
        timed_out = row["deadline_at"] is not None and row["deadline_at"] <= row["lease_expires_at"]
        next_grant = row["attempt_number"] + row["lapse_count"] + 1
        if timed_out or next_grant > row["max_attempts"]:
            reason = "timed out" if timed_out else "lease lapsed and no attempts are left"
            error = {"type": "TimeoutError" if timed_out else "LeaseLapsed", "message": f"task {reason}"}
            failed = self.repos.executions.task_fail_if_lapsed(
                self.conn, row["execution_id"], json.dumps(error), 0 if timed_out else 1
            )
            if failed is not None:
                self.task_failed(failed, lapsed=True)
            return
        requeued = self.repos.executions.task_requeue_if_lapsed(self.conn, row["execution_id"])
        if requeued is not None:
            self.emit(
                EventType.TASK_LEASE_EXPIRED,
                self._task_payload(row, worker_id=str(row["lease_holder"])),
                key=f"lapsed:{row['execution_id']}:{row['fence_token']}",
            )
            self.scheduled_events([requeued])

    # -- workflow-wide changes -------------------------------------------------------------------

    def compensation_began(self) -> bool:
        """Tell whether compensation ever started for this instance (compensation executions exist)."""
        if self.pending_compensations or self.state is W.COMPENSATING:
            return True
        rows = self.repos.executions.task_list_for_instance(self.conn, self.instance_id)
        return any(r["kind"] == COMPENSATION for r in rows)

    def stop_open_work(self, kind: str | None) -> int:
        """Cancel pending/ready executions and revoke running leases (their completions are then fenced)."""
        cancelled = self.repos.executions.task_cancel_open(self.conn, self.instance_id, kind)
        if cancelled:
            self.repos.executions.task_lease_delete(self.conn, [r["execution_id"] for r in cancelled])
        for row in cancelled:
            self.emit(
                EventType.TASK_CANCELLED,
                {"execution_id": str(row["execution_id"]), "task_id": row["task_id"], "kind": row["kind"]},
                key=f"cancelled:{row['execution_id']}",
            )
        return len(cancelled)

    def start_compensation(
        self, candidates: set[str], cause: dict[str, Any], completed: list[Row] | None = None
    ) -> None:
        """Stop forward work and schedule the compensations of ``candidates`` that completed."""
        cancelled = self.stop_open_work(FORWARD)
        if completed is None:
            completed = self.repos.executions.task_completed_forward(self.conn, self.instance_id)
        by_task = {
            r["task_id"]: r
            for r in completed
            if r["task_id"] in candidates and self.definition.by_id[r["task_id"]].compensation
        }
        self.move(
            W.COMPENSATING,
            EventType.COMPENSATION_STARTED,
            {"cause": cause, "tasks": sorted(by_task), "cancelled_executions": cancelled},
        )
        rows = []
        for task_id, done in by_task.items():
            task = self.definition.by_id[task_id]
            # reverse order: wait for the compensations of every compensated task downstream of this one
            waits_for = sorted(self.definition.descendants(task_id) & by_task.keys())
            rows.append(
                {
                    "execution_id": str(new_id()),
                    "workflow_instance_id": str(self.instance_id),
                    "namespace": self.row["namespace"],
                    "task_id": task_id,
                    "task_type": task.compensation,
                    "kind": COMPENSATION,
                    "idempotency_key": execution_key(self.instance_id, COMPENSATION, task_id, 1),
                    "attempt_number": 1,
                    "lapse_count": 0,
                    "max_attempts": task.retry.max_attempts,
                    "state": "PENDING" if waits_for else "READY",
                    "depends_on": waits_for,
                    "deps_remaining": len(waits_for),
                    "input": {"task_id": task_id, "input": done["input"], "output": done["output"]},
                    "timeout_ms": None
                    if task.timeout is None
                    else round(task.timeout.total_seconds() * 1000),
                }
            )
        inserted = self.repos.executions.task_insert_many(self.conn, rows) if rows else []
        self.scheduled_events(inserted)
        self.pending_compensations = len(inserted)
        if not inserted:
            self.move(W.COMPENSATED, EventType.WORKFLOW_COMPENSATED, {})


def flush_units(engine: Engine, conn: psycopg.Connection[Any], units: list[InstanceUnit]) -> None:
    """Write the changes of many locked instances in one statement, each under its sequence guard."""
    changed = [u for u in units if u.changed()]
    if not changed:
        return  # nothing happened: leave the rows (and updated_at) untouched
    events: list[dict[str, Any]] = []
    park: list[UUID] = []
    unpark: list[UUID] = []
    notify: set[str] = set()
    for u in changed:
        events.extend(u.events)
        if u.state in PARKING:
            park.append(u.instance_id)
        elif u.state in DISPATCHABLE:
            if W(u.row["state"]) in PARKING:
                unpark.append(u.instance_id)
            if u.scheduled:
                notify.add(u.row["namespace"])
    result = engine.repos.instances.workflow_update_if_sequence(
        conn,
        events=json.dumps(events, default=str),
        event_count=len(events),
        instances=json.dumps([u.plan() for u in changed]),
        channel=engine.channel,
        notify=sorted(notify) if engine.config.notify else [],
    )
    if result is None or result["moved"] != len(changed):
        raise ConcurrencyConflictError(
            "workflow " + ", ".join(str(u.instance_id) for u in changed) + " changed concurrently"
        )
    if park or unpark:  # rare (pause, resume, failure, retry): its own statement, same transaction
        engine.repos.executions.task_park_unpark(conn, park, unpark)
    for u in changed:
        u.flushed()
