"""The public coordinators; they own every transaction the engine opens."""

from __future__ import annotations

from .task import TaskCoordinator
from .workflow import StartWorkflowRequest, WorkflowCoordinator

__all__ = ["StartWorkflowRequest", "TaskCoordinator", "WorkflowCoordinator"]
