"""Start a workflow atomically with the host's own write (the outbox pattern).

python examples/host_transaction.py [DSN]
"""

from __future__ import annotations

import psycopg
from _server import database

from orchestrator_engine import (
    EngineConfig,
    StartWorkflowRequest,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    create_pool,
    migrate,
)


def main(dsn: str) -> None:
    config = EngineConfig(dsn=dsn)
    migrate(config)
    with create_pool(config) as pool, psycopg.connect(dsn) as conn:
        workflows = WorkflowCoordinator(pool, config)
        workflows.register_workflow(WorkflowDefinition("examples", "welcome", [TaskDefinition("send_email")]))
        conn.execute("CREATE TABLE IF NOT EXISTS public.signups (email text PRIMARY KEY)")
        conn.commit()

        # committed together: the signup row and its workflow
        with conn.transaction():
            conn.execute("INSERT INTO public.signups VALUES ('ada@example.org') ON CONFLICT DO NOTHING")
            workflows.start_workflow(
                StartWorkflowRequest("examples", "welcome", "ada@example.org"), conn=conn
            )

        # rolled back together: neither exists afterwards
        try:
            with conn.transaction():
                conn.execute("INSERT INTO public.signups VALUES ('bob@example.org')")
                workflows.start_workflow(
                    StartWorkflowRequest("examples", "welcome", "bob@example.org"), conn=conn
                )
                raise RuntimeError("the host's business rule failed")
        except RuntimeError:
            pass
        ada = workflows.find_workflow("examples", "welcome", "ada@example.org")
        bob = workflows.find_workflow("examples", "welcome", "bob@example.org")
        print("ada:", ada and ada.state.value, "bob:", bob)
        assert ada is not None
        assert bob is None


if __name__ == "__main__":
    with database() as dsn:
        main(dsn)
