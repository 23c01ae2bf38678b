"""Load the named SQL statements once, with the engine schema inserted as an identifier."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import NamedTuple

from psycopg import sql

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")
_FILES = (
    "definitions.sql",
    "instances.sql",
    "executions.sql",
    "events.sql",
    "maintenance.sql",
    "workers.sql",
    "check.sql",
)
#: statements made from a block by one replacement, so that the two cannot drift apart:
#: name -> (the block, the text replaced, which must occur in it exactly once, and its replacement)
_DERIVED = {
    # the worker's group commit: the same completion, answered with the ids of the finished
    # executions only. The worker reads nothing else, and the whole rows (every column, inputs and
    # outputs as JSON) cost it about a quarter of its CPU to load.
    "task_complete_many_ids": ("task_complete_many", "SELECT f.*,", "SELECT f.execution_id,"),
}


def _parse(text: str) -> dict[str, str]:
    parts = _BLOCK.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@cache
def raw_queries() -> dict[str, str]:
    """Return every named block of every ``.sql`` file, and the blocks derived from them, unrendered."""
    out: dict[str, str] = {}
    for name in _FILES:
        text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
        for key, body in _parse(text).items():
            if key in out:
                raise RuntimeError(f"duplicate query name {key!r} in {name}")
            out[key] = body
    return {**out, **_derive(out, _DERIVED)}


def _derive(blocks: dict[str, str], derived: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """Return the derived statements (see _DERIVED) made from ``blocks``."""
    out = {}
    for key, (source, old, new) in derived.items():
        if key in blocks or source not in blocks or blocks[source].count(old) != 1:
            raise RuntimeError(
                f"{key}: a block of that name exists, or {old!r} is not once in a block {source}"
            )
        out[key] = blocks[source].replace(old, new)
    return out


@cache
def queries(schema: str) -> dict[str, sql.Composed]:
    """Return every named statement with ``{schema}`` replaced by the quoted schema identifier."""
    ident = sql.Identifier(schema)
    return {name: sql.SQL(body).format(schema=ident) for name, body in raw_queries().items()}


class NativeQuery(NamedTuple):
    """A statement in PostgreSQL's own placeholders ($1, $2, ...), for psycopg's ``RawCursor``."""

    text: bytes
    #: the parameter name that each placeholder number stands for ($1 is names[0])
    names: tuple[str, ...]


@cache
def native_queries(schema: str) -> dict[str, NativeQuery]:
    """Return every named statement converted once to PostgreSQL's placeholders.

    psycopg converts a ``%(name)s`` query on every execute, and caches the conversion only for
    statements of at most 4 KB: for our statements that cost as much client CPU as the rest of a call.
    """
    return {name: _native(composed.as_string()) for name, composed in queries(schema).items()}


def _native(text: str) -> NativeQuery:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:  # %% is a literal %
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return NativeQuery(_PLACEHOLDER.sub(number, text).encode("utf-8"), tuple(names))
