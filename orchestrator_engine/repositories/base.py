"""Shared plumbing of the repositories: run a named statement, map driver errors once."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import pq
from psycopg.rows import dict_row

from .._errors_map import translate
from ..errors import PayloadError
from ..sql import native_queries

Row = dict[str, Any]
TUPLES_OK = pq.ExecStatus.TUPLES_OK


class Repository:
    """Run named statements of one schema on a caller-owned connection."""

    def __init__(self, schema: str) -> None:
        self._q = native_queries(schema)

    def _all(self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> list[Row]:
        values = [params[n] for n in self._q[name].names]
        try:
            with psycopg.RawCursor(conn, row_factory=dict_row) as cur:
                cur.execute(self._q[name].text, values)
                # the result's status, not cur.description: that builds a Column object per column
                result = cur.pgresult
                return cur.fetchall() if result is not None and result.status == TUPLES_OK else []
        except psycopg.Error as exc:
            raise translate(exc) from exc
        except UnicodeEncodeError as exc:
            raise PayloadError(f"a parameter of {name} is not valid Unicode") from exc

    def _one(self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> Row | None:
        rows = self._all(conn, name, params)
        return rows[0] if rows else None

    def _run(self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> int:
        values = [params[n] for n in self._q[name].names]
        try:
            with psycopg.RawCursor(conn) as cur:
                cur.execute(self._q[name].text, values)
                return cur.rowcount
        except psycopg.Error as exc:
            raise translate(exc) from exc
        except UnicodeEncodeError as exc:
            raise PayloadError(f"a parameter of {name} is not valid Unicode") from exc
