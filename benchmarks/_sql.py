"""Load the benchmark's named SQL blocks once, with a workload's schema inserted as an identifier."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from psycopg import sql

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
SQL_FILE = Path(__file__).resolve().parent / "sql" / "bench.sql"


@cache
def _raw() -> dict[str, str]:
    parts = _BLOCK.split(SQL_FILE.read_text(encoding="utf-8"))
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@cache
def bench_queries(schema: str) -> dict[str, sql.Composed]:
    """Return every benchmark statement with ``{schema}`` replaced by the quoted schema identifier."""
    ident = sql.Identifier(schema)
    return {name: sql.SQL(body).format(schema=ident) for name, body in _raw().items()}
