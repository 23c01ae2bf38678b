"""Shared plumbing of the repositories: run a named statement, map driver errors once."""

from __future__ import annotations

from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.rows import RowFactory, dict_row, tuple_row

from .._errors_map import translate
from ..errors import PayloadError
from ..sql import native_queries

Row = dict[str, Any]
R = TypeVar("R")
TUPLES_OK = pq.ExecStatus.TUPLES_OK


class Repository:
    """Run named statements of one schema on a caller-owned connection."""

    def __init__(self, schema: str) -> None:
        self._q = native_queries(schema)

    def _all(self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> list[Row]:
        return self._fetch(conn, name, params, dict_row, names=False)[1]

    def _table(
        self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Like ``_all``, as the column names and a tuple of values per row: no dict is built per row,
        for hot statements whose rows become objects at once."""
        return self._fetch(conn, name, params, tuple_row, names=True)

    def _fetch(
        self,
        conn: psycopg.Connection[Any],
        name: str,
        params: dict[str, Any],
        rows: RowFactory[R],
        *,
        names: bool,
    ) -> tuple[list[str], list[R]]:
        """Run ``name`` and return its rows, made by ``rows``, and (if ``names``) its column names."""
        values = [params[n] for n in self._q[name].names]
        try:
            with psycopg.RawCursor(conn, row_factory=rows) as cur:
                cur.execute(self._q[name].text, values)
                # the result's status and names, not cur.description: that builds a Column per column
                result = cur.pgresult
                if result is None or result.status != TUPLES_OK:
                    return [], []
                columns = [(result.fname(i) or b"").decode() for i in range(result.nfields)] if names else []
                return columns, cur.fetchall()
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
