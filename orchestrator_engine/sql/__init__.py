"""Load the named SQL statements once, with the engine schema inserted as an identifier."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from psycopg import sql

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_FILES = ("definitions.sql", "instances.sql", "executions.sql", "events.sql", "maintenance.sql", "check.sql")


def _parse(text: str) -> dict[str, str]:
    parts = _BLOCK.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@cache
def raw_queries() -> dict[str, str]:
    """Return every named block of every ``.sql`` file, unrendered."""
    out: dict[str, str] = {}
    for name in _FILES:
        text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
        for key, body in _parse(text).items():
            if key in out:
                raise RuntimeError(f"duplicate query name {key!r} in {name}")
            out[key] = body
    return out


@cache
def queries(schema: str) -> dict[str, sql.Composed]:
    """Return every named statement with ``{schema}`` replaced by the quoted schema identifier."""
    ident = sql.Identifier(schema)
    return {name: sql.SQL(body).format(schema=ident) for name, body in raw_queries().items()}
