"""Statements on ``workflow_instances``."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg

from .base import Repository, Row


class InstanceRepository(Repository):
    def workflow_start_many(
        self,
        conn: psycopg.Connection[Any],
        instances: list[str],
        plan_texts: list[str],
        *,
        channel: str | None,
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Start the instances, each a JSON object's text; ``plan_texts`` are JSON plans, which each
        instance's "plan" indexes. Return the column names and a tuple per row: a batch's rows as
        dicts cost its caller more than reading them."""
        return self._table(conn, "workflow_start_many", self.start_parameters(instances, plan_texts, channel))

    def workflow_start_one(
        self, conn: psycopg.Connection[Any], params: dict[str, Any], *, direct: bool
    ) -> Row:
        """Start one workflow (the parameters of workflow_start_one); always returns a row.

        ``direct``: lease its lone ready task to an idle worker in this statement (direct dispatch).
        """
        row = self._one(conn, "workflow_start_direct" if direct else "workflow_start_one", params)
        assert row is not None  # both statements always return one row
        return row

    def announce(self, conn: psycopg.Connection[Any], channel: str, namespaces: list[str]) -> None:
        """Wake idle workers of ``namespaces``; send it in a transaction of its own (``Engine.single``)."""
        self._run(conn, "announce", {"channel": channel, "namespaces": namespaces})

    @staticmethod
    def start_parameters(instances: list[str], plan_texts: list[str], channel: str | None) -> dict[str, Any]:
        """Return workflow_start_many's parameters (the benchmark explains the statement with them)."""
        return {
            "instances": "[" + ",".join(instances) + "]",
            "plans": "[" + ",".join(plan_texts) + "]",
            "channel": channel,
        }

    def workflow_get(self, conn: psycopg.Connection[Any], instance_id: UUID) -> Row | None:
        return self._one(conn, "workflow_get", {"instance_id": instance_id})

    def workflow_get_by_run_id(
        self, conn: psycopg.Connection[Any], namespace: str, workflow_name: str, run_id: str
    ) -> Row | None:
        params = {"namespace": namespace, "workflow_name": workflow_name, "run_id": run_id}
        return self._one(conn, "workflow_get_by_run_id", params)

    def workflow_lock(self, conn: psycopg.Connection[Any], instance_id: UUID) -> Row | None:
        return self._one(conn, "workflow_lock", {"instance_id": instance_id})

    def workflow_update_if_sequence(self, conn: psycopg.Connection[Any], **params: Any) -> Row | None:
        return self._one(conn, "workflow_update_if_sequence", params)
