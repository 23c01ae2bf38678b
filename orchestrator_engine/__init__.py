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
    "MigrationError",
    "OrchestratorError",
    "PayloadError",
    "RetryPolicy",
    "StartWorkflowRequest",
    "TaskCoordinator",
    "TaskDefinition",
    "TaskExecution",
    "TaskKind",
    "TaskNotFoundError",
    "TaskState",
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
