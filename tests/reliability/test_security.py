"""Security: parameterized SQL, least-privilege roles, namespace isolation, and no secret in any log.

The SQL checks read the package's source (AST) and its ``.sql`` files. The privilege checks run the
whole engine as a runtime role granted exactly what docs/security.md grants — the SQL is read from
that document, so the document and the test cannot drift apart.
"""

from __future__ import annotations

import ast
import logging
import re
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

import psycopg
import pytest
from helpers import ALL_MIGRATIONS
from psycopg import conninfo, errors, sql
from psycopg_pool import ConnectionPool

import orchestrator_engine
from orchestrator_engine import (
    EngineConfig,
    FencingError,
    MigrationError,
    PayloadError,
    RetryPolicy,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowNotFoundError,
    WorkflowState,
    create_pool,
    migrate,
)
from orchestrator_engine.worker import TaskContext, Worker
from reliability.conftest import FaultLog, scale

Pool = ConnectionPool[psycopg.Connection[Any]]
PACKAGE = Path(orchestrator_engine.__file__).resolve().parent
REPO_ROOT = PACKAGE.parent
SECURITY_DOC = REPO_ROOT / "docs" / "security.md"
SCHEMA = "orchestrator"
SETTLE = 30.0
NO_RETRY = RetryPolicy(max_attempts=1, initial_interval=timedelta(0), jitter=0)


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


# == (a) SQL is parameterized everywhere ===============================================================

#: SQL-looking literals that may appear in Python, each with the reason it is safe. The test fails on
#: any other such literal, and on an entry here that no longer matches anything.
ALLOWED_SQL_LITERALS: dict[tuple[str, str], str] = {
    ("migrator.py", "CREATE SCHEMA IF NOT EXISTS {}"): (
        "DDL takes no bind parameters; the schema goes in as sql.Identifier (and matches SCHEMA_PATTERN)"
    ),
    ("migrator.py", "SET lock_timeout = {}"): (
        "SET takes no bind parameters; the value is sql.Literal of an integer the engine computed"
    ),
    ("migrator.py", "SELECT pg_advisory_lock(%s)"): (
        "the migration lock, taken before the schema (and so the named queries) exists; the key is bound"
    ),
    ("migrator.py", "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)"): (
        "asks whether the schema exists before the named queries can be used; the name is bound"
    ),
    ("worker.py", "LISTEN {}"): "LISTEN takes no bind parameters; the channel goes in as sql.Identifier",
    ("cli.py", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"): (
        "constant text with no value in it: doctor reads one snapshot"
    ),
    ("__init__.py", "SELECT f.*,"): (
        "the start of task_complete_many's result list, which the loader replaces (once, checked) to "
        "derive task_complete_many_ids; constant text with no value in it"
    ),
    ("__init__.py", "SELECT f.execution_id,"): "its replacement: constant text with no value in it",
}

#: ``sql.SQL(x)`` where ``x`` is not a literal: only the loader of the named ``.sql`` files, whose text
#: test_sql_files_interpolate_only_placeholders_and_the_schema checks.
ALLOWED_DYNAMIC_SQL = {("sql/__init__.py", "body")}

# uppercase keywords as the brief's house style writes SQL, plus case-insensitive statement shapes
_SQL_UPPER = re.compile(
    r"\b(SELECT\s|INSERT\s+INTO\b|UPDATE\s|DELETE\s+FROM\b|CREATE\s|DROP\s|ALTER\s|TRUNCATE\b|GRANT\s"
    r"|REVOKE\s|LISTEN\s|NOTIFY\s|SET\s+\w+)"
)
_SQL_SHAPE = re.compile(
    r"\bselect\b[^.]*\bfrom\b|\binsert\s+into\b|\bupdate\s+\w+\s+set\b|\bdelete\s+from\b"
    r"|\b(create|drop|alter)\s+(table|schema|index|role|database|extension|function|view)\b",
    re.IGNORECASE,
)


@dataclass
class SqlScan:
    """What the AST walk found in the package."""

    literals: set[tuple[str, str]] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    executes: int = 0


def _modules() -> list[Path]:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20, "the scan found too few modules to be looking at the package"
    return modules


def _docstrings(tree: ast.AST) -> set[int]:
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _is_sql_call(node: ast.expr) -> bool:
    """Tell whether ``node`` is ``SQL(...)`` / ``sql.SQL(...)`` / ``psycopg.sql.SQL(...)``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "SQL") or (
        isinstance(func, ast.Attribute) and func.attr == "SQL"
    )


def _safe_query(node: ast.expr) -> bool:
    """Tell whether an ``execute`` argument is a shape that cannot carry interpolated values."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    if isinstance(node, ast.Subscript):  # a named query: q[name], self._q[name]
        return True
    if isinstance(node, ast.Attribute) and node.attr == "text" and isinstance(node.value, ast.Subscript):
        return True  # a named query's native form: self._q[name].text
    if _is_sql_call(node):
        return True
    # sql.SQL("... {} ...").format(sql.Identifier(...)): composition done by the driver
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and _is_sql_call(node.func.value)
    )


def _scan_module(path: Path, scan: SqlScan) -> None:
    rel = path.relative_to(PACKAGE).as_posix()
    _scan_source(rel, path.read_text(encoding="utf-8"), scan)


def _scan_source(rel: str, source: str, scan: SqlScan) -> None:
    tree = ast.parse(source, filename=rel)
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and (_SQL_UPPER.search(node.value) or _SQL_SHAPE.search(node.value))
        ):
            scan.literals.add((rel.rsplit("/", 1)[-1], node.value))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("execute", "executemany") and node.args:
                scan.executes += 1
                if not _safe_query(node.args[0]):
                    scan.problems.append(f"{where}: execute() of a built string: {ast.unparse(node.args[0])}")
            if node.func.attr == "format" and isinstance(node.func.value, (ast.Constant, ast.JoinedStr)):
                text = ast.unparse(node.func.value)
                if _SQL_UPPER.search(text) or _SQL_SHAPE.search(text):
                    scan.problems.append(f"{where}: str.format() builds SQL: {text[:60]}")
        if isinstance(node, ast.Call) and _is_sql_call(node):
            arg = node.args[0] if node.args else None
            literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            if not literal and (rel, ast.unparse(arg) if arg else "") not in ALLOWED_DYNAMIC_SQL:
                scan.problems.append(f"{where}: sql.SQL() of a non-literal: {ast.unparse(node)}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
            for side in (node.left, node.right):
                if isinstance(side, (ast.Constant, ast.JoinedStr)):
                    text = ast.unparse(side)
                    if _SQL_UPPER.search(text) or _SQL_SHAPE.search(text):
                        scan.problems.append(f"{where}: '%' or '+' builds SQL: {text[:60]}")


def test_python_modules_hold_no_sql_built_from_strings() -> None:
    scan = SqlScan()
    for path in _modules():
        _scan_module(path, scan)
    assert scan.executes >= 5, "the scan found too few execute() calls to be looking at the package"
    assert not scan.problems, "\n".join(scan.problems)
    unexpected = sorted(scan.literals - ALLOWED_SQL_LITERALS.keys())
    assert not unexpected, f"SQL literals outside orchestrator_engine/sql/: {unexpected}"
    stale = sorted(ALLOWED_SQL_LITERALS.keys() - scan.literals)
    assert not stale, f"allow-listed SQL literals that no longer exist (remove them): {stale}"


def test_scanner_catches_the_ways_sql_gets_built() -> None:
    """The scan is only worth something if it flags what it looks for."""
    bad = """
from psycopg import sql
def f(conn, name, table):
    conn.execute(f"SELECT * FROM t WHERE name = '{name}'")
    conn.execute("DELETE FROM t WHERE id = %s" % name)
    conn.execute("SELECT * FROM " + table)
    conn.execute("UPDATE t SET x = {}".format(name))
    query = "INSERT INTO t VALUES ('" + name + "')"
    conn.execute(query)
    conn.execute(sql.SQL(f"DROP TABLE {table}"))
"""
    scan = SqlScan()
    _scan_source("probe.py", bad, scan)
    flagged_lines = sorted({int(p.split(":")[1]) for p in scan.problems})
    assert flagged_lines == [4, 5, 6, 7, 8, 9, 10], scan.problems


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def _string_literals(text: str) -> list[str]:
    """Return the '...' literals of a SQL text, skipping -- comments (which may hold apostrophes)."""
    found: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        elif text[i] == "'":
            j = i + 1
            while j < len(text) and not (text[j] == "'" and not text.startswith("''", j)):
                j += 2 if text.startswith("''", j) else 1
            found.append(text[i : j + 1])
            i = j + 1
        else:
            i += 1
    return found


def _sql_problems(name: str, text: str) -> list[str]:
    problems: list[str] = []
    bare = _PLACEHOLDER.sub("", text).replace("%%", "")
    if "%" in bare:
        problems.append(f"{name}: a '%' that is not a %(name)s placeholder")
    braces = set(re.findall(r"\{[^}]*\}", text))
    if braces - {"{schema}"}:
        problems.append(f"{name}: interpolates {sorted(braces - {'{schema}'})}")
    for literal in _string_literals(text):
        if _PLACEHOLDER.search(literal) or "{" in literal:
            problems.append(f"{name}: a placeholder inside the string literal {literal}")
    # (EXECUTE ON FUNCTION names a privilege, as in a REVOKE; PL/pgSQL's EXECUTE runs a string)
    dynamic = r"\bEXECUTE\b(?!\s+ON\s+FUNCTION\b)|\bformat\s*\(|\bquote_(ident|literal|nullable)\b"
    if re.search(dynamic, text, re.IGNORECASE):
        problems.append(f"{name}: builds dynamic SQL on the server")
    return problems


def test_sql_files_interpolate_only_placeholders_and_the_schema() -> None:
    files = sorted((PACKAGE / "sql").glob("*.sql"))
    assert len(files) >= 5
    problems = [p for f in files for p in _sql_problems(f.name, f.read_text(encoding="utf-8"))]
    migrations = sorted((REPO_ROOT / "migrations").glob("*.sql"))
    for f in migrations:
        text = f.read_text(encoding="utf-8")
        if "%(" in text or "{" in text:
            problems.append(f"{f.name}: a migration is applied verbatim and must not hold placeholders")
        problems += [p for p in _sql_problems(f.name, text) if "dynamic" in p]
    assert not problems, "\n".join(problems)
    placeholders = {p for f in files for p in _PLACEHOLDER.findall(f.read_text(encoding="utf-8"))}
    assert {"instance_id", "execution_id", "results", "worker_id"} <= placeholders


def test_sql_scan_catches_interpolation() -> None:
    assert _sql_problems("x", "SELECT * FROM {schema}.t WHERE a = %(a)s AND b LIKE 'x%%'") == []
    assert _sql_problems("x", "SELECT * FROM {table}")
    assert _sql_problems("x", "SELECT * FROM t WHERE a = %s")
    assert _sql_problems("x", "SELECT * FROM t WHERE a = '%(a)s'")
    assert _sql_problems("x", "-- the row's key\nSELECT 'it''s %(a)s'")
    assert _sql_problems("x", "-- the row's key\nSELECT 'it''s', %(a)s") == []
    assert _sql_problems("x", "DO $$ BEGIN EXECUTE 'DROP TABLE ' || x; END $$")


# == shared: roles are cluster-wide, so every test drops what it created =================================


@dataclass
class Roles:
    """Create login roles and databases for one test; drop them all at teardown."""

    server_dsn: str
    new_database: Callable[[bool], str]
    roles: list[str] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)

    def database(self) -> str:
        dsn = self.new_database(False)
        self.databases.append(dsn)
        return dsn

    def reserve(self, prefix: str) -> str:
        """Return a fresh role name, dropped at teardown whoever creates the role."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.roles.append(name)
        return name

    def create(self, prefix: str, password: str | None = None) -> str:
        name = self.reserve(prefix)
        statement = sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name))
        if password is not None:
            statement = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            conn.execute(statement)
        return name

    def drop_all(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            existing = [
                str(r[0])
                for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (self.roles,))
            ]
            if not existing:
                return
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)", (existing,)
            )
        names = sql.SQL(", ").join(sql.Identifier(r) for r in existing)
        for dsn in self.databases:
            with psycopg.connect(dsn, autocommit=True) as conn:
                # REASSIGN takes back what DROP OWNED leaves alone (a database the role owns);
                # DROP OWNED then revokes every grant, database-level ones included
                conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(names))
                conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(names))
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            for role in existing:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
def roles(pg_server_dsn: str, fresh_database: Any) -> Iterator[Roles]:
    made = Roles(pg_server_dsn, lambda template: str(fresh_database(template=template)))
    try:
        yield made
    finally:
        made.drop_all()


def as_role(dsn: str, role: str) -> str:
    return conninfo.make_conninfo(dsn, user=role)


def dbname_of(dsn: str) -> str:
    return str(conninfo.conninfo_to_dict(dsn)["dbname"])


# == (b) least privilege, exactly as docs/security.md grants it ========================================


def doc_sql_block(label: str) -> str:
    """Return the ```sql block that follows ``<!-- security-test: label -->`` in docs/security.md."""
    text = SECURITY_DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- security-test: {label} -->\s*```sql\n(.*?)```", text, re.DOTALL)
    assert match, f"docs/security.md has no sql block marked {label!r}"
    return match.group(1)


def render(block: str, names: dict[str, str]) -> str:
    for placeholder, actual in names.items():
        block = re.sub(rf"\b{placeholder}\b", actual, block)
    return block


SAGA = WorkflowDefinition(
    "secure",
    "saga",
    (
        TaskDefinition("reserve", compensation="release", retry=NO_RETRY),
        TaskDefinition("charge", depends_on=["reserve"], retry=NO_RETRY),
    ),
)
PLAIN = WorkflowDefinition("secure", "plain", (TaskDefinition("reserve", retry=NO_RETRY),))


def _charge_declines(ctx: TaskContext) -> Any:
    raise RuntimeError("card declined")


def _denied(dsn: str, statement: sql.Composed) -> bool:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement)
    except errors.InsufficientPrivilege:
        return True
    return False


def test_engine_runs_under_the_documented_least_privilege_runtime_role(
    roles: Roles, fault_log: FaultLog
) -> None:
    admin = roles.database()
    migrator, runtime = roles.reserve("orch_mig"), roles.reserve("orch_run")
    names = {"orchestrator_migrator": migrator, "orchestrator_runtime": runtime, "app_db": dbname_of(admin)}
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(render(doc_sql_block("roles"), names).encode())
    migrator_dsn, runtime_dsn = as_role(admin, migrator), as_role(admin, runtime)
    assert migrate(migrator_dsn) == ALL_MIGRATIONS
    with psycopg.connect(migrator_dsn, autocommit=True) as conn:
        conn.execute(render(doc_sql_block("grants"), names).encode())

    config = EngineConfig(
        dsn=runtime_dsn,
        lease_duration=timedelta(seconds=5),
        renewal_interval=timedelta(seconds=1),
        poll_interval=timedelta(milliseconds=50),
    )
    pool = create_pool(config, max_size=6)
    try:
        wc = WorkflowCoordinator(pool, config)
        wc.register_workflow(SAGA)
        wc.register_workflow(PLAIN)
        saga, plain, doomed = (
            wc.start_workflow(StartWorkflowRequest("secure", wf, run)).instance_id
            for wf, run in (("saga", "s"), ("plain", "p"), ("plain", "d"))
        )
        wc.pause_workflow(doomed)
        wc.resume_workflow(doomed)
        wc.cancel_workflow(doomed)
        handlers = {
            "reserve": lambda ctx: {"ok": True},
            "charge": _charge_declines,
            "release": lambda ctx: None,
        }
        with Worker(pool, handlers, namespace="secure", config=config, concurrency=2):
            _wait_for(
                "the saga to compensate and the plain workflow to complete",
                lambda: (
                    wc.get_workflow(saga).state is WorkflowState.COMPENSATED
                    and wc.get_workflow(plain).state is WorkflowState.COMPLETED
                ),
            )
        assert [e.task_id for e in wc.list_tasks(saga) if e.kind.value == "COMPENSATION"] == ["reserve"]
        fault_log.record_workflows(3)
        assert fault_log.check(admin).ok

        # the runtime role holds no DELETE on any of these tables: purge's function runs as their owner
        assert wc.purge(older_than=timedelta(0)) == 3
    finally:
        pool.close()
    ids = [str(i) for i in (saga, plain, doomed)]
    with psycopg.connect(admin, autocommit=True) as conn:
        for table in ("workflow_instances", "task_executions", "execution_leases", "events"):
            column = "instance_id" if table == "workflow_instances" else "workflow_instance_id"
            query = sql.SQL("SELECT count(*) FROM {}.{} WHERE {} = ANY(%s::uuid[])").format(
                sql.Identifier(SCHEMA), sql.Identifier(table), sql.Identifier(column)
            )
            row = conn.execute(query, (ids,)).fetchone()
            assert row == (0,), f"purge left rows in {table}"
        yoyo_readable = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s "
            "AND has_table_privilege(%s, format('%%I.%%I', schemaname, tablename), 'SELECT')",
            (SCHEMA, "%yoyo%", runtime),
        ).fetchall()
        assert yoyo_readable == [], "the runtime role can read yoyo's bookkeeping"

    events = sql.Identifier(SCHEMA, "events")
    forbidden = {
        "UPDATE events": sql.SQL("UPDATE {} SET event_type = 'FORGED'").format(events),
        "DELETE FROM events": sql.SQL("DELETE FROM {}").format(events),
        "TRUNCATE events": sql.SQL("TRUNCATE {}").format(events),
        "DELETE FROM task_executions": sql.SQL("DELETE FROM {}").format(
            sql.Identifier(SCHEMA, "task_executions")
        ),
        "DELETE FROM workflow_instances": sql.SQL("DELETE FROM {}").format(
            sql.Identifier(SCHEMA, "workflow_instances")
        ),
        "UPDATE workflow_definitions": sql.SQL("UPDATE {} SET content_hash = 'x'").format(
            sql.Identifier(SCHEMA, "workflow_definitions")
        ),
        # no foreign key refuses these since 0008: only the grants keep definitions
        "DELETE FROM workflow_definitions": sql.SQL("DELETE FROM {}").format(
            sql.Identifier(SCHEMA, "workflow_definitions")
        ),
        "TRUNCATE workflow_definitions": sql.SQL("TRUNCATE {}").format(
            sql.Identifier(SCHEMA, "workflow_definitions")
        ),
        "CREATE TABLE in the schema": sql.SQL("CREATE TABLE {} (id int)").format(
            sql.Identifier(SCHEMA, "sneaky")
        ),
        "CREATE SCHEMA": sql.SQL("CREATE SCHEMA {}").format(sql.Identifier("sneaky")),
    }
    allowed = [what for what, statement in forbidden.items() if not _denied(runtime_dsn, statement)]
    assert allowed == [], f"the runtime role may {allowed}"
    with pytest.raises(MigrationError, match="InsufficientPrivilege"):
        migrate(runtime_dsn, schema="runtime_tries")


def test_the_documented_grants_leave_events_append_only() -> None:
    grants = doc_sql_block("grants")
    on_events = [line for line in grants.splitlines() if re.search(r"\.events\b", line)]
    assert on_events, "the grants block says nothing about events"
    for line in on_events:
        assert not re.search(r"\b(UPDATE|DELETE|TRUNCATE|ALL)\b", line), line
    assert not re.search(r"\bCREATE\b", grants), "the runtime role must not get CREATE"


# == (c) namespaces ==================================================================================

CHAIN = ("first", "second")


def _chain_in(namespace: str) -> WorkflowDefinition:
    return WorkflowDefinition(
        namespace,
        "chain",
        (
            TaskDefinition("first", task_type="step"),
            TaskDefinition("second", depends_on=["first"], task_type="step"),
        ),
    )


def test_pollers_of_one_namespace_never_receive_tasks_of_another(
    pool: Pool, engine_config: EngineConfig, fault_log: FaultLog
) -> None:
    wc, tc = WorkflowCoordinator(pool, engine_config), TaskCoordinator(pool, engine_config)
    for ns in ("a", "b"):
        wc.register_workflow(_chain_in(ns))
    per_namespace = scale(25, 200)
    requests = [
        StartWorkflowRequest(ns, "chain", f"{ns}-{i}") for i in range(per_namespace) for ns in ("a", "b")
    ]
    home = {w.instance_id: w.namespace for w in wc.start_workflows(requests)}
    strays: list[str] = []
    received: dict[str, list[TaskExecution]] = {"a": [], "b": []}
    lock = threading.Lock()
    done = threading.Event()

    def poller(namespace: str, seed: int) -> None:
        try:
            poll_and_complete(namespace, seed)
        except Exception as exc:  # a thread's exception would otherwise vanish
            with lock:
                strays.append(f"{namespace} poller crashed: {exc!r}")

    def poll_and_complete(namespace: str, seed: int) -> None:
        worker = uuid.uuid4()
        idle_since = time.monotonic()
        limit = 1 + seed % 4
        while not done.is_set() and time.monotonic() - idle_since < 2.0:
            batch = tc.poll_tasks(worker, namespace=namespace, limit=limit)
            if batch:
                idle_since = time.monotonic()
            for execution in batch:
                if execution.namespace != namespace or home[execution.workflow_instance_id] != namespace:
                    with lock:
                        strays.append(f"{namespace} poller got {execution.namespace}/{execution.task_id}")
                tc.complete_task(execution.execution_id, worker, execution.fence_token, {"by": namespace})
                with lock:
                    received[namespace].append(execution)

    threads = [threading.Thread(target=poller, args=(ns, i)) for i in range(3) for ns in ("a", "b")]
    for t in threads:
        t.start()
    try:
        _wait_for(
            "every workflow to complete",
            lambda: all(wc.get_workflow(i).state is WorkflowState.COMPLETED for i in home),
        )
    finally:
        done.set()
        for t in threads:
            t.join(10)
    assert strays == []
    for ns in ("a", "b"):
        assert len(received[ns]) == per_namespace * len(CHAIN)
    # a hostile filter never becomes SQL: it is refused before any statement, and hands out nothing
    wc.start_workflow(StartWorkflowRequest("b", "chain", "late"))
    with pytest.raises(ValueError, match="namespace"):
        tc.poll_tasks(uuid.uuid4(), namespace="x' OR '1'='1", limit=100)
    assert tc.poll_tasks(uuid.uuid4(), namespace="a", limit=100) == []
    fault_log.record_workflows(len(home))
    assert fault_log.check(engine_config.dsn, require_finished=False).ok


def test_a_worker_of_namespace_a_leaves_namespace_b_untouched(
    pool: Pool, engine_config: EngineConfig, fault_log: FaultLog
) -> None:
    config = EngineConfig(dsn=engine_config.dsn, poll_interval=timedelta(milliseconds=50))
    wc = WorkflowCoordinator(pool, config)
    for ns in ("a", "b"):
        wc.register_workflow(_chain_in(ns))
    count = scale(10, 50)
    started = wc.start_workflows(
        [StartWorkflowRequest(ns, "chain", f"{ns}-{i}") for i in range(count) for ns in ("b", "a")]
    )
    by_ns: dict[str, list[UUID]] = {"a": [], "b": []}
    for w in started:
        by_ns[w.namespace].append(w.instance_id)
    seen: list[str] = []

    def step(ctx: TaskContext) -> Any:
        seen.append(ctx.execution.namespace)
        return {"task": ctx.task_id}

    with Worker(pool, {"step": step}, namespace="a", config=config, concurrency=4):
        _wait_for(
            "namespace a to finish",
            lambda: all(wc.get_workflow(i).state is WorkflowState.COMPLETED for i in by_ns["a"]),
        )
    assert set(seen) == {"a"}
    for instance_id in by_ns["b"]:
        assert [e.event_type for e in wc.get_history(instance_id)] == ["WORKFLOW_STARTED", "TASK_SCHEDULED"]
    with Worker(pool, {"step": step}, namespace="b", config=config, concurrency=4):
        _wait_for(
            "namespace b to finish",
            lambda: all(wc.get_workflow(i).state is WorkflowState.COMPLETED for i in by_ns["b"]),
        )
    fault_log.record_workflows(len(started))
    assert fault_log.check(config.dsn).ok


# == (d) no password and no payload in logs or error messages ===========================================


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _url(role: str, password: str, host: str, port: int | str, dbname: str) -> str:
    return f"postgresql://{quote(role)}:{quote(password, safe='')}@{host}:{port}/{dbname}"


def _chain_text(exc: BaseException) -> str:
    """Return everything an exception could show: messages, reprs and the whole chained traceback."""
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


def test_no_password_or_payload_reaches_logs_or_error_messages(
    roles: Roles, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], fault_log: FaultLog
) -> None:
    password = f"Pw{uuid.uuid4().hex}Zq"
    marker = f"PAYLOAD-{uuid.uuid4().hex}"
    admin = roles.database()
    role = roles.create("orch_secret", password=password)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(dbname_of(admin)), sql.Identifier(role)
            )
        )
    params = conninfo.conninfo_to_dict(admin)
    host, port = str(params.get("host") or "127.0.0.1"), str(params.get("port") or 5432)
    dsn = _url(role, password, host, port, dbname_of(admin))
    caplog.set_level(logging.DEBUG)
    errors_seen: list[BaseException] = []

    def expect(
        exc_type: type[BaseException] | tuple[type[BaseException], ...], call: Callable[[], object]
    ) -> None:
        with pytest.raises(exc_type) as info:
            call()
        errors_seen.append(info.value)

    config = EngineConfig(
        dsn=dsn,
        lease_duration=timedelta(seconds=5),
        renewal_interval=timedelta(seconds=1),
        poll_interval=timedelta(milliseconds=50),
    )
    shown = [repr(config), str(config), config.redacted_dsn]
    shown.append(
        repr(
            EngineConfig.from_mapping(
                {
                    "orchestrator": {
                        "datasource": {
                            "url": f"jdbc:postgresql://{host}:{port}/x",
                            "username": role,
                            "password": password,
                        }
                    }
                }
            )
        )
    )
    assert migrate(config) == ALL_MIGRATIONS
    pool = create_pool(config, max_size=6)
    try:
        wc, tc = WorkflowCoordinator(pool, config), TaskCoordinator(pool, config)
        flow = (
            TaskDefinition("fetch", retry=NO_RETRY),
            TaskDefinition("explode", depends_on=["fetch"], retry=NO_RETRY),
        )
        wc.register_workflow(WorkflowDefinition("quiet", "flow", flow))
        wc.register_workflow(WorkflowDefinition("quiet", "leaky", (TaskDefinition("leak", retry=NO_RETRY),)))
        instance = wc.start_workflow(StartWorkflowRequest("quiet", "flow", "r1", {"secret": marker}))
        leaky = wc.start_workflow(StartWorkflowRequest("quiet", "leaky", "r1", {"secret": marker}))

        def explode(ctx: TaskContext) -> Any:
            raise RuntimeError(f"handler failed on {ctx.input['dependencies']['fetch']['echo']}")

        handlers = {
            "fetch": lambda ctx: {"echo": ctx.input["workflow"]["secret"]},
            "explode": explode,
            "leak": lambda ctx: {marker: {1, 2}},  # not JSON: the worker turns it into a failure
        }
        with Worker(pool, handlers, namespace="quiet", config=config, concurrency=2):
            _wait_for(
                "both workflows to fail",
                lambda: all(
                    wc.get_workflow(w.instance_id).state is WorkflowState.FAILED for w in (instance, leaky)
                ),
            )
        errors = [e.error for e in wc.list_tasks(instance.instance_id) if e.error]
        assert any(marker in str(e) for e in errors), "the handler's error should be stored, just not logged"

        other = wc.start_workflow(StartWorkflowRequest("quiet", "flow", "r2", {"secret": marker}))
        held = tc.poll_tasks(uuid.uuid4(), namespace="quiet", task_types=["fetch"])[0]
        assert held.workflow_instance_id == other.instance_id
        expect(
            FencingError,
            lambda: tc.complete_task(held.execution_id, uuid.uuid4(), held.fence_token, {"m": marker}),
        )
        expect(
            PayloadError,
            lambda: tc.complete_task(
                held.execution_id, held.lease_holder or uuid.uuid4(), held.fence_token, {"m": marker + "\x00"}
            ),
        )
        expect(
            PayloadError,
            lambda: wc.start_workflow(StartWorkflowRequest("quiet", "flow", "r3", {marker: {marker}})),
        )
        expect(
            PayloadError,
            lambda: wc.start_workflow(StartWorkflowRequest("quiet", "flow", "r4", marker * 100_000)),
        )
        expect(WorkflowNotFoundError, lambda: wc.get_workflow(uuid.uuid4()))
        fault_log.record_workflows(2)
    finally:
        pool.close()

    closed = _closed_port()
    unreachable = (
        _url(role, password, "127.0.0.1", closed, "x"),
        f"host=127.0.0.1 port={closed} user={role} password={password} dbname=x",
    )
    for bad in unreachable:
        expect(MigrationError, lambda: migrate(bad))  # noqa: B023 - called before the loop moves on
        expect(Exception, lambda: create_pool(EngineConfig(dsn=bad), open_timeout=1.0).close())  # noqa: B023
    expect(ValueError, lambda: EngineConfig(dsn=f"host=127.0.0.1 password={password} dbname='unterminated"))
    expect(ValueError, lambda: EngineConfig(dsn=_url(role, password, "h", 1, "x"), schema="Bad Schema"))

    for exc in errors_seen:
        text = _chain_text(exc)
        assert password not in text, f"{type(exc).__name__} shows the password: {exc}"
        assert marker not in text, f"{type(exc).__name__} shows the payload: {exc}"
    for text in shown:
        assert password not in text, text
        assert "***" in text, text
    leaks = []
    for record in caplog.records:
        text = record.getMessage() + (
            "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
        )
        if password in text:
            leaks.append(f"{record.levelname} {record.name}: password in {text[:200]!r}")
        if record.levelno >= logging.INFO and marker in text:
            leaks.append(f"{record.levelname} {record.name}: payload in {text[:200]!r}")
    assert leaks == []
    assert any(r.name.startswith("orchestrator_engine") for r in caplog.records), "the engine logged nothing"
    printed = capsys.readouterr()
    assert password not in printed.out + printed.err
    assert marker not in printed.out + printed.err
