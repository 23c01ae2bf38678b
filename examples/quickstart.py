"""Quick start: define a two-step workflow, start it, run a worker until it completes.

python examples/quickstart.py [DSN]
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


def fetch(ctx: TaskContext) -> dict[str, int]:
    return {"size": len(ctx.input["workflow"]["url"])}


def report(ctx: TaskContext) -> str:
    return f"page has {ctx.input['dependencies']['fetch']['size']} characters in its URL"


def main(dsn: str) -> None:
    config = EngineConfig(dsn=dsn)
    migrate(config)  # at application start-up; safe from many processes at once
    with create_pool(config) as pool:
        workflows = WorkflowCoordinator(pool, config)
        workflows.register_workflow(
            WorkflowDefinition(
                "examples", "crawl", [TaskDefinition("fetch"), TaskDefinition("report", depends_on=["fetch"])]
            )
        )
        instance = workflows.start_workflow(
            StartWorkflowRequest("examples", "crawl", run_id="crawl-1", input={"url": "https://example.org"})
        )
        with Worker(pool, {"fetch": fetch, "report": report}, config=config):
            while workflows.get_workflow(instance.instance_id).state is WorkflowState.RUNNING:
                time.sleep(0.05)
        done = workflows.get_workflow(instance.instance_id)
        print(done.state.value, done.output)
        assert done.state is WorkflowState.COMPLETED


if __name__ == "__main__":
    with database() as dsn:
        main(dsn)
