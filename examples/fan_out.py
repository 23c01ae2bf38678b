"""Fan-out / fan-in: split -> 20 parallel parts -> join, run by one worker with 8 threads.

python examples/fan_out.py [DSN]
"""

from __future__ import annotations

import time

from _server import database

from orchestrator_engine import (
    EngineConfig,
    StartWorkflowRequest,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
    create_pool,
    migrate,
)
from orchestrator_engine.worker import TaskContext, Worker

PARTS = 20


def part(ctx: TaskContext) -> int:
    n: int = ctx.input["workflow"]["n"]
    return n * int(ctx.task_id.split("_")[1])


def join(ctx: TaskContext) -> int:
    return sum(ctx.input["dependencies"].values())


def main(dsn: str) -> None:
    config = EngineConfig(dsn=dsn)
    migrate(config)
    parts = [TaskDefinition(f"part_{i}", depends_on=["split"], task_type="part") for i in range(PARTS)]
    definition = WorkflowDefinition(
        "examples",
        "fan",
        [TaskDefinition("split"), *parts, TaskDefinition("join", depends_on=[p.task_id for p in parts])],
    )
    with create_pool(config, max_size=12) as pool:
        workflows = WorkflowCoordinator(pool, config)
        workflows.register_workflow(definition)
        instance = workflows.start_workflow(StartWorkflowRequest("examples", "fan", "fan-1", {"n": 3}))
        handlers = {"split": lambda ctx: "ok", "part": part, "join": join}
        with Worker(pool, handlers, config=config, concurrency=8):
            while workflows.get_workflow(instance.instance_id).state is WorkflowState.RUNNING:
                time.sleep(0.05)
        output = workflows.get_workflow(instance.instance_id).output
        print("join =", output["join"])
        assert output["join"] == 3 * sum(range(PARTS))


if __name__ == "__main__":
    with database() as dsn:
        main(dsn)
