"""Specification of migrate(): idempotent, concurrent-safe, crash-safe, and isolated per schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from helpers import ALL_MIGRATIONS, PACKAGE_ROOT
from psycopg import conninfo, sql
from yoyo.connections import parse_uri

from orchestrator_engine import (
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    create_pool,
)
from orchestrator_engine.config import EngineConfig
from orchestrator_engine.errors import DatabaseError, MigrationError
from orchestrator_engine.migrator import (
    _open_backend,
    _read_migrations,
    migrate,
    migration_lock_key,
    pending_migrations,
    yoyo_url,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_TABLES = {
    "workflow_definitions",
    "workflow_instances",
    "task_executions",
    "execution_leases",
    "events",
}


def _tables(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
    return {row[0] for row in rows}


def _applied_ids(dsn: str, schema: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT migration_id FROM {}._yoyo_migration ORDER BY applied_at_utc, migration_id"
            ).format(sql.Identifier(schema))
        ).fetchall()
    return [row[0] for row in rows]


def _spawn(script: str) -> subprocess.Popen[str]:
    """Start a real Python process that can import the engine from this checkout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def empty_dsn(fresh_database: Callable[..., str]) -> str:
    """Return the DSN of a new, empty database (no schema, no yoyo tables)."""
    return fresh_database(template=False)


def test_migrate_applies_the_initial_schema_to_an_empty_database(empty_dsn: str) -> None:
    assert ALL_MIGRATIONS[:2] == ["0001_initial_schema", "0002_ready_scan_function"]
    assert migrate(empty_dsn) == ALL_MIGRATIONS
    assert _tables(empty_dsn, "orchestrator") >= ENGINE_TABLES
    assert _tables(empty_dsn, "public") == set()


def test_migrate_twice_applies_nothing_the_second_time(empty_dsn: str) -> None:
    migrate(empty_dsn)
    assert migrate(empty_dsn) == []
    assert _applied_ids(empty_dsn, "orchestrator") == ALL_MIGRATIONS


def test_pending_migrations_lists_what_migrate_would_apply(empty_dsn: str) -> None:
    assert pending_migrations(empty_dsn) == ALL_MIGRATIONS
    # asking must not create the schema
    assert _tables(empty_dsn, "orchestrator") == set()
    migrate(empty_dsn)
    assert pending_migrations(empty_dsn) == []


def test_migrate_uses_the_schema_of_an_engine_config(empty_dsn: str) -> None:
    config = EngineConfig(dsn=empty_dsn, schema="from_config")
    assert migrate(config) == ALL_MIGRATIONS
    assert pending_migrations(config) == []
    assert _tables(empty_dsn, "from_config") >= ENGINE_TABLES


def test_template_clones_are_already_migrated(dsn: str) -> None:
    assert pending_migrations(dsn) == []


def test_six_processes_migrating_at_once_apply_the_schema_exactly_once(empty_dsn: str) -> None:
    script = (
        "import json, sys\n"
        "from orchestrator_engine.migrator import migrate\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        f"print(json.dumps(migrate({empty_dsn!r})), flush=True)\n"
    )
    procs = [_spawn(script) for _ in range(6)]
    try:
        for proc in procs:
            # barrier: every process has paid its import cost before any starts migrating
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0] * 6, [err for _, err in outcomes]
    results = sorted(json.loads(out.strip().splitlines()[-1]) for out, _ in outcomes)
    assert results == [[]] * 5 + [ALL_MIGRATIONS]
    assert _applied_ids(empty_dsn, "orchestrator") == ALL_MIGRATIONS
    with psycopg.connect(empty_dsn) as conn:
        count = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'workflow_instances'"
        ).fetchone()
    assert count == (1,)


# Each script runs the real migrate() with one yoyo internal wrapped so that the process announces
# "inside" and then hangs at a chosen point; the test SIGKILLs it there, as an OOM killer would.
_HANG_INSIDE_APPLY = """
import time
import yoyo.migrations
original = yoyo.migrations.MigrationStep.apply
def apply_then_hang(self, backend, force=False):
    original(self, backend, force)
    print("inside", flush=True)  # DDL executed, transaction still open
    time.sleep(120)
yoyo.migrations.MigrationStep.apply = apply_then_hang
from orchestrator_engine.migrator import migrate
migrate(DSN)
"""

_HANG_HOLDING_YOYO_LOCK_ROW = """
import time
import yoyo.internalmigrations
original = yoyo.internalmigrations.upgrade
def hang_then_upgrade(backend, version=None):
    print("inside", flush=True)  # yoyo_lock row committed by backend.lock()
    time.sleep(120)
yoyo.internalmigrations.upgrade = hang_then_upgrade
from orchestrator_engine.migrator import migrate
migrate(DSN)
"""


@pytest.fixture
def killed_migrator(request: pytest.FixtureRequest, empty_dsn: str) -> Iterator[tuple[str, int]]:
    """SIGKILL a migrator where the test's parameter makes it hang; yield (dsn, advisory locks it held)."""
    proc = _spawn(f"DSN = {empty_dsn!r}\n" + request.param)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "inside", proc.communicate(timeout=10)
        held = _advisory_locks_held(empty_dsn)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        yield empty_dsn, held
    finally:
        proc.kill()
        proc.communicate()


def _advisory_locks_held(dsn: str) -> int:
    key = migration_lock_key("orchestrator")
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = %s",
            (key,),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "killed_migrator",
    [
        pytest.param(_HANG_INSIDE_APPLY, id="killed-mid-apply"),
        pytest.param(_HANG_HOLDING_YOYO_LOCK_ROW, id="killed-holding-yoyo-lock-row"),
    ],
    indirect=True,
)
def test_a_killed_migrator_does_not_wedge_the_next_one(killed_migrator: tuple[str, int]) -> None:
    dsn, held_while_running = killed_migrator
    assert held_while_running == 1
    started = time.monotonic()
    assert migrate(dsn, lock_timeout=timedelta(seconds=5)) == ALL_MIGRATIONS
    # yoyo's own lock would make us wait its 10 s timeout and then fail
    assert time.monotonic() - started < 5
    assert _applied_ids(dsn, "orchestrator") == ALL_MIGRATIONS


def test_schemas_in_one_database_are_isolated(empty_dsn: str) -> None:
    assert migrate(empty_dsn, schema="a_one") == ALL_MIGRATIONS
    assert migrate(empty_dsn, schema="a_two") == ALL_MIGRATIONS
    with psycopg.connect(empty_dsn) as conn:
        conn.execute(
            "INSERT INTO a_one.workflow_definitions (namespace, name, version, definition, content_hash)"
            " VALUES ('ns', 'wf', 1, '{}', 'h')"
        )
        counts = [
            conn.execute(
                sql.SQL("SELECT count(*) FROM {}.workflow_definitions").format(sql.Identifier(schema))
            ).fetchone()
            for schema in ("a_one", "a_two")
        ]
    assert counts == [(1,), (0,)]
    with psycopg.connect(empty_dsn) as conn:
        # the poll's function reads the tables of the schema it was created in, whatever the caller's path
        paths = conn.execute(
            "SELECT n.nspname, p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE p.proname = 'next_ready_executions' ORDER BY 1"
        ).fetchall()
    assert [(schema, f"search_path={schema}" in config) for schema, config in paths] == [
        ("a_one", True),
        ("a_two", True),
    ]
    assert _applied_ids(empty_dsn, "a_one") == ALL_MIGRATIONS
    assert _applied_ids(empty_dsn, "a_two") == ALL_MIGRATIONS
    assert _tables(empty_dsn, "public") == set()
    assert migration_lock_key("a_one") != migration_lock_key("a_two")


def _migrate_until(config: EngineConfig, first_left_out: str) -> None:
    """Create ``config``'s schema and apply the migrations that sort before ``first_left_out``: an
    older engine's schema."""
    with psycopg.connect(config.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(config.schema)))
    with _open_backend(config.dsn, config.schema) as backend:
        backend.apply_migrations(backend.to_apply(_read_migrations().filter(lambda m: m.id < first_left_out)))


def test_a_schema_at_the_first_migration_upgrades_with_its_queued_work(empty_dsn: str) -> None:
    # A host that ran 0001 only, with work in every state 0003 must bring in line (rows written the way
    # 0001's statements wrote them): migrate() adds the rest, the invariants hold, and the poll (which
    # calls 0002's function, as 0003 redefines it) leases exactly the two waiting tasks.
    from orchestrator_engine.check import check_invariants

    config = EngineConfig(dsn=empty_dsn, schema="upgraded")
    _migrate_until(config, ALL_MIGRATIONS[1])
    assert _applied_ids(empty_dsn, "upgraded") == ALL_MIGRATIONS[:1]
    # this engine's start names 0007's table (it may lease the task to an idle worker) and calls
    # 0009's function: stand-ins let it run here (0009's own text makes the function), and with no
    # worker waiting it writes the rows 0001's start wrote
    stand_in = "CREATE TABLE upgraded.waiting_workers (worker_id uuid, namespace text, task_types text[],"
    stand_in += " free integer, granted bigint, lease_duration interval, lock_key bigint, channel text,"
    stand_in += " seen_at timestamptz)"
    event_id = (PACKAGE_ROOT / "migrations" / "0009_event_id_function.sql").read_text()
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(stand_in)
        conn.execute("SET search_path TO upgraded")
        conn.execute(event_id.encode())
    definition = WorkflowDefinition("ns", "wf", [TaskDefinition("t", task_type="work")])
    with create_pool(config, min_size=1, max_size=2) as pool:
        wc = WorkflowCoordinator(pool, config)
        wc.register_workflow(definition)
        waiting, requeued, cancelled = (
            wc.start_workflow(StartWorkflowRequest("ns", "wf", f"run-{i}", {"n": i})).instance_id
            for i in range(3)
        )
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            # 0001's requeue kept started_at and left the lease row's holder and expiry
            conn.execute(
                "UPDATE upgraded.task_executions SET started_at = now() - interval '1 minute',"
                " lapse_count = 1, fence_token = 1 WHERE workflow_instance_id = %s",
                (requeued,),
            )
            conn.execute(
                "INSERT INTO upgraded.execution_leases"
                " (lease_key, workflow_instance_id, holder_id, expires_at, fence_token)"
                " SELECT execution_id, workflow_instance_id, gen_random_uuid(), now() - interval '1 s', 1"
                " FROM upgraded.task_executions WHERE workflow_instance_id = %s",
                (requeued,),
            )
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            # a cancellation as 0001's engine wrote it: the READY row kept its ready_at (this engine's
            # statements need the later migrations' columns, so the rows are written here)
            conn.execute(
                "WITH moved AS ("
                "  UPDATE upgraded.workflow_instances SET state = 'CANCELLED', sequence_number = 4,"
                "  updated_at = now() WHERE instance_id = %(i)s RETURNING instance_id"
                "), stopped AS ("
                "  UPDATE upgraded.task_executions SET state = 'CANCELLED', finished_at = now()"
                "  WHERE workflow_instance_id = %(i)s RETURNING execution_id, task_id"
                ") INSERT INTO upgraded.events"
                " (event_id, workflow_instance_id, sequence_number, event_type, payload, idempotency_key)"
                " SELECT gen_random_uuid(), m.instance_id, 3, 'WORKFLOW_CANCELLED',"
                ' \'{"from": "RUNNING", "cancelled_executions": 1}\','
                " m.instance_id || ':workflow_cancelled:3'"
                " FROM moved m"
                " UNION ALL SELECT gen_random_uuid(), %(i)s, 4, 'TASK_CANCELLED',"
                " jsonb_build_object('kind', 'FORWARD', 'task_id', s.task_id,"
                " 'execution_id', s.execution_id),"
                " %(i)s || ':cancelled:' || s.execution_id FROM stopped s",
                {"i": cancelled},
            )

        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE upgraded.waiting_workers")
            conn.execute("DROP FUNCTION upgraded.event_id(text)")
        assert migrate(config) == ALL_MIGRATIONS[1:]
        with psycopg.connect(empty_dsn) as conn:
            report = check_invariants(conn, schema="upgraded", require_finished=False)
        assert [v.invariant for v in report.violations] == []
        leased = TaskCoordinator(pool, config).poll_tasks(uuid4(), task_types=["work"], limit=5)
    assert sorted(e.workflow_instance_id for e in leased) == sorted([waiting, requeued])
    assert {e.workflow_instance_id: e.fence_token for e in leased}[requeued] == 2
    with psycopg.connect(empty_dsn) as conn:
        # 0004: a finished instance's finished_at is its last update; a running one has none
        finished = conn.execute(
            "SELECT instance_id, finished_at IS NOT DISTINCT FROM updated_at AND finished_at IS NOT NULL"
            " FROM upgraded.workflow_instances WHERE finished_at IS NOT NULL"
        ).fetchall()
    assert finished == [(cancelled, True)]
    # an engine from before 0004, still running, finished a workflow without finished_at: refused
    with psycopg.connect(empty_dsn) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "UPDATE upgraded.workflow_instances SET state = 'COMPLETED' WHERE instance_id = %s", (waiting,)
        )
    # an engine from before 0003, still running, requeued keeping started_at: now refused, loudly
    with psycopg.connect(empty_dsn) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "UPDATE upgraded.task_executions SET state = 'READY', lease_holder = NULL,"
            " lease_expires_at = NULL WHERE workflow_instance_id = %s",
            (waiting,),
        )
    # 0005: the child tables lost their cascade; purge's function takes the cancelled workflow whole,
    # events written by 0001's engine included, and nothing of the others
    with create_pool(config, min_size=1, max_size=1) as pool:
        assert WorkflowCoordinator(pool, config).purge(older_than=timedelta(0)) == 1
    owner_column = {"workflow_instances": "instance_id"}
    with psycopg.connect(empty_dsn) as conn:
        owners = {
            table: conn.execute(
                sql.SQL("SELECT array_agg(DISTINCT {}) FROM {}").format(
                    sql.Identifier(owner_column.get(table, "workflow_instance_id")),
                    sql.Identifier("upgraded", table),
                )
            ).fetchone()[0]  # type: ignore[index]
            for table in ("workflow_instances", "task_executions", "execution_leases", "events")
        }
    assert all(cancelled not in (ids or []) for ids in owners.values()), owners
    assert sorted(owners["workflow_instances"]) == sorted([waiting, requeued])
    assert sorted(owners["events"]) == sorted([waiting, requeued])
    # 0006: one unique index per execution (its attempt) and per event (its sequence number), built
    # over the rows the older engine wrote; a second row for an attempt is refused
    with psycopg.connect(empty_dsn) as conn:
        indexes: dict[str, str] = dict(
            conn.execute(
                "SELECT indexname, tablename FROM pg_indexes"
                " WHERE schemaname = 'upgraded' AND tablename IN ('task_executions', 'events')"
            ).fetchall()
        )
        assert indexes == {
            "pk_task_executions": "task_executions",
            "uk_task_executions_attempt": "task_executions",
            "ix_task_executions_ready": "task_executions",
            "uk_events_sequence": "events",
        }
        with pytest.raises(psycopg.errors.UniqueViolation, match="uk_task_executions_attempt"):
            conn.execute(
                "INSERT INTO upgraded.task_executions"
                " (execution_id, workflow_instance_id, namespace, task_id, task_type, kind, idempotency_key,"
                "  attempt_number, max_attempts, state, depends_on, deps_remaining)"
                " SELECT gen_random_uuid(), workflow_instance_id, namespace, task_id, task_type, kind,"
                "  idempotency_key || ':again', attempt_number, max_attempts, 'PENDING', depends_on, 0"
                " FROM upgraded.task_executions WHERE workflow_instance_id = %s",
                (waiting,),
            )


#: (table, column, a value the column's domain refuses, the domain's constraint): migration 0010
_DOMAIN_CHECKS = [
    ("workflow_definitions", "version", 0, "ck_positive_integer"),
    ("workflow_instances", "state", "DONE", "ck_workflow_state"),
    ("workflow_instances", "sequence_number", -1, "ck_nonnegative_bigint"),
    ("task_executions", "state", "running", "ck_task_state"),
    ("task_executions", "kind", "UNDO", "ck_execution_kind"),
    ("task_executions", "attempt_number", 0, "ck_positive_integer"),
    ("task_executions", "max_attempts", 0, "ck_positive_integer"),
    ("task_executions", "fence_token", -1, "ck_nonnegative_bigint"),
    ("execution_leases", "fence_token", 0, "ck_positive_bigint"),
    ("events", "sequence_number", 0, "ck_positive_bigint"),
    ("waiting_workers", "free", -1, "ck_nonnegative_integer"),
    ("waiting_workers", "lease_duration", timedelta(0), "ck_positive_interval"),
]


def test_every_check_on_one_column_is_its_domain_and_every_table_check_relates_columns(
    rollback_conn: psycopg.Connection[Any],
) -> None:
    # a table's CHECKs are prepared again by every statement that writes the table, a domain's once
    # per session: so a rule about one column is that column's type (0010)
    table_checks = rollback_conn.execute(
        "SELECT conname, cardinality(conkey) FROM pg_constraint"
        " WHERE contype = 'c' AND conrelid <> 0 AND connamespace = 'orchestrator'::regnamespace"
    ).fetchall()
    assert table_checks, "the rules that relate two columns stay on their tables"
    assert [name for name, columns in table_checks if columns < 2] == []
    domains = dict(
        rollback_conn.execute(
            "SELECT c.table_name || '.' || c.column_name, c.domain_name FROM information_schema.columns c"
            " WHERE c.table_schema = 'orchestrator' AND c.domain_name IS NOT NULL"
        ).fetchall()
    )
    assert sorted(domains) == sorted(f"{table}.{column}" for table, column, _, _ in _DOMAIN_CHECKS)


@pytest.mark.parametrize(("table", "column", "bad", "constraint"), _DOMAIN_CHECKS)
def test_a_value_outside_its_columns_domain_is_refused(
    engine_config: EngineConfig, table: str, column: str, bad: object, constraint: str
) -> None:

    with create_pool(engine_config, min_size=1, max_size=1) as pool:
        wc = WorkflowCoordinator(pool, engine_config)
        wc.register_workflow(WorkflowDefinition("ns", "wf", [TaskDefinition("t", task_type="work")]))
        wc.start_workflow(StartWorkflowRequest("ns", "wf", "run"))
        TaskCoordinator(pool, engine_config).poll_tasks(uuid4(), task_types=["work"], limit=1)
    schema = engine_config.schema
    with psycopg.connect(engine_config.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.waiting_workers (worker_id, namespace, task_types, free, granted,"
                " lease_duration, lock_key, channel, seen_at)"
                " VALUES (%s, NULL, '{{work}}', 1, 0, interval '30 seconds', 1, 'nobody', now())"
            ).format(sql.Identifier(schema)),
            (uuid4(),),
        )
        # every table holds a row written by the engine (or, for waiting_workers, as a worker would)
        update = sql.SQL("UPDATE {} SET {} = %s").format(
            sql.Identifier(schema, table), sql.Identifier(column)
        )
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute(update, (bad,))
    assert refused.value.diag.constraint_name == constraint


def test_an_engine_running_while_0010_is_applied_recovers_after_one_failed_call(empty_dsn: str) -> None:
    # its connection has prepared statements that return columns 0010 makes domains: the server
    # refuses them from then on ("cached plan must not change result type"), so the engine closes
    # the connection and the pool replaces it
    config = EngineConfig(dsn=empty_dsn, schema="running")
    _migrate_until(config, "0010")
    worker = uuid4()
    with create_pool(config, min_size=1, max_size=1) as pool:
        wc = WorkflowCoordinator(pool, config)
        tc = TaskCoordinator(pool, config, engine=wc.engine)
        wc.register_workflow(WorkflowDefinition("ns", "wf", [TaskDefinition("t", task_type="work")]))

        def cycle(i: int) -> None:
            wc.start_workflow(StartWorkflowRequest("ns", "wf", f"run-{i}"))
            for execution in tc.poll_tasks(worker, task_types=["work"], limit=1):
                tc.complete_task(execution.execution_id, worker, execution.fence_token, {"i": i})

        for i in range(8):  # psycopg prepares a statement on its fifth run
            cycle(i)
        assert migrate(config) == [m for m in ALL_MIGRATIONS if m >= "0010"]
        failures = []
        for i in range(8, 20):
            try:
                cycle(i)
            except DatabaseError as exc:
                failures.append(str(exc))
        while tasks := tc.poll_tasks(worker, task_types=["work"], limit=10):
            for execution in tasks:
                tc.complete_task(execution.execution_id, worker, execution.fence_token, None)
        states = {wc.find_workflow("ns", "wf", f"run-{i}").state.value for i in range(20)}  # type: ignore[union-attr]
    assert len(failures) == 1, failures
    assert "a migration changed the type of a column" in failures[0]
    assert states == {"COMPLETED"}


def test_migrate_rejects_a_schema_that_is_not_a_plain_identifier(empty_dsn: str) -> None:
    with pytest.raises(ValueError, match="schema"):
        migrate(empty_dsn, schema="x; DROP TABLE y")


def test_connection_failure_is_a_migration_error_without_the_password() -> None:
    with pytest.raises(MigrationError) as excinfo:
        migrate("postgresql://orch:hunter2@127.0.0.1:1/db?connect_timeout=2")
    assert "hunter2" not in str(excinfo.value)
    assert "127.0.0.1" in str(excinfo.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "host=/var/run/postgresql port=5433 dbname=orch user=me",
        "postgresql://me:p%40ss%2Fw%3Frd%20x@db.example:6543/orch?sslmode=require&application_name=app",
        "postgres://me@[::1]:5432/orch",
        r"dbname=orch password='it\'s'",
        "host=h1,h2 port=5432,5433 dbname=orch target_session_attrs=read-write",
    ],
)
def test_yoyo_url_carries_every_libpq_parameter(dsn: str) -> None:
    url = yoyo_url(dsn, "orchestrator")
    assert url.startswith("postgresql+psycopg://")
    parsed = parse_uri(url)
    args = dict(parsed.args)
    assert args.pop("schema") == "orchestrator"
    assert args == conninfo.conninfo_to_dict(dsn)
