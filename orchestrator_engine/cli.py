"""The ``orchestrator-engine`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import EngineConfig


def _config(args: argparse.Namespace) -> EngineConfig:
    if args.dsn:
        return EngineConfig(dsn=args.dsn, schema=args.schema)
    return EngineConfig.from_env()


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .migrator import migrate

    applied = migrate(_config(args))
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dsn, count=args.workflows, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--dsn", help="PostgreSQL DSN (default: ORCHESTRATOR_DATASOURCE_* environment)")
        p.add_argument("--schema", default="orchestrator", help="engine schema (default: orchestrator)")
        return p

    p = command("migrate", "apply pending schema migrations")
    p.set_defaults(func=_cmd_migrate)
    p = command("demo", "run the order-saga demo (on an embedded PostgreSQL unless --dsn is given)")
    p.add_argument("--workflows", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
