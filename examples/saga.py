"""Saga: reserve inventory -> charge card -> ship, undone in reverse order when shipping fails.

python examples/saga.py [DSN]
"""

from __future__ import annotations

import time
from datetime import timedelta

from _server import database

from orchestrator_engine import (
    EngineConfig,
    RetryPolicy,
    StartWorkflowRequest,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
    create_pool,
    migrate,
)
from orchestrator_engine.worker import TaskContext, Worker

FAST = RetryPolicy(max_attempts=2, initial_interval=timedelta(milliseconds=50))
SAGA = WorkflowDefinition(
    "examples",
    "order",
    [
        TaskDefinition("reserve", retry=FAST, compensation="release"),
        TaskDefinition("charge", depends_on=["reserve"], retry=FAST, compensation="refund"),
        TaskDefinition("ship", depends_on=["charge"], retry=FAST),
    ],
)
undo_log: list[str] = []


def ship(ctx: TaskContext) -> None:
    if ctx.input["workflow"]["address"] == "nowhere":
        raise RuntimeError("no carrier delivers there")


def undo(name: str) -> object:
    def handler(ctx: TaskContext) -> dict[str, str]:
        undo_log.append(name)
        return {"undid": ctx.input["task_id"]}

    return handler


def main(dsn: str) -> None:
    config = EngineConfig(dsn=dsn, poll_interval=timedelta(milliseconds=100))
    migrate(config)
    with create_pool(config) as pool:
        workflows = WorkflowCoordinator(pool, config)
        workflows.register_workflow(SAGA)
        good = workflows.start_workflow(
            StartWorkflowRequest("examples", "order", "order-1", {"address": "street"})
        )
        bad = workflows.start_workflow(
            StartWorkflowRequest("examples", "order", "order-2", {"address": "nowhere"})
        )
        handlers = {
            "reserve": lambda ctx: {"reservation": "r-1"},
            "charge": lambda ctx: {"charge": "c-1"},
            "ship": ship,
            "release": undo("release"),
            "refund": undo("refund"),
        }
        with Worker(pool, handlers, config=config):  # type: ignore[arg-type]
            while any(
                workflows.get_workflow(i).state in (WorkflowState.RUNNING, WorkflowState.COMPENSATING)
                for i in (good.instance_id, bad.instance_id)
            ):
                time.sleep(0.05)
        print("order-1:", workflows.get_workflow(good.instance_id).state.value)
        print("order-2:", workflows.get_workflow(bad.instance_id).state.value, "undone in order", undo_log)
        assert workflows.get_workflow(good.instance_id).state is WorkflowState.COMPLETED
        assert workflows.get_workflow(bad.instance_id).state is WorkflowState.COMPENSATED
        assert undo_log == ["refund", "release"]


if __name__ == "__main__":
    with database() as dsn:
        main(dsn)
