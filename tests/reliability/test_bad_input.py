"""Bad input: every malformed argument is refused with a clear error, and nothing is written.

The corpus below is a table: each case is one call through the public API with one bad argument (a
malformed DAG, a hostile name, a value jsonb cannot store, a wrong type, an unknown id, a stale token).
Each case must raise an OrchestratorError, ValueError or TypeError (never a raw psycopg error), with a
message that names what was wrong, and must leave every table of the engine's schema byte-for-byte as
it was. All cases share one database, so the last test checks the engine still works afterwards.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import conninfo, sql

from orchestrator_engine import (
    DefinitionConflictError,
    EngineConfig,
    FencingError,
    InvalidDefinitionError,
    InvalidStateError,
    OrchestratorError,
    PayloadError,
    RetryPolicy,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskNotFoundError,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowNotFoundError,
    WorkflowState,
    create_pool,
    migrate,
)
from reliability.conftest import FaultLog

NS = "bad-input"
SCHEMA = "orchestrator"
HUGE = "x" * 10_000
SQLISH = "'; DROP TABLE orchestrator.events; --"
ONE_MIB = 1_048_576
#: the families a refusal may belong to; anything else (a psycopg error above all) is a leak
REFUSALS = (OrchestratorError, ValueError, TypeError)
SINGLE = RetryPolicy(max_attempts=1, initial_interval=timedelta(0), jitter=0)

OK = WorkflowDefinition(
    NS,
    "ok",
    (
        TaskDefinition("first", compensation="undo-first", retry=SINGLE),
        TaskDefinition("second", depends_on=["first"], retry=SINGLE),
    ),
)
SOLO = WorkflowDefinition(NS, "solo", (TaskDefinition("only", retry=SINGLE),))


# -- the shared database -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What the cases aim at: coordinators, and instances in each interesting state."""

    dsn: str
    wc: WorkflowCoordinator
    tc: TaskCoordinator
    worker: UUID
    held: TaskExecution  # "first" of ``running``, leased by ``worker``
    running: UUID
    completed: UUID
    failed: UUID


@pytest.fixture(scope="module")
def ctx(pg_server_dsn: str, template_database: str) -> Iterator[Ctx]:
    """Yield one migrated database, shared by every case of this module, with instances set up."""
    name = f"orch_bad_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_database)
            )
        )
    dsn = conninfo.make_conninfo(pg_server_dsn, dbname=name)
    # a lease no case can outlive: a lapse would let the engine write during a refused call
    config = EngineConfig(
        dsn=dsn, lease_duration=timedelta(hours=1), renewal_interval=timedelta(minutes=1), notify=False
    )
    pool = create_pool(config, max_size=4)
    try:
        wc, tc = WorkflowCoordinator(pool, config), TaskCoordinator(pool, config)
        wc.register_workflow(OK)
        wc.register_workflow(SOLO)
        worker = uuid.uuid4()
        running = _start(wc, "ok", "running")
        (held,) = tc.poll_tasks(worker, namespace=NS, task_types=["first"])
        completed = _start(wc, "solo", "completed")
        (only,) = tc.poll_tasks(worker, namespace=NS, task_types=["only"])
        tc.complete_task(only.execution_id, worker, only.fence_token, {"done": True})
        failed = _start(wc, "solo", "failed")
        (only,) = tc.poll_tasks(worker, namespace=NS, task_types=["only"])
        tc.fail_task(only.execution_id, worker, only.fence_token, {"message": "boom"})
        assert wc.get_workflow(completed).state is WorkflowState.COMPLETED
        assert wc.get_workflow(failed).state is WorkflowState.FAILED
        yield Ctx(dsn, wc, tc, worker, held, running, completed, failed)
    finally:
        pool.close()
        with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _start(wc: WorkflowCoordinator, workflow: str, run_id: str) -> UUID:
    return wc.start_workflow(StartWorkflowRequest(NS, workflow, run_id)).instance_id


def fingerprint(dsn: str) -> dict[str, tuple[int, str]]:
    """Return (row count, hash of every row's text) for every table of the engine's schema.

    The list of schemas counts too, so a call that creates a stray schema is caught.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            str(r[0])
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename", (SCHEMA,)
            )
        ]
        assert {"events", "task_executions", "workflow_instances"} <= set(tables)
        schemas = sorted(str(r[0]) for r in conn.execute("SELECT nspname FROM pg_namespace"))
        out: dict[str, tuple[int, str]] = {"<schemas>": (len(schemas), "|".join(schemas))}
        for table in tables:
            query = sql.SQL(
                "SELECT count(*), md5(COALESCE(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {}.{} t"
            ).format(sql.Identifier(SCHEMA), sql.Identifier(table))
            row = conn.execute(query).fetchone()
            assert row is not None
            out[table] = (int(row[0]), str(row[1]))
        return out


# -- building bad calls --------------------------------------------------------------------------------

Call = Callable[[Ctx], object]


@dataclass(frozen=True)
class Case:
    """One bad call, the refusal it must meet, and a word the message must contain."""

    id: str
    call: Call
    raises: type[BaseException] | tuple[type[BaseException], ...]
    mentions: str


def nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


def register(*tasks: Any, name: Any = "wf", namespace: Any = NS, version: Any = 1) -> Call:
    """Build (inside the call, where validation happens) and register a definition."""

    def call(ctx: Ctx) -> object:
        return ctx.wc.register_workflow(
            WorkflowDefinition(namespace=namespace, name=name, tasks=tasks, version=version)
        )

    return call


def task_with(**options: Any) -> Call:
    """Register a one-task workflow whose task gets ``options``."""

    def call(ctx: Ctx) -> object:
        return register(TaskDefinition("t", **options))(ctx)

    return call


def retry_with(**options: Any) -> Call:
    """Register a one-task workflow whose task's RetryPolicy gets ``options``."""

    def call(ctx: Ctx) -> object:
        return register(TaskDefinition("t", retry=RetryPolicy(**options)))(ctx)

    return call


def start(**overrides: Any) -> Call:
    """Start a run of ``ok`` (fresh run_id) with some request fields replaced."""

    def call(ctx: Ctx) -> object:
        fields: dict[str, Any] = {
            "namespace": NS,
            "workflow_name": "ok",
            "run_id": f"run-{uuid.uuid4()}",
            "input": None,
        }
        fields.update(overrides)
        return ctx.wc.start_workflow(StartWorkflowRequest(**fields))

    return call


class _Posing(str):
    """A name that claims to be the workflow "ok" whatever its characters."""

    def __eq__(self, other: object) -> bool:
        return other == "ok"

    def __hash__(self) -> int:
        return hash("ok")


def start_input(value: Any) -> Call:
    return start(input=value)


def complete(*, execution: Any = None, worker: Any = None, token: Any = None, output: Any = None) -> Call:
    """Complete the held execution, with any of its arguments replaced."""

    def call(ctx: Ctx) -> object:
        return ctx.tc.complete_task(
            ctx.held.execution_id if execution is None else execution,
            ctx.worker if worker is None else worker,
            ctx.held.fence_token if token is None else token,
            output,
        )

    return call


def complete_token(token: Any) -> Call:
    """Complete the held execution presenting ``token`` (``None`` really passed as the token)."""
    return lambda ctx: ctx.tc.complete_task(ctx.held.execution_id, ctx.worker, token, {"ok": 1})


def fail(*, token: Any = None, error: Any = None) -> Call:
    def call(ctx: Ctx) -> object:
        return ctx.tc.fail_task(
            ctx.held.execution_id, ctx.worker, ctx.held.fence_token if token is None else token, error
        )

    return call


def poll(*, worker: Any = None, **kwargs: Any) -> Call:
    def call(ctx: Ctx) -> object:
        return ctx.tc.poll_tasks(ctx.worker if worker is None else worker, **kwargs)

    return call


def on_instance(method: str, which: str, *args: Any) -> Call:
    """Call ``wc.<method>(<instance>, *args)`` on ctx.running / completed / failed or a literal id."""

    def call(ctx: Ctx) -> object:
        target = getattr(ctx, which) if which in ("running", "completed", "failed") else _literal(which)
        return getattr(ctx.wc, method)(target, *args)

    return call


def _literal(which: str) -> Any:
    literals: dict[str, Any] = {
        "int": 42,
        "none": None,
        "not-a-uuid": "not-a-uuid",
        "bytes": b"bytes",
        "unknown": uuid.uuid4(),
        "sqlish": SQLISH,
    }
    return literals[which]


UNKNOWN = "00000000-0000-4000-8000-000000000000"

CASES: list[Case] = [
    # -- DAG shape -----------------------------------------------------------------------------------
    Case(
        "dag-two-cycle",
        register(TaskDefinition("a", depends_on=["b"]), TaskDefinition("b", depends_on=["a"])),
        InvalidDefinitionError,
        "cycle",
    ),
    Case(
        "dag-three-cycle",
        register(
            TaskDefinition("a", depends_on=["c"]),
            TaskDefinition("b", depends_on=["a"]),
            TaskDefinition("c", depends_on=["b"]),
        ),
        InvalidDefinitionError,
        "cycle",
    ),
    Case("dag-self-loop", register(TaskDefinition("a", depends_on=["a"])), InvalidDefinitionError, "itself"),
    Case(
        "dag-unknown-dependency",
        register(TaskDefinition("a", depends_on=["ghost"])),
        InvalidDefinitionError,
        "unknown",
    ),
    Case(
        "dag-duplicate-task-id",
        register(TaskDefinition("a"), TaskDefinition("a")),
        InvalidDefinitionError,
        "duplicate",
    ),
    Case(
        "dag-dependency-listed-twice",
        register(TaskDefinition("a"), TaskDefinition("b", depends_on=["a", "a"])),
        InvalidDefinitionError,
        "twice",
    ),
    Case("dag-empty", register(), InvalidDefinitionError, "no tasks"),
    Case(
        "dag-too-many-tasks",
        lambda ctx: register(*(TaskDefinition(f"t{i}") for i in range(10_001)))(ctx),
        InvalidDefinitionError,
        "at most",
    ),
    Case(
        "dag-tasks-is-a-string",
        lambda ctx: ctx.wc.register_workflow(WorkflowDefinition(NS, "wf", "abc")),  # type: ignore[arg-type]
        InvalidDefinitionError,
        "tasks",
    ),
    Case(
        "dag-task-is-a-dict",
        register({"task_id": "a"}),
        InvalidDefinitionError,
        "TaskDefinition",
    ),
    Case(
        "dag-depends-on-is-a-string",
        lambda ctx: TaskDefinition("b", depends_on="a"),
        InvalidDefinitionError,
        "depends_on",
    ),
    # -- names ---------------------------------------------------------------------------------------
    Case("name-empty", register(TaskDefinition("a"), name=""), InvalidDefinitionError, "workflow name"),
    Case("name-10k-chars", register(TaskDefinition("a"), name=HUGE), InvalidDefinitionError, "workflow name"),
    Case(
        "name-sql-shaped", register(TaskDefinition("a"), name=SQLISH), InvalidDefinitionError, "workflow name"
    ),
    Case(
        "name-with-space",
        register(TaskDefinition("a"), name="my wf"),
        InvalidDefinitionError,
        "workflow name",
    ),
    Case(
        "name-with-newline",
        register(TaskDefinition("a"), name="wf\n"),
        InvalidDefinitionError,
        "workflow name",
    ),
    Case(
        "name-unicode", register(TaskDefinition("a"), name="wörk🙂"), InvalidDefinitionError, "workflow name"
    ),
    Case("name-not-a-string", register(TaskDefinition("a"), name=7), InvalidDefinitionError, "workflow name"),
    Case(
        "namespace-nul",
        register(TaskDefinition("a"), namespace="a\x00b"),
        InvalidDefinitionError,
        "namespace",
    ),
    Case(
        "namespace-sql-shaped",
        register(TaskDefinition("a"), namespace=SQLISH),
        InvalidDefinitionError,
        "namespace",
    ),
    Case("task-id-lone-surrogate", lambda ctx: TaskDefinition("\ud800"), InvalidDefinitionError, "task_id"),
    Case("task-id-empty", lambda ctx: TaskDefinition(""), InvalidDefinitionError, "task_id"),
    Case("task-id-int", lambda ctx: TaskDefinition(5), InvalidDefinitionError, "task_id"),  # type: ignore[arg-type]
    Case("task-type-sql-shaped", task_with(task_type=SQLISH), InvalidDefinitionError, "task_type"),
    Case(
        "compensation-with-spaces", task_with(compensation="undo it"), InvalidDefinitionError, "compensation"
    ),
    Case("dependency-name-nul", task_with(depends_on=["a\x00"]), InvalidDefinitionError, "dependency"),
    # -- versions ------------------------------------------------------------------------------------
    Case("version-zero", register(TaskDefinition("a"), version=0), InvalidDefinitionError, "version"),
    Case("version-negative", register(TaskDefinition("a"), version=-1), InvalidDefinitionError, "version"),
    Case("version-bool", register(TaskDefinition("a"), version=True), InvalidDefinitionError, "version"),
    Case("version-string", register(TaskDefinition("a"), version="3"), InvalidDefinitionError, "version"),
    Case(
        "version-over-int4", register(TaskDefinition("a"), version=2**31), InvalidDefinitionError, "version"
    ),
    # -- retry policies and durations ----------------------------------------------------------------
    Case("attempts-zero", retry_with(max_attempts=0), InvalidDefinitionError, "max_attempts"),
    Case("attempts-negative", retry_with(max_attempts=-1), InvalidDefinitionError, "max_attempts"),
    Case("attempts-absurd", retry_with(max_attempts=10**9), InvalidDefinitionError, "max_attempts"),
    Case("attempts-bool", retry_with(max_attempts=True), InvalidDefinitionError, "max_attempts"),
    Case("attempts-string", retry_with(max_attempts="3"), InvalidDefinitionError, "max_attempts"),
    Case(
        "interval-negative",
        retry_with(initial_interval=timedelta(seconds=-1)),
        InvalidDefinitionError,
        "initial_interval",
    ),
    Case("max-interval-zero", retry_with(max_interval=timedelta(0)), InvalidDefinitionError, "max_interval"),
    Case(
        "max-interval-absurd",
        retry_with(max_interval=timedelta(days=10_000)),
        InvalidDefinitionError,
        "max_interval",
    ),
    Case(
        "interval-not-a-timedelta",
        retry_with(initial_interval=1.0),
        InvalidDefinitionError,
        "initial_interval",
    ),
    Case(
        "interval-longer-than-max",
        retry_with(initial_interval=timedelta(hours=1), max_interval=timedelta(minutes=1)),
        InvalidDefinitionError,
        "max_interval",
    ),
    Case("backoff-nan", retry_with(backoff_coefficient=math.nan), InvalidDefinitionError, "backoff"),
    Case("backoff-below-one", retry_with(backoff_coefficient=0.5), InvalidDefinitionError, "backoff"),
    Case("jitter-infinite", retry_with(jitter=math.inf), InvalidDefinitionError, "jitter"),
    Case("timeout-negative", task_with(timeout=timedelta(seconds=-5)), InvalidDefinitionError, "timeout"),
    Case("timeout-zero", task_with(timeout=timedelta(0)), InvalidDefinitionError, "timeout"),
    Case("timeout-absurd", task_with(timeout=timedelta(days=10_000)), InvalidDefinitionError, "timeout"),
    Case("timeout-int-seconds", task_with(timeout=30), InvalidDefinitionError, "timeout"),
    Case("retry-is-a-dict", task_with(retry={"max_attempts": 3}), InvalidDefinitionError, "retry"),
    # -- registration ----------------------------------------------------------------------------------
    Case(
        "register-not-a-definition",
        lambda ctx: ctx.wc.register_workflow(OK.to_json()),  # type: ignore[arg-type]
        TypeError,
        "WorkflowDefinition",
    ),
    Case(
        "register-different-body-same-version",
        register(TaskDefinition("other"), name="ok"),
        DefinitionConflictError,
        "version",
    ),
    # -- starting ------------------------------------------------------------------------------------
    Case("start-unknown-workflow", start(workflow_name="nope"), WorkflowNotFoundError, "nope"),
    Case("start-unknown-version", start(version=99), WorkflowNotFoundError, "version 99"),
    Case("start-sql-shaped-name", start(workflow_name=SQLISH), ValueError, "workflow name"),
    Case("start-empty-namespace", start(namespace=""), ValueError, "namespace"),
    Case("start-namespace-none", start(namespace=None), TypeError, "namespace"),
    Case("run-id-empty", start(run_id=""), ValueError, "run_id"),
    Case("run-id-10k-chars", start(run_id=HUGE), ValueError, "run_id"),
    Case("run-id-nul", start(run_id="run\x00"), ValueError, "run_id"),
    Case("run-id-lone-surrogate", start(run_id="run-\ud800"), ValueError, "run_id"),
    Case("run-id-int", start(run_id=12345), ValueError, "run_id"),
    Case("start-version-string", start(version="1"), TypeError, "version"),
    Case(
        "start-not-a-request",
        lambda ctx: ctx.wc.start_workflow({"namespace": NS}),  # type: ignore[arg-type]
        TypeError,
        "StartWorkflowRequest",
    ),
    Case(
        "start-batch-with-one-bad-request",
        lambda ctx: ctx.wc.start_workflows(
            [
                StartWorkflowRequest(NS, "ok", f"good-{uuid.uuid4()}"),
                StartWorkflowRequest(NS, "ok", "bad", {1, 2}),
            ]
        ),
        PayloadError,
        "workflow input",
    ),
    Case(
        "start-batch-bad-name-after-good-ones",
        lambda ctx: ctx.wc.start_workflows(
            [
                StartWorkflowRequest(NS, "ok", f"good-{uuid.uuid4()}"),
                StartWorkflowRequest(NS, "not ok!", "bad"),
            ]
        ),
        ValueError,
        "workflow name",
    ),
    Case(
        # a batch checks a workflow's names once; a str subclass that claims to equal them is checked anew
        "start-batch-name-posing-as-a-checked-one",
        lambda ctx: ctx.wc.start_workflows(
            [
                StartWorkflowRequest(NS, "ok", f"good-{uuid.uuid4()}"),
                StartWorkflowRequest(NS, _Posing("x y"), "bad"),
            ]
        ),
        ValueError,
        "workflow name",
    ),
    # -- payloads jsonb cannot store -------------------------------------------------------------------
    Case("input-nul-in-value", start_input({"k": "a\x00b"}), PayloadError, "NUL"),
    Case("input-nul-in-key", start_input({"a\x00": 1}), PayloadError, "NUL"),
    Case("input-surrogate-in-value", start_input(["\ud800"]), PayloadError, "surrogate"),
    Case("input-surrogate-in-key", start_input({"\udfff": 1}), PayloadError, "surrogate"),
    Case("input-set", start_input({"s": {1, 2}}), PayloadError, "set"),
    Case("input-bytes", start_input(b"raw"), PayloadError, "bytes"),
    Case("input-object", start_input(object()), PayloadError, "object"),
    Case("input-datetime", start_input(datetime.now(timezone.utc)), PayloadError, "datetime"),
    Case("input-decimal", start_input(Decimal("1.5")), PayloadError, "Decimal"),
    Case("input-tuple", start_input((1, 2)), PayloadError, "tuple"),
    Case("input-nan", start_input(math.nan), PayloadError, "nan"),
    Case("input-infinity", start_input({"x": math.inf}), PayloadError, "inf"),
    Case("input-minus-infinity", start_input([-math.inf]), PayloadError, "inf"),
    Case("input-int-key", start_input({1: "x"}), PayloadError, "key"),
    Case("input-5000-digit-int", start_input(10**5000), PayloadError, "workflow input"),
    Case("input-nested-list-1000", start_input(nested_list(1000)), PayloadError, "nested"),
    Case("input-nested-dict-1000", start_input(nested_dict(1000)), PayloadError, "nested"),
    Case("input-oversized", start_input("x" * (2 * ONE_MIB)), PayloadError, "limit"),
    # -- fencing tokens --------------------------------------------------------------------------------
    Case(
        "token-ahead", lambda ctx: complete(token=ctx.held.fence_token + 1)(ctx), FencingError, "fence token"
    ),
    Case("token-stale-zero", complete_token(0), FencingError, "fence token"),
    Case("token-negative", complete_token(-1), FencingError, "fence token"),
    Case("token-beyond-bigint", complete_token(2**63), FencingError, "fence token"),
    Case("token-string", complete_token("1"), TypeError, "fence_token"),
    Case("token-float", complete_token(1.5), TypeError, "fence_token"),
    Case("token-none", complete_token(None), TypeError, "fence_token"),
    Case("token-bool", complete_token(True), TypeError, "fence_token"),
    Case("complete-by-another-worker", complete(worker=uuid.uuid4()), FencingError, "not held"),
    Case(
        "fail-token-ahead", lambda ctx: fail(token=ctx.held.fence_token + 1)(ctx), FencingError, "fence token"
    ),
    Case(
        "fail-token-none",
        lambda ctx: ctx.tc.fail_task(ctx.held.execution_id, ctx.worker, None),  # type: ignore[arg-type]
        TypeError,
        "fence_token",
    ),
    # -- ids -----------------------------------------------------------------------------------------
    Case("execution-id-int", complete(execution=42), TypeError, "execution_id"),
    Case("execution-id-not-a-uuid", complete(execution="not-a-uuid"), ValueError, "execution_id"),
    Case("execution-id-bytes", complete(execution=b"bytes"), TypeError, "execution_id"),
    Case("execution-id-sql-shaped", complete(execution=SQLISH), ValueError, "execution_id"),
    Case("execution-id-unknown", complete(execution=UNKNOWN), FencingError, "no execution"),
    Case(
        "execution-id-none",
        lambda ctx: ctx.tc.complete_task(None, ctx.worker, 1),  # type: ignore[arg-type]
        TypeError,
        "execution_id",
    ),
    Case("worker-id-not-a-uuid", complete(worker="worker-1"), ValueError, "worker_id"),
    Case("worker-id-float", complete(worker=1.5), TypeError, "worker_id"),
    Case(
        "acquire-not-a-uuid", lambda ctx: ctx.tc.acquire_task("nope", ctx.worker), ValueError, "execution_id"
    ),
    Case(
        "acquire-worker-none",
        lambda ctx: ctx.tc.acquire_task(ctx.held.execution_id, None),  # type: ignore[arg-type]
        TypeError,
        "worker_id",
    ),
    Case("get-workflow-int", on_instance("get_workflow", "int"), TypeError, "instance_id"),
    Case("get-workflow-none", on_instance("get_workflow", "none"), TypeError, "instance_id"),
    Case("get-workflow-not-a-uuid", on_instance("get_workflow", "not-a-uuid"), ValueError, "instance_id"),
    Case("get-workflow-bytes", on_instance("get_workflow", "bytes"), TypeError, "instance_id"),
    Case(
        "get-workflow-unknown", on_instance("get_workflow", "unknown"), WorkflowNotFoundError, "no workflow"
    ),
    Case("history-sql-shaped-id", on_instance("get_history", "sqlish"), ValueError, "instance_id"),
    Case("list-tasks-unknown", on_instance("list_tasks", "unknown"), WorkflowNotFoundError, "no workflow"),
    Case(
        "renew-ids-is-a-string",
        lambda ctx: ctx.tc.renew_leases("abc", ctx.worker),
        ValueError,
        "execution_id",
    ),
    # -- task outputs and errors -----------------------------------------------------------------------
    Case("output-nul", complete(output={"k": "\x00"}), PayloadError, "task output"),
    Case("output-set", complete(output={1, 2}), PayloadError, "task output"),
    Case("output-nan", complete(output=[math.nan]), PayloadError, "task output"),
    Case("output-oversized", complete(output="y" * (2 * ONE_MIB)), PayloadError, "task output"),
    Case("error-nul", fail(error={"message": "bad\x00"}), PayloadError, "task error"),
    Case("error-lone-surrogate", fail(error="bad \ud800"), PayloadError, "task error"),
    # -- polling -------------------------------------------------------------------------------------
    Case("poll-limit-zero", poll(limit=0), ValueError, "limit"),
    Case("poll-limit-negative", poll(limit=-1), ValueError, "limit"),
    Case("poll-limit-absurd", poll(limit=10**9), ValueError, "limit"),
    Case("poll-limit-bool", poll(limit=True), ValueError, "limit"),
    Case("poll-limit-string", poll(limit="3"), ValueError, "limit"),
    Case("poll-task-types-string", poll(task_types="first"), TypeError, "task_types"),
    Case("poll-worker-int", poll(worker=7), TypeError, "worker_id"),
    # the filters reach SQL as parameters; a value a text parameter cannot carry must still be named
    Case("poll-namespace-nul", poll(namespace="bad\x00input"), REFUSALS, "namespace"),
    Case("poll-namespace-lone-surrogate", poll(namespace="bad-\ud800"), REFUSALS, "namespace"),
    Case("poll-task-type-nul", poll(task_types=["fi\x00rst"]), REFUSALS, "task_type"),
    Case("get-definition-nul", lambda ctx: ctx.wc.get_definition("bad\x00", "ok"), REFUSALS, "namespace"),
    Case(
        "get-definition-version-string",
        lambda ctx: ctx.wc.get_definition(NS, "ok", "one"),  # type: ignore[arg-type]
        REFUSALS,
        "version",
    ),
    Case(
        "find-workflow-run-id-nul", lambda ctx: ctx.wc.find_workflow(NS, "ok", "run\x00"), REFUSALS, "run_id"
    ),
    # a filter that no registered name can match is refused before it reaches SQL
    Case("poll-sql-shaped-namespace", poll(namespace=SQLISH, limit=100), ValueError, "namespace"),
    Case("poll-quote-or-true-namespace", poll(namespace="x' OR '1'='1", limit=100), ValueError, "namespace"),
    Case("poll-sql-shaped-task-type", poll(task_types=[SQLISH], limit=100), ValueError, "task_type"),
    Case("poll-10k-namespace", poll(namespace=HUGE, limit=100), ValueError, "namespace"),
    # -- operator actions ----------------------------------------------------------------------------
    Case("retry-unknown-task", lambda ctx: ctx.tc.retry_task(ctx.failed, "nope"), TaskNotFoundError, "nope"),
    Case(
        "retry-task-id-int",
        lambda ctx: ctx.tc.retry_task(ctx.failed, 5),  # type: ignore[arg-type]
        TaskNotFoundError,
        "no task",
    ),
    Case(
        "retry-running-task",
        lambda ctx: ctx.tc.retry_task(ctx.running, "first"),
        InvalidStateError,
        "RUNNING",
    ),
    Case(
        "retry-input-nul",
        lambda ctx: ctx.tc.retry_task(ctx.failed, "only", {"k": "\x00"}),
        PayloadError,
        "task input",
    ),
    Case(
        "retry-unknown-instance",
        lambda ctx: ctx.tc.retry_task(uuid.uuid4(), "only"),
        WorkflowNotFoundError,
        "no workflow",
    ),
    Case(
        "retry-instance-not-a-uuid",
        lambda ctx: ctx.tc.retry_task("nope", "only"),
        ValueError,
        "workflow_instance_id",
    ),
    Case(
        "compensate-unknown-task",
        on_instance("trigger_compensation", "running", "ghost"),
        TaskNotFoundError,
        "ghost",
    ),
    Case(
        "compensate-task-none",
        on_instance("trigger_compensation", "running", None),
        TaskNotFoundError,
        "None",
    ),
    Case(
        "compensate-completed-workflow",
        on_instance("trigger_compensation", "completed", "only"),
        InvalidStateError,
        "COMPLETED",
    ),
    Case(
        "compensate-instance-none",
        on_instance("trigger_compensation", "none", "only"),
        TypeError,
        "instance_id",
    ),
    Case("pause-unknown", on_instance("pause_workflow", "unknown"), WorkflowNotFoundError, "no workflow"),
    Case("pause-completed", on_instance("pause_workflow", "completed"), InvalidStateError, "COMPLETED"),
    Case("resume-failed", on_instance("resume_workflow", "failed"), InvalidStateError, "FAILED"),
    Case("resume-id-bytes", on_instance("resume_workflow", "bytes"), TypeError, "instance_id"),
    Case("cancel-completed", on_instance("cancel_workflow", "completed"), InvalidStateError, "COMPLETED"),
    Case("cancel-not-a-uuid", on_instance("cancel_workflow", "not-a-uuid"), ValueError, "instance_id"),
    Case("purge-negative-age", lambda ctx: ctx.wc.purge(older_than=timedelta(-1)), ValueError, "older_than"),
    Case(
        "purge-age-not-a-timedelta",
        lambda ctx: ctx.wc.purge(older_than=3600),  # type: ignore[arg-type]
        ValueError,
        "older_than",
    ),
    Case(
        "purge-running-state",
        lambda ctx: ctx.wc.purge(older_than=timedelta(0), states=[WorkflowState.RUNNING]),
        ValueError,
        "finished",
    ),
    Case(
        "purge-batch-zero",
        lambda ctx: ctx.wc.purge(older_than=timedelta(0), batch_size=0),
        ValueError,
        "batch_size",
    ),
    # -- configuration -------------------------------------------------------------------------------
    Case(
        "config-schema-trailing-newline",
        lambda ctx: EngineConfig(dsn=ctx.dsn, schema="orchestrator\n"),
        ValueError,
        "schema",
    ),
    Case(
        "migrate-schema-trailing-newline",
        lambda ctx: migrate(ctx.dsn, schema="orch_nl\n"),
        ValueError,
        "schema",
    ),
    Case(
        "config-schema-sql-shaped", lambda ctx: EngineConfig(dsn=ctx.dsn, schema=SQLISH), ValueError, "schema"
    ),
    Case(
        "config-lease-negative",
        lambda ctx: EngineConfig(dsn=ctx.dsn, lease_duration=timedelta(seconds=-1)),
        ValueError,
        "lease_duration",
    ),
    Case(
        "config-payload-limit-zero",
        lambda ctx: EngineConfig(dsn=ctx.dsn, max_payload_bytes=0),
        ValueError,
        "max_payload_bytes",
    ),
]


def test_corpus_is_large_and_uniquely_named() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_writes_nothing(case: Case, ctx: Ctx, fault_log: FaultLog) -> None:
    fault_log.record_bad_inputs(1)
    before = fingerprint(ctx.dsn)
    caught: Exception | None = None
    try:
        case.call(ctx)
    except Exception as exc:
        caught = exc
    after = fingerprint(ctx.dsn)

    # every broken promise is listed, so one run shows the whole picture of a case
    problems: list[str] = []
    if caught is None:
        problems.append("the engine accepted the bad input")
    else:
        kind, message = type(caught).__name__, str(caught)
        if isinstance(caught, psycopg.Error):
            problems.append(f"a raw driver error escaped: {caught!r}")
        if not isinstance(caught, REFUSALS):
            problems.append(f"{kind} is not an OrchestratorError, ValueError or TypeError")
        if not isinstance(caught, case.raises):
            problems.append(f"expected {case.raises}, got {kind}: {message}")
        if not message.strip():
            problems.append(f"{kind} has an empty message")
        elif case.mentions.lower() not in message.lower():
            problems.append(f"the message does not mention {case.mentions!r}: {message!r}")
    changed = sorted(t for t in before.keys() | after.keys() if before.get(t) != after.get(t))
    if changed:
        problems.append(f"it wrote to {changed}")
    assert not problems, f"{case.id}: " + "; ".join(problems)


HARMLESS: list[tuple[str, Call, object]] = [
    # a hostile filter is a value, not SQL: it matches nothing, and the tables are still there afterwards
    ("acquire-unknown-execution", lambda ctx: ctx.tc.acquire_task(uuid.uuid4(), ctx.worker), None),
    ("find-sql-shaped-run-id", lambda ctx: ctx.wc.find_workflow(NS, "ok", SQLISH), None),
    ("renew-by-another-worker", lambda ctx: ctx.tc.renew_lease(ctx.held.execution_id, uuid.uuid4()), False),
    ("renew-nothing", lambda ctx: ctx.tc.renew_leases([], ctx.worker), set()),
]


@pytest.mark.parametrize(("label", "call", "expected"), HARMLESS, ids=[h[0] for h in HARMLESS])
def test_hostile_values_that_are_legal_match_nothing_and_write_nothing(
    label: str, call: Call, expected: object, ctx: Ctx, fault_log: FaultLog
) -> None:
    fault_log.record_bad_inputs(1)
    before = fingerprint(ctx.dsn)
    assert call(ctx) == expected
    assert fingerprint(ctx.dsn) == before, f"{label} wrote to the database"


def test_engine_still_works_after_the_corpus(ctx: Ctx, fault_log: FaultLog) -> None:
    """Run last (pytest keeps file order): the held lease, the queue and new starts all still work."""
    wc, tc = ctx.wc, ctx.tc
    tc.complete_task(ctx.held.execution_id, ctx.worker, ctx.held.fence_token, {"first": "done"})
    fresh = _start(wc, "ok", f"after-{uuid.uuid4()}")
    for _ in range(3):
        for execution in tc.poll_tasks(ctx.worker, namespace=NS, limit=10):
            tc.complete_task(execution.execution_id, ctx.worker, execution.fence_token, {"n": 1})
    assert wc.get_workflow(ctx.running).state is WorkflowState.COMPLETED
    assert wc.get_workflow(fresh).state is WorkflowState.COMPLETED
    retried = tc.retry_task(ctx.failed, "only")
    assert wc.get_workflow(ctx.failed).state is WorkflowState.RUNNING
    leased = tc.acquire_task(retried.execution_id, ctx.worker)
    assert leased is not None
    tc.complete_task(leased.execution_id, ctx.worker, leased.fence_token, None)
    assert wc.get_workflow(ctx.failed).state is WorkflowState.COMPLETED
    fault_log.record_workflows(4)
    report = fault_log.check(ctx.dsn)
    assert report.ok, report.violations
