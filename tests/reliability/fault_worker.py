"""Run one Worker in its own process so the fault-injection suite can kill, freeze and cut it off.

    python tests/reliability/fault_worker.py DSN SCHEMA LEASE_MS RENEWAL_MS CONCURRENCY [options]

Every handler run is first recorded in ``public.handler_runs(execution_id, task_id, pid)`` (the test
creates the table), so a test can see how often each execution's handler started and in which process.
A handler then sleeps ``--sleep-ms``, or the ``sleep_ms`` of its workflow's input when there is one, and
returns its pid. SIGTERM drains the worker; it then prints one JSON line of its counters on stdout.
The DSN is on the command line: the suite runs against loopback servers without passwords.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from orchestrator_engine import EngineConfig, create_pool
from orchestrator_engine.worker import TaskContext, Worker

RECORD_RUN = "INSERT INTO public.handler_runs (execution_id, task_id, pid) VALUES (%s, %s, %s)"
#: how often recording a run is retried when the connection is cut under it
RECORD_TRIES = 5


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("lease_ms", type=int)
    parser.add_argument("renewal_ms", type=int)
    parser.add_argument("concurrency", type=int)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--task-type", action="append", default=None, help="repeat; default: step")
    parser.add_argument("--sleep-ms", type=int, default=5, help="how long each handler sleeps")
    parser.add_argument("--poll-ms", type=int, default=100, help="poll_interval")
    parser.add_argument("--pool-min", type=int, default=2, help="min_size of the pool (max: concurrency + 3)")
    return parser.parse_args(argv)


def handler_sleep(ctx: TaskContext, default_ms: int) -> float:
    """Return the seconds this run sleeps: the workflow input's ``sleep_ms`` wins over the default."""
    task_input = ctx.input if isinstance(ctx.input, dict) else {}
    workflow_input = task_input.get("workflow")
    if isinstance(workflow_input, dict) and isinstance(workflow_input.get("sleep_ms"), int):
        return int(workflow_input["sleep_ms"]) / 1000
    return default_ms / 1000


def record_run(pool: ConnectionPool[Any], ctx: TaskContext, pid: int) -> None:
    """Insert this run into handler_runs, retrying when a fault cuts the connection mid-statement."""
    for attempt in range(RECORD_TRIES):
        try:
            with pool.connection() as conn:
                conn.execute(RECORD_RUN, (ctx.execution.execution_id, ctx.task_id, pid))
            return
        except psycopg.OperationalError:
            if attempt == RECORD_TRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack: what a stall waits on
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(threadName)s %(message)s")
    # psycopg_pool narrates every reconnection at INFO; the worker's own lines are what tests read
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    config = EngineConfig(
        dsn=args.dsn,
        schema=args.schema,
        lease_duration=timedelta(milliseconds=args.lease_ms),
        renewal_interval=timedelta(milliseconds=args.renewal_ms),
        poll_interval=timedelta(milliseconds=args.poll_ms),
    )
    pid = os.getpid()
    max_size = args.concurrency + 3
    with create_pool(config, min_size=min(args.pool_min, max_size), max_size=max_size) as pool:

        def handler(ctx: TaskContext) -> dict[str, Any]:
            record_run(pool, ctx, pid)
            time.sleep(handler_sleep(ctx, args.sleep_ms))
            return {"pid": pid}

        worker = Worker(
            pool,
            dict.fromkeys(args.task_type or ["step"], handler),
            concurrency=args.concurrency,
            config=config,
            worker_id=args.worker_id,
        )
        worker.run(shutdown_timeout=10)
        stats = worker.stats
        counters = {
            "worker_id": str(worker.worker_id),
            "pid": pid,
            "started": stats.started,
            "completed": stats.completed,
            "failed": stats.failed,
            "dropped": stats.dropped,
            "listener_reconnects": stats.listener_reconnects,
        }
        print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
