"""The workflow shapes the benchmark runs; every task has type ``noop`` so one handler serves them all."""

from __future__ import annotations

from typing import Any

from psycopg_pool import ConnectionPool

from orchestrator_engine import (
    EngineConfig,
    StartWorkflowRequest,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
)

NAMESPACE = "bench"
TASK_TYPE = "noop"
FAN_WIDTH = 100


def single() -> WorkflowDefinition:
    return WorkflowDefinition(NAMESPACE, "single", [TaskDefinition("t", task_type=TASK_TYPE)])


def chain() -> WorkflowDefinition:
    return WorkflowDefinition(
        NAMESPACE,
        "chain",
        [
            TaskDefinition("a", task_type=TASK_TYPE),
            TaskDefinition("b", depends_on=["a"], task_type=TASK_TYPE),
            TaskDefinition("c", depends_on=["b"], task_type=TASK_TYPE),
        ],
    )


def fan() -> WorkflowDefinition:
    parts = [TaskDefinition(f"p{i}", depends_on=["split"], task_type=TASK_TYPE) for i in range(FAN_WIDTH)]
    return WorkflowDefinition(
        NAMESPACE,
        "fan",
        [
            TaskDefinition("split", task_type=TASK_TYPE),
            *parts,
            TaskDefinition("join", depends_on=[p.task_id for p in parts], task_type=TASK_TYPE),
        ],
    )


def tasks_per_workflow(definition: WorkflowDefinition) -> int:
    return len(definition.tasks)


def requests(definition: WorkflowDefinition, count: int, prefix: str = "run") -> list[StartWorkflowRequest]:
    """Return ``count`` start requests with distinct run ids and a small input."""
    return [StartWorkflowRequest(NAMESPACE, definition.name, f"{prefix}-{i}", {"i": i}) for i in range(count)]


def start_in_batches(
    pool: ConnectionPool[Any],
    config: EngineConfig,
    definition: WorkflowDefinition,
    count: int,
    batch: int = 500,
) -> None:
    """Register ``definition`` and start ``count`` runs of it through ``start_workflows``."""
    workflows = WorkflowCoordinator(pool, config)
    workflows.register_workflow(definition)
    todo = requests(definition, count)
    for i in range(0, len(todo), batch):
        workflows.start_workflows(todo[i : i + batch])
