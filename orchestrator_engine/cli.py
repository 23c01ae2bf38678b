"""The ``orchestrator-engine`` command line: operate workflows from a shell.

Exit codes: 0 success; 1 the doctor found invariant violations; 2 bad usage; 3 the engine refused
(unknown id, illegal state change, ...); 4 the database could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import timedelta
from typing import Any

import psycopg

from .config import EngineConfig, parse_duration
from .errors import MigrationError, OrchestratorError

EXIT_OK, EXIT_VIOLATIONS, EXIT_USAGE, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class _UsageError(Exception):
    """The command line lacks something only the caller can supply."""


def _config(args: argparse.Namespace) -> EngineConfig:
    if not args.dsn and not os.environ.get("ORCHESTRATOR_DATASOURCE_URL"):
        raise _UsageError("give --dsn or set ORCHESTRATOR_DATASOURCE_URL")
    if args.dsn:
        return EngineConfig(dsn=args.dsn, schema=args.schema)
    config = EngineConfig.from_env()
    return config if args.schema == "orchestrator" else EngineConfig(dsn=config.dsn, schema=args.schema)


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[Any]:
    """Yield (workflows, tasks, engine) on a small pool that is closed afterwards."""
    from .config import create_pool
    from .coordinators import TaskCoordinator, WorkflowCoordinator

    config = _config(args)
    pool = create_pool(config, min_size=1, max_size=2, open_timeout=10)
    try:
        workflows = WorkflowCoordinator(pool, config)
        yield workflows, TaskCoordinator(pool, config, engine=workflows.engine), workflows.engine
    finally:
        pool.close()


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(_jsonable(r.get(c, ""))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(_jsonable(data), indent=2) if args.json else text())


# -- commands --------------------------------------------------------------------------------------


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .migrator import migrate

    applied = migrate(_config(args))
    _emit(args, {"applied": applied}, lambda: "applied: " + ", ".join(applied) if applied else "up to date")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dsn, count=args.workflows, workers=args.workers)


def _cmd_status(args: argparse.Namespace) -> int:
    from .diagnostics import status

    with _session(args) as (_, _, engine):
        report = status(engine)

    def text() -> str:
        return "\n\n".join(
            [
                "workflows\n" + _table(report["workflows"], ["namespace", "state", "count"]),
                "ready tasks\n"
                + _table(report["ready"], ["namespace", "task_type", "ready", "oldest_age_s"]),
                "leases about to lapse\n"
                + _table(report["leases_lapsing"], ["execution_id", "task_id", "holder", "remaining_s"]),
            ]
        )

    _emit(args, report, text)
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    with _session(args) as (workflows, _, _):
        instance = workflows.get_workflow(args.instance)
        tasks = workflows.list_tasks(args.instance)
        history = workflows.get_history(args.instance)
    data = {"instance": instance, "tasks": tasks, "history": history}

    def text() -> str:
        head = (
            f"{instance.namespace}/{instance.workflow_name} v{instance.workflow_version} "
            f"run {instance.run_id}: {instance.state.value}"
        )
        task_rows = [{**asdict(t), "state": t.state.value, "kind": t.kind.value} for t in tasks]
        event_rows = [asdict(e) for e in history]
        return "\n\n".join(
            [
                head,
                "tasks\n"
                + _table(
                    task_rows, ["task_id", "kind", "task_type", "attempt_number", "state", "fence_token"]
                ),
                "history\n" + _table(event_rows, ["sequence_number", "event_type", "created_at"]),
            ]
        )

    _emit(args, data, text)
    return EXIT_OK


def _control(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        with _session(args) as (workflows, tasks, _):
            if name == "retry":
                result: Any = tasks.retry_task(args.instance, args.task)
            elif name == "compensate":
                result = workflows.trigger_compensation(args.instance, args.task)
            else:
                result = getattr(workflows, f"{name}_workflow")(args.instance)
        _emit(args, result, lambda: f"{name}: {result.state.value}")
        return EXIT_OK

    return run


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .check import check_invariants
    from .diagnostics import explain

    with _session(args) as (_, _, engine):
        reasons = explain(engine, engine_uuid(args.instance)) if args.instance else None
        with engine.pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            report = check_invariants(conn, schema=engine.config.schema)
    data = {"summary": report.summary(), "violations": report.violations, "explain": reasons}

    def text() -> str:
        lines = [report.summary()]
        lines += [f"  VIOLATION {v.invariant} in {v.instance_id}: {v.detail}" for v in report.violations]
        if reasons is not None:
            lines += ["", f"instance {args.instance}:"] + [f"  {r}" for r in reasons]
        return "\n".join(lines)

    _emit(args, data, text)
    return EXIT_OK if report.ok else EXIT_VIOLATIONS


def engine_uuid(value: str) -> Any:
    from .coordinators._ids import as_uuid

    return as_uuid(value, "instance")


def _cmd_purge(args: argparse.Namespace) -> int:
    from .models import WorkflowState

    states = [WorkflowState(s.upper()) for s in args.states.split(",")]
    with _session(args) as (workflows, _, _):
        deleted = workflows.purge(older_than=args.older_than, states=states, batch_size=args.batch_size)
    _emit(args, {"deleted": deleted}, lambda: f"purged {deleted} finished workflows")
    return EXIT_OK


def _cmd_graph(args: argparse.Namespace) -> int:
    from .diagnostics import mermaid

    with _session(args) as (workflows, _, _):
        definition = workflows.get_definition(args.namespace, args.workflow, args.version)
    _emit(args, {"mermaid": mermaid(definition)}, lambda: mermaid(definition))
    return EXIT_OK


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator-engine", description="Operate orchestrator-engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, help: str, func: Callable[[argparse.Namespace], int], *, options: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--dsn", help="PostgreSQL DSN (default: the ORCHESTRATOR_DATASOURCE_* environment)")
        if options:
            p.add_argument("--schema", default="orchestrator", help="engine schema (default: orchestrator)")
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(func=func)
        return p

    command("migrate", "apply pending schema migrations", _cmd_migrate)
    p = command(
        "demo", "run the order-saga demo (on an embedded PostgreSQL unless --dsn is given)", _cmd_demo
    )
    p.add_argument("--workflows", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    command("status", "counts by state, ready-queue age, leases about to lapse", _cmd_status)
    command("show", "an instance's tasks, attempts and history", _cmd_show).add_argument("instance")
    for name in ("pause", "resume", "cancel"):
        command(name, f"{name} a workflow instance", _control(name)).add_argument("instance")
    for name, help in (("retry", "retry a failed task"), ("compensate", "compensate from a task")):
        p = command(name, help, _control(name))
        p.add_argument("instance")
        p.add_argument("task")
    p = command(
        "doctor", "check the invariants; with an instance, explain why it is not progressing", _cmd_doctor
    )
    p.add_argument("instance", nargs="?")
    p = command("purge", "delete finished workflows older than a duration", _cmd_purge)
    p.add_argument("--older-than", type=_duration, required=True, help="e.g. 7d, 12h, 30m")
    p.add_argument("--states", default="COMPLETED,CANCELLED,COMPENSATED")
    p.add_argument("--batch-size", type=int, default=500)
    p = command("graph", "print a workflow's DAG as Mermaid", _cmd_graph)
    p.add_argument("namespace")
    p.add_argument("workflow")
    p.add_argument("--version", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MigrationError as exc:
        unreachable = isinstance(exc.__cause__, psycopg.OperationalError)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
    except (OrchestratorError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except psycopg.Error as exc:
        print(f"error: the database could not be reached or refused: {type(exc).__name__}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
