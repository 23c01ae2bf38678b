"""Statements on ``task_executions`` (and the ``execution_leases`` rows that fence them)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg

from .base import Repository, Row

#: one result for task_finish_if_fenced: (execution_id, fence_token, state, output JSON, error JSON)
FinishResult = tuple[UUID, int, str, str | None, str | None]
_FINISHED_STATES = ("COMPLETED", "FAILED")


class ExecutionRepository(Repository):
    def task_insert_many(self, conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> list[Row]:
        return self._all(conn, "task_insert_many", {"rows": json.dumps(rows, default=str)})

    def task_insert_retry(self, conn: psycopg.Connection[Any], **params: Any) -> Row | None:
        return self._one(conn, "task_insert_retry", params)

    def task_get(self, conn: psycopg.Connection[Any], execution_id: UUID) -> Row | None:
        return self._one(conn, "task_get", {"execution_id": execution_id})

    def task_get_many(self, conn: psycopg.Connection[Any], execution_ids: list[UUID]) -> list[Row]:
        return self._all(conn, "task_get_many", {"execution_ids": execution_ids})

    def task_list_for_instance(self, conn: psycopg.Connection[Any], instance_id: UUID) -> list[Row]:
        return self._all(conn, "task_list_for_instance", {"instance_id": instance_id})

    def task_latest_for_task(
        self, conn: psycopg.Connection[Any], instance_id: UUID, task_id: str
    ) -> Row | None:
        return self._one(conn, "task_latest_for_task", {"instance_id": instance_id, "task_id": task_id})

    def task_completed_forward(self, conn: psycopg.Connection[Any], instance_id: UUID) -> list[Row]:
        return self._all(conn, "task_completed_forward", {"instance_id": instance_id})

    def task_lease_if_acquirable(
        self, conn: psycopg.Connection[Any], execution_id: UUID, worker_id: UUID, lease: timedelta
    ) -> Row | None:
        params = {"execution_id": execution_id, "worker_id": worker_id, "lease": lease}
        return self._one(conn, "task_lease_if_acquirable", params)

    def task_poll_and_lease(
        self, conn: psycopg.Connection[Any], **params: Any
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Lease ready executions; their rows as column names and value tuples (see ``_table``)."""
        return self._table(conn, "task_poll_and_lease", params)

    def task_select_lapsed(self, conn: psycopg.Connection[Any], limit: int) -> list[Row]:
        return self._all(conn, "task_select_lapsed", {"limit": limit})

    def task_requeue_if_lapsed(self, conn: psycopg.Connection[Any], execution_id: UUID) -> Row | None:
        return self._one(conn, "task_requeue_if_lapsed", {"execution_id": execution_id})

    def task_fail_if_lapsed(
        self, conn: psycopg.Connection[Any], execution_id: UUID, error: str, lapse: int
    ) -> Row | None:
        params = {"execution_id": execution_id, "error": error, "lapse": lapse}
        return self._one(conn, "task_fail_if_lapsed", params)

    def task_finish_if_fenced(
        self, conn: psycopg.Connection[Any], worker_id: UUID, results: Sequence[FinishResult]
    ) -> list[Row]:
        """Finish results ``(execution_id, fence_token, state, output, error)`` held by ``worker_id``."""
        return self._all(conn, "task_finish_if_fenced", self.finish_parameters(worker_id, results))

    def task_complete_many(
        self,
        conn: psycopg.Connection[Any],
        worker_id: UUID,
        results: Sequence[FinishResult],
        channel: str | None,
        *,
        whole: bool,
    ) -> list[Row]:
        """Complete forward results of running workflows in one statement (see the statement).

        Always returns a row; each row's ``general`` lists the results left to the general path, of
        workflows the statement did not touch; the rest were written. Each finished execution's row
        comes back whole if ``whole``, else with its ``execution_id`` only.
        """
        params = {**self.finish_parameters(worker_id, results), "channel": channel}
        return self._all(conn, "task_complete_many" if whole else "task_complete_many_ids", params)

    @staticmethod
    def finish_parameters(worker_id: UUID, results: Sequence[FinishResult]) -> dict[str, Any]:
        """Return task_finish_if_fenced's parameters: the results as one JSON array.

        Outputs and errors arrive as JSON text (the engine's encoder made them) and are spliced in as
        they are: not escaped into strings to be parsed twice, nor sent as arrays, which psycopg dumps
        element by element in Python. A result without an output (or error) leaves the key out, which
        the statement reads as NULL, so an output that is JSON ``null`` stays distinct from none.
        """
        items = []
        for execution_id, fence_token, state, output, error in results:
            if state not in _FINISHED_STATES or not isinstance(execution_id, UUID):
                raise ValueError(f"not a finishable result: {execution_id!r} {state!r}")
            item = f'{{"e":"{execution_id}","t":{int(fence_token)},"s":"{state}"'
            if output is not None:
                item += f',"o":{output}'
            if error is not None:
                item += f',"x":{error}'
            items.append(item + "}")
        return {"worker_id": worker_id, "results": "[" + ",".join(items) + "]"}

    def task_renew_many_if_held(
        self, conn: psycopg.Connection[Any], execution_ids: list[UUID], worker_id: UUID, lease: timedelta
    ) -> set[UUID]:
        params = {"execution_ids": execution_ids, "worker_id": worker_id, "lease": lease}
        return {row["execution_id"] for row in self._all(conn, "task_renew_many_if_held", params)}

    def task_release_dependents(
        self, conn: psycopg.Connection[Any], done: list[tuple[UUID, str, str]]
    ) -> list[Row]:
        """Release the dependents of completed ``(instance_id, task_id, kind)`` tasks."""
        params = {
            "instance_ids": [d[0] for d in done],
            "task_ids": [d[1] for d in done],
            "kinds": [d[2] for d in done],
        }
        return self._all(conn, "task_release_dependents", params)

    def task_cancel_open(
        self, conn: psycopg.Connection[Any], instance_id: UUID, kind: str | None
    ) -> list[Row]:
        return self._all(conn, "task_cancel_open", {"instance_id": instance_id, "kind": kind})

    def task_park_unpark(
        self, conn: psycopg.Connection[Any], park: list[UUID], unpark: list[UUID]
    ) -> Row | None:
        """Park the ready executions of ``park``'s instances and unpark those of ``unpark``'s."""
        return self._one(conn, "task_park_unpark", {"park": park, "unpark": unpark})

    def task_lease_delete(self, conn: psycopg.Connection[Any], execution_ids: list[UUID]) -> int:
        return self._run(conn, "task_lease_delete", {"execution_ids": execution_ids})
