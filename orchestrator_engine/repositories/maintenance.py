"""Read-mostly statements for operators: status, doctor and purge."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg

from .base import Repository, Row


class MaintenanceRepository(Repository):
    def maintenance_counts_by_state(self, conn: psycopg.Connection[Any]) -> list[Row]:
        return self._all(conn, "maintenance_counts_by_state", {})

    def maintenance_oldest_ready(self, conn: psycopg.Connection[Any]) -> list[Row]:
        return self._all(conn, "maintenance_oldest_ready", {})

    def maintenance_leases_lapsing(self, conn: psycopg.Connection[Any], within: timedelta) -> list[Row]:
        return self._all(conn, "maintenance_leases_lapsing", {"within": within})

    def maintenance_recent_pollers(self, conn: psycopg.Connection[Any], window: timedelta) -> set[str]:
        return {r["task_type"] for r in self._all(conn, "maintenance_recent_pollers", {"window": window})}

    def maintenance_now(self, conn: psycopg.Connection[Any]) -> Any:
        row = self._one(conn, "maintenance_now", {})
        return None if row is None else row["now"]

    def maintenance_purge_batch(
        self, conn: psycopg.Connection[Any], states: list[str], older_than: timedelta, batch_size: int
    ) -> list[Row]:
        params = {"states": states, "older_than": older_than, "batch_size": batch_size}
        return self._all(conn, "maintenance_purge_batch", params)

    def maintenance_ready_depth(self, conn: psycopg.Connection[Any], namespace: str | None) -> int:
        row = self._one(conn, "maintenance_ready_depth", {"namespace": namespace})
        return 0 if row is None else int(row["depth"])
