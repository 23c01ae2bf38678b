"""The named statements in PostgreSQL's own placeholders, as the repositories send them."""

from __future__ import annotations

import re
import threading
from typing import Any

import psycopg
import pytest

from orchestrator_engine import (
    EngineConfig,
    StartWorkflowRequest,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    create_pool,
)
from orchestrator_engine.repositories.base import PREPARED_AT_ONCE, _cursor, keep_cursor
from orchestrator_engine.sql import _derive, _native, native_queries, raw_queries


def test_each_name_is_one_placeholder_numbered_in_order_of_first_use() -> None:
    native = _native("SELECT %(b)s, %(a)s, %(b)s::text, 100 %% 7")
    assert native.text == b"SELECT $1, $2, $1::text, 100 % 7"
    assert native.names == ("b", "a")


def test_every_statement_converts_without_a_leftover_placeholder() -> None:
    statements = native_queries("orchestrator")
    assert set(statements) == set(raw_queries())
    for name, native in statements.items():
        text = native.text.decode()
        assert "%(" not in text, name
        numbers = {int(n) for n in re.findall(r"\$(\d+)", text)}
        assert numbers == set(range(1, len(native.names) + 1)), name
        assert set(native.names) == set(re.findall(r"%\((\w+)\)s", raw_queries()[name])), name


def test_a_derived_statement_is_its_block_with_one_text_replaced() -> None:
    blocks = {"a": "SELECT x, y FROM t WHERE y > x"}
    assert _derive(blocks, {"b": ("a", "SELECT x,", "SELECT z,")}) == {"b": "SELECT z, y FROM t WHERE y > x"}
    for bad in (("a", "x", "z"), ("a", "SELECT w,", "SELECT z,")):  # twice; not at all
        with pytest.raises(RuntimeError, match="not once"):
            _derive(blocks, {"b": bad})
    with pytest.raises(RuntimeError, match="exists"):
        _derive(blocks, {"a": ("a", "SELECT x,", "SELECT z,")})
    with pytest.raises(RuntimeError, match="block b"):
        _derive(blocks, {"c": ("b", "SELECT x,", "SELECT z,")})
    # the worker's completion differs from the whole-row one in its result list only
    ids, whole = raw_queries()["task_complete_many_ids"], raw_queries()["task_complete_many"]
    assert ids != whole
    assert ids.replace("SELECT f.execution_id,", "SELECT f.*,") == whole
    # ... the statement's own, after its last CTE: no query of the WITH list is narrowed
    final = whole[whole.index("SELECT f.*,") :]
    assert not re.search(r"\bAS\s+(MATERIALIZED\s+)?\(", final), final
    assert whole.rindex("\n), ") < whole.index("SELECT f.*,")


def test_a_named_parameter_used_twice_is_sent_once(dsn: str) -> None:
    native = _native("SELECT %(x)s::int + %(x)s::int AS twice, %(y)s::text AS y")
    with psycopg.connect(dsn) as conn, psycopg.RawCursor(conn) as cur:
        cur.execute(native.text, [21, "ok"])
        assert cur.fetchone() == (42, "ok")


def test_a_connections_kept_cursor_serves_one_statement_at_a_time(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        keep_cursor(conn)
        with _cursor(conn) as kept:
            with _cursor(conn) as inner:
                assert inner is not kept, "a statement run while the kept cursor is taken gets its own"
            taken_elsewhere: list[object] = []
            other = threading.Thread(target=lambda: taken_elsewhere.append(_enter(conn)))
            other.start()
            other.join()
            assert len(taken_elsewhere) == 1
            assert taken_elsewhere[0] is not kept, "so does another thread's"
        with _cursor(conn) as again:
            assert again is kept, "once free it is reused"


def test_only_a_connection_the_engine_marked_keeps_a_cursor(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with _cursor(conn) as first:
            pass
        with _cursor(conn) as second:
            assert second is not first
        assert first.closed


def _enter(conn: psycopg.Connection[Any]) -> object:
    with _cursor(conn) as cur:
        return cur


def test_a_kept_cursor_holds_no_rows_after_its_statement(dsn: str) -> None:
    # the rows are copied out by fetchall: the result (payloads and all) is freed at once
    with psycopg.connect(dsn, autocommit=True) as conn:
        keep_cursor(conn)
        with _cursor(conn) as cur:
            cur.execute(b"SELECT repeat('x', 100000) FROM generate_series(1, 20)")
            assert len(cur.fetchall()) == 20
        assert cur.pgresult is not None
        assert cur.pgresult.ntuples == 0
        with _cursor(conn) as again:
            assert again is cur
            again.execute(b"SELECT 1")
            assert again.fetchall() == [(1,)]


def test_a_kept_cursor_is_reused_after_a_failed_statement(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        keep_cursor(conn)
        with pytest.raises(psycopg.errors.DivisionByZero), _cursor(conn) as cur:
            cur.execute(b"SELECT 1 / 0")
        with _cursor(conn) as again:
            assert again is cur
            again.execute(b"SELECT 2")
            assert again.fetchall() == [(2,)]


def test_each_statement_prepared_at_once_exists() -> None:
    assert PREPARED_AT_ONCE.issubset(raw_queries())


def test_hot_statements_are_prepared_on_first_use_and_a_statement_run_once_is_not(
    engine_config: EngineConfig,
) -> None:
    # one connection, so that the start and the reads below run on the one whose statements are listed
    with create_pool(engine_config, min_size=1, max_size=1) as pool:
        workflows = WorkflowCoordinator(pool, engine_config)
        workflows.register_workflow(WorkflowDefinition("prep", "one", [TaskDefinition("t")]))
        started = workflows.start_workflow(StartWorkflowRequest("prep", "one", "run-1"))
        assert workflows.get_workflow(started.instance_id) == started
        with pool.connection() as conn:
            prepared = [r[0] for r in conn.execute("SELECT statement FROM pg_prepared_statements")]
    assert sum("INSERT INTO" in s and "workflow_instances" in s for s in prepared) == 1, "the start"
    assert not any(s.startswith("SELECT * FROM") for s in prepared), "workflow_get ran once only"


def test_a_pool_that_prepares_nothing_gets_no_statement_prepared(engine_config: EngineConfig) -> None:
    # the setting docs/howto/production.md gives for PgBouncer's transaction pooling
    with create_pool(engine_config, min_size=1, max_size=1, kwargs={"prepare_threshold": None}) as pool:
        workflows = WorkflowCoordinator(pool, engine_config)
        workflows.register_workflow(WorkflowDefinition("prep", "one", [TaskDefinition("t")]))
        for i in range(8):
            workflows.start_workflow(StartWorkflowRequest("prep", "one", f"run-{i}"))
        with pool.connection() as conn:
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
