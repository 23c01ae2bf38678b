"""Records the engine returns, the states they move through, and the legal transitions."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any
from uuid import UUID

JSON = Any  # a JSON value: dict, list, str, int, float, bool or None


class WorkflowState(str, enum.Enum):
    """State of a workflow instance; the value is what the database stores."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_WORKFLOW


class TaskState(str, enum.Enum):
    """State of one task execution (one attempt of one task)."""

    PENDING = "PENDING"
    READY = "READY"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


class TaskKind(str, enum.Enum):
    """Whether an execution runs a task of the DAG or the compensation that undoes one."""

    FORWARD = "FORWARD"
    COMPENSATION = "COMPENSATION"


_TERMINAL_WORKFLOW = frozenset({WorkflowState.COMPLETED, WorkflowState.CANCELLED, WorkflowState.COMPENSATED})
#: states in which a workflow's READY executions may be leased (task_poll_and_lease says the same in SQL)
DISPATCHABLE = frozenset({WorkflowState.RUNNING, WorkflowState.COMPENSATING})

W = WorkflowState
T = TaskState

#: Every legal workflow edge. FAILED is not terminal: ``retry_task`` resumes it, ``trigger_compensation``
#: undoes it, ``cancel_workflow`` ends it. A PAUSED workflow still accepts the results of tasks that were
#: already leased, so it may complete, fail or start compensating without being resumed first.
WORKFLOW_TRANSITIONS: frozenset[tuple[WorkflowState, WorkflowState]] = frozenset(
    {
        (W.RUNNING, W.PAUSED),
        (W.RUNNING, W.COMPLETED),
        (W.RUNNING, W.FAILED),
        (W.RUNNING, W.CANCELLED),
        (W.RUNNING, W.COMPENSATING),
        (W.PAUSED, W.RUNNING),
        (W.PAUSED, W.COMPLETED),
        (W.PAUSED, W.FAILED),
        (W.PAUSED, W.CANCELLED),
        (W.PAUSED, W.COMPENSATING),
        (W.FAILED, W.RUNNING),
        (W.FAILED, W.COMPENSATING),
        (W.FAILED, W.CANCELLED),
        (W.COMPENSATING, W.COMPENSATED),
        (W.COMPENSATING, W.FAILED),
    }
)

#: Every legal task-execution edge. RUNNING -> READY is a lapsed lease handed back to the queue; a new
#: attempt is a new execution, so FAILED never goes back.
TASK_TRANSITIONS: frozenset[tuple[TaskState, TaskState]] = frozenset(
    {
        (T.PENDING, T.READY),
        (T.PENDING, T.CANCELLED),
        (T.READY, T.RUNNING),
        (T.READY, T.CANCELLED),
        (T.RUNNING, T.READY),
        (T.RUNNING, T.COMPLETED),
        (T.RUNNING, T.FAILED),
        (T.RUNNING, T.CANCELLED),
    }
)


def can_transition_workflow(src: WorkflowState, dst: WorkflowState) -> bool:
    """Tell whether ``src -> dst`` is a legal workflow edge."""
    return (src, dst) in WORKFLOW_TRANSITIONS


def can_transition_task(src: TaskState, dst: TaskState) -> bool:
    """Tell whether ``src -> dst`` is a legal task-execution edge."""
    return (src, dst) in TASK_TRANSITIONS


class EventType(str, enum.Enum):
    """Kinds of entries in a workflow's event history."""

    WORKFLOW_STARTED = "WORKFLOW_STARTED"
    WORKFLOW_PAUSED = "WORKFLOW_PAUSED"
    WORKFLOW_RESUMED = "WORKFLOW_RESUMED"
    WORKFLOW_CANCELLED = "WORKFLOW_CANCELLED"
    WORKFLOW_COMPLETED = "WORKFLOW_COMPLETED"
    WORKFLOW_FAILED = "WORKFLOW_FAILED"
    WORKFLOW_RETRIED = "WORKFLOW_RETRIED"
    TASK_SCHEDULED = "TASK_SCHEDULED"
    TASK_STARTED = "TASK_STARTED"
    TASK_COMPLETED = "TASK_COMPLETED"
    TASK_FAILED = "TASK_FAILED"
    TASK_RETRY_SCHEDULED = "TASK_RETRY_SCHEDULED"
    TASK_LEASE_EXPIRED = "TASK_LEASE_EXPIRED"
    TASK_CANCELLED = "TASK_CANCELLED"
    COMPENSATION_STARTED = "COMPENSATION_STARTED"
    COMPENSATION_RESUMED = "COMPENSATION_RESUMED"
    COMPENSATION_TASK_SCHEDULED = "COMPENSATION_TASK_SCHEDULED"
    COMPENSATION_TASK_STARTED = "COMPENSATION_TASK_STARTED"
    COMPENSATION_TASK_COMPLETED = "COMPENSATION_TASK_COMPLETED"
    COMPENSATION_TASK_FAILED = "COMPENSATION_TASK_FAILED"
    COMPENSATION_TASK_RETRY_SCHEDULED = "COMPENSATION_TASK_RETRY_SCHEDULED"
    WORKFLOW_COMPENSATED = "WORKFLOW_COMPENSATED"


#: Which workflow state each workflow-level event moves to; the checker replays histories through it.
EVENT_TARGET_STATE: dict[EventType, WorkflowState] = {
    EventType.WORKFLOW_STARTED: W.RUNNING,
    EventType.WORKFLOW_PAUSED: W.PAUSED,
    EventType.WORKFLOW_RESUMED: W.RUNNING,
    EventType.WORKFLOW_RETRIED: W.RUNNING,
    EventType.WORKFLOW_CANCELLED: W.CANCELLED,
    EventType.WORKFLOW_COMPLETED: W.COMPLETED,
    EventType.WORKFLOW_FAILED: W.FAILED,
    EventType.COMPENSATION_STARTED: W.COMPENSATING,
    EventType.COMPENSATION_RESUMED: W.COMPENSATING,
    EventType.WORKFLOW_COMPENSATED: W.COMPENSATED,
}


@dataclass(frozen=True)
class WorkflowInstance:
    """One run of a workflow definition."""

    instance_id: UUID
    namespace: str
    workflow_name: str
    workflow_version: int
    run_id: str
    state: WorkflowState
    input: JSON
    output: JSON
    sequence_number: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TaskExecution:
    """One attempt of one task (or of its compensation) of a workflow instance."""

    execution_id: UUID
    workflow_instance_id: UUID
    task_id: str
    task_type: str
    attempt_number: int
    state: TaskState
    input: JSON
    output: JSON
    error: JSON
    lease_holder: UUID | None
    lease_expires_at: datetime | None
    fence_token: int
    idempotency_key: str
    kind: TaskKind = TaskKind.FORWARD
    namespace: str = ""
    ready_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class WorkflowEvent:
    """One entry of a workflow instance's append-only history."""

    event_id: UUID
    workflow_instance_id: UUID
    sequence_number: int
    event_type: str
    payload: JSON
    created_at: datetime


def instance_from_row(row: dict[str, Any]) -> WorkflowInstance:
    """Build a WorkflowInstance from a ``workflow_instances`` row."""
    return WorkflowInstance(
        instance_id=row["instance_id"],
        namespace=row["namespace"],
        workflow_name=row["workflow_name"],
        workflow_version=row["workflow_version"],
        run_id=row["run_id"],
        state=WorkflowState(row["state"]),
        input=row["input"],
        output=row["output"],
        sequence_number=row["sequence_number"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


_TASK_STATES = {s.value: s for s in TaskState}
_TASK_KINDS = {k.value: k for k in TaskKind}
#: TaskExecution's fields in order; a row's values taken in this order build one positionally
_EXECUTION_FIELDS = tuple(f.name for f in fields(TaskExecution))
_STATE_AT = _EXECUTION_FIELDS.index("state")
_KIND_AT = _EXECUTION_FIELDS.index("kind")


def _execution(values: list[Any]) -> TaskExecution:
    """Build a TaskExecution from its values in ``_EXECUTION_FIELDS`` order, state and kind as stored."""
    values[_STATE_AT] = _TASK_STATES[values[_STATE_AT]]
    values[_KIND_AT] = _TASK_KINDS[values[_KIND_AT]]
    return TaskExecution(*values)


def executions_from_values(names: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[TaskExecution]:
    """Build TaskExecutions from rows given as value tuples under column ``names`` (extra columns ignored)."""
    at = [names.index(f) for f in _EXECUTION_FIELDS]
    return [_execution([row[i] for i in at]) for row in rows]


def execution_from_row(row: dict[str, Any]) -> TaskExecution:
    """Build a TaskExecution from a ``task_executions`` row."""
    return _execution([row[f] for f in _EXECUTION_FIELDS])


def event_from_row(row: dict[str, Any]) -> WorkflowEvent:
    """Build a WorkflowEvent from an ``events`` row."""
    return WorkflowEvent(
        event_id=row["event_id"],
        workflow_instance_id=row["workflow_instance_id"],
        sequence_number=row["sequence_number"],
        event_type=row["event_type"],
        payload=row["payload"],
        created_at=row["created_at"],
    )
