"""The named statements in PostgreSQL's own placeholders, as the repositories send them."""

from __future__ import annotations

import re

import psycopg

from orchestrator_engine.sql import _native, native_queries, raw_queries


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


def test_a_named_parameter_used_twice_is_sent_once(dsn: str) -> None:
    native = _native("SELECT %(x)s::int + %(x)s::int AS twice, %(y)s::text AS y")
    with psycopg.connect(dsn) as conn, psycopg.RawCursor(conn) as cur:
        cur.execute(native.text, [21, "ok"])
        assert cur.fetchone() == (42, "ok")
