"""Statements on ``workflow_definitions``."""

from __future__ import annotations

from typing import Any

import psycopg

from .base import Repository, Row


class DefinitionRepository(Repository):
    def definition_insert_if_absent(self, conn: psycopg.Connection[Any], **params: Any) -> bool:
        return self._one(conn, "definition_insert_if_absent", params) is not None

    def definition_get(
        self, conn: psycopg.Connection[Any], namespace: str, name: str, version: int
    ) -> Row | None:
        return self._one(conn, "definition_get", {"namespace": namespace, "name": name, "version": version})

    def definition_get_latest(self, conn: psycopg.Connection[Any], namespace: str, name: str) -> Row | None:
        return self._one(conn, "definition_get_latest", {"namespace": namespace, "name": name})
