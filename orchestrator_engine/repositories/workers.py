"""Statements on ``waiting_workers``: idle workers a start can lease its task to (direct dispatch)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg

from .base import Repository, Row


class WorkerRepository(Repository):
    def worker_wait(
        self,
        conn: psycopg.Connection[Any],
        *,
        worker_id: UUID,
        namespace: str | None,
        task_types: list[str],
        free: int,
        seen: int,
        fresh: bool,
        lease: timedelta,
        lock_key: int,
        channel: str,
    ) -> None:
        params = {
            "worker_id": worker_id,
            "namespace": namespace,
            "task_types": task_types,
            "free": free,
            "seen": seen,
            "fresh": fresh,
            "lease": lease,
            "lock_key": lock_key,
            "channel": channel,
        }
        self._run(conn, "worker_wait", params)

    def worker_lock(self, conn: psycopg.Connection[Any], lock_key: int) -> bool:
        row = self._one(conn, "worker_lock", {"lock_key": lock_key})
        return bool(row and row["locked"])

    def worker_leave(self, conn: psycopg.Connection[Any], worker_id: UUID) -> None:
        self._run(conn, "worker_leave", {"worker_id": worker_id})

    def worker_forget_dead(self, conn: psycopg.Connection[Any], worker_id: UUID) -> None:
        self._run(conn, "worker_forget_dead", {"worker_id": worker_id})

    def worker_granted(
        self, conn: psycopg.Connection[Any], worker_id: UUID, execution_ids: list[UUID]
    ) -> list[Row]:
        return self._all(conn, "worker_granted", {"worker_id": worker_id, "execution_ids": execution_ids})

    def worker_held(self, conn: psycopg.Connection[Any], worker_id: UUID) -> list[UUID]:
        return [r["execution_id"] for r in self._all(conn, "worker_held", {"worker_id": worker_id})]
