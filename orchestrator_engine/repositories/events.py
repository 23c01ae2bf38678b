"""Statements on ``events``."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg

from .base import Repository, Row


class EventRepository(Repository):
    def event_list_for_instance(self, conn: psycopg.Connection[Any], instance_id: UUID) -> list[Row]:
        return self._all(conn, "event_list_for_instance", {"instance_id": instance_id})
