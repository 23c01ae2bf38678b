"""orchestrator-engine: durable workflows (DAGs with sagas) on the PostgreSQL you already run."""

from __future__ import annotations

from .config import EngineConfig, create_pool, parse_duration
from .coordinators import StartWorkflowRequest, TaskCoordinator, WorkflowCoordinator
from .definitions import RetryPolicy, TaskDefinition, WorkflowDefinition
from .errors import (
    ConcurrencyConflictError,
    DatabaseError,
    DefinitionConflictError,
    FencingError,
    InvalidDefinitionError,
    InvalidStateError,
    LeaseLostError,
    MigrationError,
    OrchestratorError,
    PayloadError,
    TaskNotFoundError,
    WorkflowNotFoundError,
)
from .migrator import migrate, pending_migrations
from .models import (
    EventType,
    TaskExecution,
    TaskKind,
    TaskState,
    WorkflowEvent,
    WorkflowInstance,
    WorkflowState,
)
from .worker import TaskContext, Worker, WorkerStats

__version__ = "0.1.0"

__all__ = [
    "ConcurrencyConflictError",
    "DatabaseError",
    "DefinitionConflictError",
    "EngineConfig",
    "EventType",
    "FencingError",
    "InvalidDefinitionError",
    "InvalidStateError",
    "LeaseLostError",
    "MigrationError",
    "OrchestratorError",
    "PayloadError",
    "RetryPolicy",
    "StartWorkflowRequest",
    "TaskContext",
    "TaskCoordinator",
    "TaskDefinition",
    "TaskExecution",
    "TaskKind",
    "TaskNotFoundError",
    "TaskState",
    "Worker",
    "WorkerStats",
    "WorkflowCoordinator",
    "WorkflowDefinition",
    "WorkflowEvent",
    "WorkflowInstance",
    "WorkflowNotFoundError",
    "WorkflowState",
    "__version__",
    "create_pool",
    "migrate",
    "parse_duration",
    "pending_migrations",
]
