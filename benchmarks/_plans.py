"""Explain the engine's hot statements on a populated schema and write one text file per statement."""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from orchestrator_engine import EngineConfig, StartWorkflowRequest, TaskCoordinator, create_pool
from orchestrator_engine.coordinators.workflow import _start_plan, _StartBatch, start_one_parameters
from orchestrator_engine.repositories.executions import ExecutionRepository
from orchestrator_engine.repositories.instances import InstanceRepository
from orchestrator_engine.sql import queries, raw_queries

from . import _history, _shapes
from ._env import describe_machine, drop_schema, fresh_schema, server, server_settings, vacuum_analyze

DEFAULT_DIR = Path(__file__).resolve().parent / "plans"
SCHEMA = "bench_plans"
LEASE = timedelta(seconds=30)
#: executions leased (RUNNING) when the plans are taken, so lease scans have rows to find
RUNNING = 50

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class Population:
    finished: int
    ready: int


def populate(config: EngineConfig, population: Population) -> TaskSample:
    """Fill the schema: finished history, ready chains (1 READY + 2 PENDING each), some leased tasks."""
    _history.populate(config, population.finished)
    with create_pool(config, min_size=1, max_size=2) as pool:
        _shapes.start_in_batches(pool, config, _shapes.chain(), population.ready)
        worker_id = uuid.uuid4()
        leased = TaskCoordinator(pool, config).poll_tasks(
            worker_id, task_types=[_shapes.TASK_TYPE], limit=RUNNING
        )
    vacuum_analyze(config.dsn, config.schema)
    first = leased[0]
    return TaskSample(
        worker_id=worker_id,
        execution_id=first.execution_id,
        instance_id=first.workflow_instance_id,
        fence_token=first.fence_token,
        leased=[e.execution_id for e in leased],
    )


@dataclass(frozen=True)
class TaskSample:
    """Real ids from the populated schema, so the plans are those of rows that exist."""

    worker_id: uuid.UUID
    execution_id: uuid.UUID
    instance_id: uuid.UUID
    fence_token: int
    leased: list[uuid.UUID]


def parameters(sample: TaskSample) -> dict[str, dict[str, Any]]:
    """Return the statements to explain and their parameters: what a worker or a starter would send.

    The first six are the ones issue 8 names; the rest are what a start, a poll and a completion run
    today (see the coordinators). Names the engine no longer has are skipped.
    """
    event = {
        "workflow_instance_id": str(sample.instance_id),
        "sequence_number": 1_000,
        "event_type": "TASK_COMPLETED",
        "payload": {"execution_id": str(sample.execution_id), "task_id": "a"},
        "idempotency_key": f"{sample.instance_id}:completed:{sample.execution_id}:",
    }
    return {
        "task_poll_and_lease": {
            "worker_id": uuid.uuid4(),
            "namespace": None,
            "task_types": [_shapes.TASK_TYPE],
            "limit": 16,
            "lease": LEASE,
        },
        # completion and failure of a batch of results, one statement (here a batch of one)
        "task_finish_if_fenced": ExecutionRepository.finish_parameters(
            sample.worker_id, [(sample.execution_id, sample.fence_token, "COMPLETED", "null", None)]
        ),
        # what complete_task(s) runs, and a worker's batch of completions as task_complete_many_ids
        # (the same plan but for its result list): all of it in one statement, unless the batch
        # needs the general path (the three statements around this one)
        "task_complete_many": {
            **ExecutionRepository.finish_parameters(
                sample.worker_id, [(sample.execution_id, sample.fence_token, "COMPLETED", "null", None)]
            ),
            "channel": "orchestrator_engine_plans",
        },
        "task_release_dependents": {
            "instance_ids": [sample.instance_id],
            "task_ids": ["a"],
            "kinds": ["FORWARD"],
        },
        "workflow_lock": {"instance_id": sample.instance_id},
        "task_renew_many_if_held": {
            "execution_ids": sample.leased,
            "worker_id": sample.worker_id,
            "lease": LEASE,
        },
        "task_select_lapsed": {"limit": 8},
        "workflow_update_if_sequence": {
            "instances": json.dumps(
                [
                    {
                        "instance_id": str(sample.instance_id),
                        "expected": 2,
                        "new_sequence": 3,
                        "state": "RUNNING",
                        "pending_tasks": 2,
                        "pending_compensations": 0,
                        "collect_output": False,
                    }
                ]
            ),
            "events": json.dumps([event]),
            "event_count": 1,
            "channel": "orchestrator_engine_plans",
            "notify": [_shapes.NAMESPACE],
        },
        "definition_get_latest": {"namespace": _shapes.NAMESPACE, "name": "chain"},
        "workflow_start_many": _start_many_parameters(),
        "workflow_start_one": _start_one_parameters(),
    }


def _start_many_parameters() -> dict[str, Any]:
    """Return one new single-task workflow, planned as WorkflowCoordinator.start_workflows plans it."""
    batch = _StartBatch()
    request = StartWorkflowRequest(_shapes.NAMESPACE, "single", "plan-start", {"i": 0})
    batch.add(request, json.dumps(request.input), _shapes.single(), 0)
    return InstanceRepository.start_parameters(batch.instances, batch.plan_texts, None)


def _start_one_parameters() -> dict[str, Any]:
    """Return one new single-task workflow, as WorkflowCoordinator.start_workflow sends it."""
    request = StartWorkflowRequest(_shapes.NAMESPACE, "single", "plan-start-one", {"i": 0})
    definition = _shapes.single()
    plan = _start_plan(definition)
    return start_one_parameters(
        request, json.dumps(request.input), definition, plan, "orchestrator_engine_plans"
    )


def missing_parameters(name: str, params: dict[str, Any]) -> list[str]:
    """Return the placeholders of the engine's statement ``name`` that ``params`` does not supply."""
    return sorted(set(_PLACEHOLDER.findall(raw_queries()[name])) - set(params))


def explain(conn: psycopg.Connection[Any], name: str, schema: str, params: dict[str, Any]) -> str:
    """Return the statement, its executed plan (rolled back) and its generic plan, as text."""
    query = queries(schema)[name]
    text = query.as_string(conn)
    with conn.transaction(force_rollback=True):
        rows = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query, params).fetchall()
    executed = "\n".join(str(r[0]) for r in rows)
    generic = generic_plan(conn, text)
    # the plans of statements run inside functions (the poll's pick): EXPLAIN shows a Function Scan.
    # Foreign-key checks are nested statements too (one per inserted row); they are left out.
    inner = [p for p in auto_explained(conn, query, params)[:-1] if "Query Text: SELECT 1 FROM ONLY" not in p]
    shown = {k: _short(v) for k, v in params.items()}
    return "\n".join(
        [
            f"-- {name}",
            f"-- parameters: {shown}",
            "",
            text,
            "",
            "-- EXPLAIN (ANALYZE, BUFFERS), executed in a transaction that was rolled back:",
            executed,
            "",
            *(
                f"-- auto_explain of a statement it runs inside a function (executed, rolled back):\n{plan}\n"
                for plan in inner
            ),
            "-- EXPLAIN (GENERIC_PLAN): the plan a prepared statement may switch to after five executions",
            "-- (psycopg prepares a statement on its fifth run on a connection):",
            generic,
            "",
        ]
    )


def auto_explained(
    conn: psycopg.Connection[Any], query: sql.Composable, params: dict[str, Any], fmt: str = "text"
) -> list[str]:
    """Run ``query`` in a rolled-back transaction with auto_explain on; return every plan it executed.

    The statements run inside functions come first, the calling statement last: EXPLAIN of the
    caller shows a function as a Function Scan only. Needs auto_explain (contrib; LOAD as superuser).
    """
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    # log_min_duration last: a statement is explained only if auto_explain was on when it started, so
    # none of these set_config calls is
    settings = {
        "log_nested_statements": "on",
        "log_format": fmt,
        "log_level": "notice",
        "log_min_duration": "0",
    }
    with conn.transaction(force_rollback=True):
        for setting, value in settings.items():
            conn.execute("SELECT set_config(%s, %s, true)", (f"auto_explain.{setting}", value))
        conn.execute(query, params)
    plans = []
    for notice in notices:
        _, found, body = notice.partition("plan:")
        if found:
            plans.append(body.strip())
    return plans


def generic_plan(conn: psycopg.Connection[Any], text: str) -> str:
    if conn.info.server_version < 160000:
        return "(needs PostgreSQL 16 or later)"
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        return f"${names.setdefault(match.group(1), len(names) + 1)}"

    numbered = _PLACEHOLDER.sub(number, text).replace("%%", "%")
    rows = conn.execute(sql.SQL("EXPLAIN (GENERIC_PLAN) ") + sql.SQL(numbered)).fetchall()
    return "\n".join(str(r[0]) for r in rows)


def _short(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 3:
        return f"[{len(value)} ids]"
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value if isinstance(value, (int, str, type(None), list)) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/plans.py",
        description="Write EXPLAIN output of the engine's hot statements to benchmarks/plans/.",
    )
    parser.add_argument(
        "--dsn", help="database to work in (schema bench_plans, dropped after); default: embedded"
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--finished", type=int, default=100_000, help="finished workflows to generate")
    parser.add_argument("--ready", type=int, default=2_000, help="ready 3-task chains to start")
    args = parser.parse_args(argv)
    population = Population(finished=args.finished, ready=args.ready)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stale: list[str] = []
    with server(args.dsn, {}) as (dsn, description):
        config = fresh_schema(dsn, SCHEMA)
        try:
            sample = populate(config, population)
            version = server_settings(dsn)["server_version"]
            header = (
                f"-- orchestrator-engine {describe_machine().engine_commit}; "
                f"{description}, PostgreSQL {version}; schema populated with {population.finished:,} "
                f"finished single-task workflows, {population.ready:,} started 3-task chains "
                f"({population.ready:,} READY + {2 * population.ready:,} PENDING executions) and {RUNNING} "
                "leased (RUNNING) executions, then VACUUM ANALYZE. Regenerate: python benchmarks/plans.py\n"
            )
            with psycopg.connect(dsn, autocommit=True) as conn:
                for name, params in parameters(sample).items():
                    if name not in raw_queries():
                        print(f"{name}: not a statement of this engine version, skipped")
                        continue
                    missing = missing_parameters(name, params)
                    if missing:
                        # the engine changed the statement: say so instead of explaining a guess
                        stale.append(f"{name}: no sample value for {', '.join(missing)}")
                        continue
                    path = args.out_dir / f"{name}.txt"
                    path.write_text(header + explain(conn, name, SCHEMA, params), encoding="utf-8")
                    print(f"wrote {path}")
        finally:
            drop_schema(dsn, SCHEMA)
    for line in stale:
        print(f"skipped {line}; update parameters() in benchmarks/_plans.py", file=sys.stderr)
    return 1 if stale else 0
