"""Shared plumbing of the repositories: run a named statement, map driver errors once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq
from psycopg.rows import tuple_row

from .._errors_map import is_stale_prepared_statement, translate
from ..errors import PayloadError
from ..sql import native_queries

Row = dict[str, Any]
TUPLES_OK = pq.ExecStatus.TUPLES_OK

#: the statements of every start and of every task's lease and completion, prepared on a
#: connection's first use of them. psycopg prepares a statement after its fifth execution, and
#: PostgreSQL plans each of its first five prepared executions anew: ten plans per connection, at
#: up to 3 ms each for the completion, a twentieth of the server's CPU in a drain of 40,000 tasks
#: on fresh connections. Preparing at once halves that. Per statement, not for the connection: a
#: pool the host shares keeps its own statements under psycopg's threshold. The rest run too rarely
#: to repay the round trip a first preparation costs. A connection whose prepare_threshold is None
#: (behind PgBouncer's transaction pooling, see docs/howto/production.md) still prepares nothing:
#: psycopg ignores prepare=True there. (A statement that fails in the call that prepares it stays
#: prepared on the server until its connection closes, psycopg having forgotten it: as at its
#: threshold, only now possibly at a connection's first run.)
PREPARED_AT_ONCE = frozenset(
    {
        "workflow_start_one",
        "workflow_start_direct",
        "workflow_start_many",
        "task_poll_and_lease",
        "task_complete_many",
        "task_complete_many_ids",
        "task_finish_if_fenced",
        "task_renew_many_if_held",
    }
)


class Repository:
    """Run named statements of one schema on a caller-owned connection."""

    def __init__(self, schema: str) -> None:
        self._q = native_queries(schema)

    def _all(self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> list[Row]:
        columns, rows = self._table(conn, name, params)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def _table(
        self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run ``name``; return its column names and a tuple of values per row (none if it returns none)."""
        values = [params[n] for n in self._q[name].names]
        try:
            with _cursor(conn) as cur:
                cur.execute(self._q[name].text, values, prepare=_prepare(name))
                # the result's status and names, not cur.description: that builds a Column per column
                result = cur.pgresult
                if result is None or result.status != TUPLES_OK:
                    return [], []
                columns = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
                return columns, cur.fetchall()
        except psycopg.Error as exc:
            raise _translated(conn, exc) from exc
        except UnicodeEncodeError as exc:
            raise PayloadError(f"a parameter of {name} is not valid Unicode") from exc

    def _one(self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> Row | None:
        rows = self._all(conn, name, params)
        return rows[0] if rows else None

    def _run(self, conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> int:
        values = [params[n] for n in self._q[name].names]
        try:
            with _cursor(conn) as cur:
                cur.execute(self._q[name].text, values, prepare=_prepare(name))
                return cur.rowcount
        except psycopg.Error as exc:
            raise _translated(conn, exc) from exc
        except UnicodeEncodeError as exc:
            raise PayloadError(f"a parameter of {name} is not valid Unicode") from exc


def _prepare(name: str) -> bool | None:
    """Return what psycopg's ``prepare`` gets for ``name``: True for PREPARED_AT_ONCE, else its own rule."""
    return True if name in PREPARED_AT_ONCE else None


def _translated(conn: psycopg.Connection[Any], exc: psycopg.Error) -> Exception:
    """Return the engine's error for ``exc``; close an engine connection that can no longer serve.

    A statement the server prepared before a migration changed the types it returns fails on that
    connection every time. In a transaction, its rollback makes psycopg prepare afresh; a statement
    of its own on one of the engine's autocommit connections has no rollback, so the connection is
    closed and its pool replaces it. A host's connection (no kept cursor) is left to the host.
    """
    if (
        is_stale_prepared_statement(exc)
        and conn.autocommit
        and conn.info.transaction_status == pq.TransactionStatus.IDLE
        and getattr(conn, _REUSED, None) is not None
    ):
        conn.close()
    return translate(exc)


class _Reused:
    """A connection's cursor that the repositories reuse, and who holds it now."""

    __slots__ = ("cursor", "taken")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.cursor: psycopg.RawCursor[tuple[Any, ...]] = psycopg.RawCursor(conn, row_factory=tuple_row)
        self.taken = threading.Lock()


#: the attribute of a connection that holds its _Reused (it lives and dies with the connection)
_REUSED = "_orchestrator_engine_cursor"


def keep_cursor(conn: psycopg.Connection[Any]) -> None:
    """Let the repositories keep a cursor on ``conn``, a connection the engine took from its pool.

    The engine calls it on pool connections only, never on a connection the host brings: the kept
    cursor and its connection refer to each other, so a connection the host drops without closing
    it would stay open until Python's cycle collector runs (pools close theirs). The cursor stays
    with the pooled connection when the host borrows it later (``ctx.transaction()``, say), and has
    the connection's adapters as they were when the engine first used it: after ``configure``.
    """
    if getattr(conn, _REUSED, None) is None:
        setattr(conn, _REUSED, _Reused(conn))


@contextmanager
def _cursor(conn: psycopg.Connection[Any]) -> Iterator[psycopg.RawCursor[tuple[Any, ...]]]:
    """Yield a cursor on ``conn``: the one kept on it (see keep_cursor) when free, else a new one.

    A new cursor per statement set up its adapters anew, looking up a dumper for every parameter and
    a loader for every column: for a start of one workflow, about a seventh of its client CPU. The
    kept cursor serves one statement at a time (a host may share its connection between threads);
    a statement that finds it taken gets a cursor of its own. The rows are copied out by
    ``fetchall``, so the result is freed at once: a kept cursor holds no payloads between statements.
    Rows are tuples whatever the connection's row factory (a host's may make dicts).
    """
    reused = getattr(conn, _REUSED, None)
    if reused is None or not reused.taken.acquire(blocking=False):
        with psycopg.RawCursor(conn, row_factory=tuple_row) as cur:
            yield cur
        return
    try:
        yield reused.cursor
    finally:
        result = reused.cursor.pgresult
        if result is not None:
            result.clear()
        reused.taken.release()
