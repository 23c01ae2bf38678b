"""Exceptions raised by orchestrator-engine: one tree rooted at OrchestratorError."""

from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    """Base class of every error the engine raises on purpose."""


class MigrationError(OrchestratorError):
    """The schema could not be migrated."""


class WorkflowNotFoundError(OrchestratorError):
    """No workflow definition or instance matches the given key."""


class TaskNotFoundError(OrchestratorError):
    """No task or execution matches the given key."""


class InvalidDefinitionError(OrchestratorError, ValueError):
    """A workflow definition is malformed (cycle, unknown dependency, bad name, ...)."""


class DefinitionConflictError(OrchestratorError):
    """A different definition is already registered under the same (namespace, name, version)."""


class InvalidStateError(OrchestratorError):
    """The call makes no sense for the current state of the workflow or task."""

    def __init__(self, message: str, *, state: str | None = None) -> None:
        super().__init__(message)
        self.state = state


class FencingError(OrchestratorError):
    """A complete/fail came from a worker that no longer holds the lease (renewal returns False instead)."""

    def __init__(self, message: str, *, execution_id: Any = None, fence_token: int | None = None) -> None:
        super().__init__(message)
        self.execution_id = execution_id
        self.fence_token = fence_token


class ConcurrencyConflictError(OrchestratorError):
    """A guarded update found the row changed underneath it (sequence guard, deadlock, serialization)."""


class LeaseLostError(OrchestratorError):
    """Raised inside ``TaskContext.transaction`` when the fence is stale: that transaction rolls back."""


class DatabaseError(OrchestratorError):
    """The database refused a statement for a reason the engine did not anticipate."""


class PayloadError(OrchestratorError, ValueError):
    """An input or output is not a storable JSON value (type, NUL, surrogate, NaN, size, depth)."""


__all__ = [
    "ConcurrencyConflictError",
    "DatabaseError",
    "DefinitionConflictError",
    "FencingError",
    "InvalidDefinitionError",
    "InvalidStateError",
    "LeaseLostError",
    "MigrationError",
    "OrchestratorError",
    "PayloadError",
    "TaskNotFoundError",
    "WorkflowNotFoundError",
]
