"""Run one Worker in its own process, so tests can SIGTERM or SIGKILL a real worker.

The DSN comes from the WORKER_DSN environment variable (kept off the command line, where `ps` shows it);
everything else from argv. Every handler run is first recorded in ``public.handler_runs`` (created by
the test), so the test can count how often each execution's handler started and in which process.

    WORKER_DSN=... python tests/worker_process.py --worker-id UUID --task-type step --sleep 0.5
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any

from orchestrator_engine import EngineConfig, create_pool
from orchestrator_engine.worker import TaskContext, Worker

RECORD_RUN = (
    "INSERT INTO public.handler_runs (execution_id, task_id, worker_pid, at) "
    "VALUES (%s, %s, %s, clock_timestamp())"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--schema", default="orchestrator")
    parser.add_argument("--task-type", action="append", required=True, help="repeat for several types")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds each handler sleeps")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=30.0, help="lease_duration in seconds")
    parser.add_argument("--renewal", type=float, default=10.0, help="renewal_interval in seconds")
    parser.add_argument("--poll", type=float, default=1.0, help="poll_interval in seconds")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
    config = EngineConfig(
        dsn=os.environ["WORKER_DSN"],
        schema=args.schema,
        lease_duration=timedelta(seconds=args.lease),
        renewal_interval=timedelta(seconds=args.renewal),
        poll_interval=timedelta(seconds=args.poll),
    )
    pid = os.getpid()
    with create_pool(config, max_size=args.concurrency + 4) as pool:

        def handler(ctx: TaskContext) -> dict[str, Any]:
            with pool.connection() as conn:
                conn.execute(RECORD_RUN, (ctx.execution.execution_id, ctx.task_id, pid))
            time.sleep(args.sleep)
            return {"pid": pid, "attempt": ctx.attempt}

        worker = Worker(
            pool,
            dict.fromkeys(args.task_type, handler),
            concurrency=args.concurrency,
            config=config,
            worker_id=args.worker_id,
        )
        worker.run(shutdown_timeout=args.shutdown_timeout)
        print(f"stats {worker.stats.started} started, {worker.stats.completed} completed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
