"""The benchmark run: parse the command line, run each workload in its own schema, report one table."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from orchestrator_engine import EngineConfig, WorkflowDefinition, create_pool

from . import _fleet, _history, _latency, _shapes, _throughput
from ._env import (
    Probe,
    checkpoint,
    cpu_sample,
    describe_contention,
    describe_machine,
    drop_schema,
    fresh_schema,
    load_average,
    postmaster_pid,
    python_speed,
    server,
    server_settings,
)
from ._report import (
    Row,
    at_least,
    at_most,
    latency_cells,
    latency_target,
    rate,
    results_markdown,
    table,
    times_baseline,
)

log = logging.getLogger("benchmarks")

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
WORKLOADS = ("baseline", "start", "drain", "chain", "fan", "latency", "history")


@dataclass(frozen=True)
class Size:
    starts: int
    start_batch: int
    chains: int
    fans: int
    latency: int
    history_rows: int
    history_cycles: int
    history_backlog: int
    baseline_s: float
    #: how long each drift probe measures the one-connection commit ceiling
    probe_s: float


SIZES = {
    "full": Size(
        starts=20_000,
        start_batch=500,
        chains=5_000,
        fans=100,
        latency=500,
        history_rows=1_000_000,
        history_cycles=2_000,
        history_backlog=2_000,
        baseline_s=10.0,
        probe_s=2.0,
    ),
    "smoke": Size(
        starts=500,
        start_batch=100,
        chains=200,
        fans=5,
        latency=30,
        history_rows=20_000,
        history_cycles=100,
        history_backlog=200,
        baseline_s=2.0,
        probe_s=0.3,
    ),
}


@dataclass(frozen=True)
class Targets:
    """What issue 8 asks of the engine on this class of machine."""

    drain_tasks_s: float = 7_000
    chain_workflows_s: float = 1_500
    latency_p50_ms: float = 3
    latency_p99_ms: float = 10
    start_batched_s: float = 20_000
    start_single_s: float = 1_500
    history_ratio: float = 1.2


TARGETS = Targets()


@dataclass
class Run:
    """One benchmark run's inputs and what it has measured so far."""

    dsn: str
    size: Size
    concurrency: int
    #: handler threads per process for the wide rows: more slots, so bigger batches per statement
    wide: int
    processes: int
    rows: list[Row] = field(default_factory=list)
    method: list[str] = field(default_factory=list)
    schemas: list[str] = field(default_factory=list)
    baseline: float | None = None
    #: the commit ceiling of one connection, the baseline of the rows that commit from one thread
    baseline_one: float | None = None
    #: (when, load averages and the share of CPU other processes took): other work skews every number
    loads: list[tuple[str, str]] = field(default_factory=list)
    #: the machine's speed before the first workload and after each one (see _record_probe)
    drift: list[Probe] = field(default_factory=list)

    def schema(self, name: str, **overrides: object) -> EngineConfig:
        schema = f"bench_{name}"
        self.schemas.append(schema)
        return fresh_schema(self.dsn, schema, **overrides)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Measure orchestrator-engine: commit ceiling, start, drain, chain, fan, latency, history",
    )
    parser.add_argument("--dsn", help="database to run in (one schema per workload); default: embedded")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write RESULTS.md")
    parser.add_argument("--concurrency", type=int, default=16, help="handler threads per worker process")
    parser.add_argument(
        "--wide", type=int, default=128, help="handler threads per process for the drain and chain wide rows"
    )
    parser.add_argument("--processes", type=int, default=2, help="worker processes for chain and fan")
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=list(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)} (drain implies start)",
    )
    parser.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the embedded server (repeatable), e.g. shared_buffers=1GB",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if any("=" not in s for s in args.pg_setting):
        parser.error("--pg-setting takes NAME=VALUE")
    if args.pg_setting and args.dsn:
        parser.error("--pg-setting applies to the embedded server only; set them on your server instead")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the embedded server and worker processes are stopped
    signal.signal(signal.SIGTERM, _interrupt)
    extra = dict(s.split("=", 1) for s in args.pg_setting)
    machine = describe_machine()
    with server(args.dsn, extra) as (dsn, description):
        settings = server_settings(dsn)
        print(f"machine: {machine.cpus} x {machine.cpu_model}, {machine.memory_gib:.1f} GiB")
        print(f"server: {description}, version {settings['server_version']}")
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "server_version"))
        run = Run(
            dsn=dsn,
            size=SIZES[args.size],
            concurrency=args.concurrency,
            wide=args.wide,
            processes=args.processes,
        )
        try:
            failed = _run_workloads(run, args.only)
        finally:
            if args.dsn is not None:  # an embedded server is thrown away whole
                for schema in run.schemas:
                    drop_schema(dsn, schema)
    print()
    print(table(run.rows))
    command = "python benchmarks/run.py " + shlex.join(_shown_argv(argv))
    args.out.write_text(
        results_markdown(
            command=command.strip(),
            machine=machine,
            server=description,
            settings=settings,
            method=run.method,
            loads=run.loads,
            drift=run.drift,
            rows=run.rows,
        ),
        encoding="utf-8",
    )
    _progress(f"wrote {args.out}")
    return 1 if failed else 0


def _run_workloads(run: Run, only: list[str]) -> int:
    """Run the chosen workloads in order; return how many failed (each failure becomes a row)."""
    failed = 0
    postmaster = postmaster_pid(run.dsn)
    run.loads.append(("start", load_average()))
    _record_probe(run, "before")
    for name, step in STEPS:
        if name not in only and not (name == "start" and "drain" in only):
            continue
        _progress(f"{name} ...")
        t0 = time.monotonic()
        cpu0 = cpu_sample(postmaster)
        try:
            step(run, only)
        except Exception as exc:
            # one broken workload must not hide the others' numbers
            failed += 1
            log.exception("workload %s failed", name)
            run.rows.append(Row(name, "FAILED", f"{type(exc).__name__}: {exc}"[:200]))
        contention = describe_contention(cpu0, cpu_sample(postmaster))
        run.loads.append((f"after {name}", f"{load_average()} ({contention})"))
        _progress(f"{name} done in {time.monotonic() - t0:.0f} s, load average {run.loads[-1][1]}")
        _record_probe(run, f"after {name}")
    return failed


def _record_probe(run: Run, when: str) -> None:
    """Measure how fast the machine is now, so a reader can see it change between workloads.

    Two figures: the one-connection commit ceiling (a round trip, a little server CPU and a WAL
    flush) over ``probe_s``, and the speed of a fixed loop of Python (the client's CPU). Each
    workload runs once, and on shared machines their speed moves by a quarter within minutes. A
    probe that fails (the server a broken workload left down, say) is logged and left out: it must
    not cost the run its results.
    """
    if "bench_probe" not in run.schemas:
        run.schemas.append("bench_probe")  # dropped with the others at the end, whatever happens
    try:
        commits = _throughput.commit_ceiling(run.dsn, "bench_probe", 1, run.size.probe_s)
    except Exception:
        log.exception("drift probe %s failed", when)
        return
    if commits <= 0:
        log.error("drift probe %s committed nothing", when)
        return
    probe = Probe(when, commits, python_speed())
    run.drift.append(probe)
    first = run.drift[0]
    _progress(
        f"probe {when}: {probe.commits_s:,.0f} commits/s "
        f"({probe.commits_s / first.commits_s:.2f}x the first), "
        f"Python {probe.python_ops_s / first.python_ops_s:.2f}x the first"
    )


def _shown_argv(argv: list[str] | None) -> list[str]:
    """Return the arguments to show in RESULTS.md, with any DSN (it may hold a password) masked."""
    shown = list(sys.argv[1:] if argv is None else argv)
    return ["<dsn>" if i and shown[i - 1] == "--dsn" else a for i, a in enumerate(shown)]


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _crash_note(result: _throughput.Drain) -> str:
    """Say when a worker's loop died during the drain: that is an engine bug, not a slow run."""
    if not result.crashes:
        return ""
    kinds = sorted(set(result.crashes))
    return f"worker loop crashed {len(result.crashes)}x ({'; '.join(kinds)[:120]}), restarted"


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- the workloads, in the order they run ------------------------------------------------------------


def run_baseline(run: Run, only: list[str]) -> None:
    n, seconds = run.concurrency, run.size.baseline_s
    run.baseline = _throughput.commit_ceiling(run.dsn, "bench_baseline", n, seconds)
    run.rows.append(Row("baseline", f"commit ceiling, {n} connections", rate(run.baseline, "commits/s")))
    run.baseline_one = _throughput.commit_ceiling(run.dsn, "bench_baseline", 1, seconds)
    run.rows.append(Row("baseline", "commit ceiling, 1 connection", rate(run.baseline_one, "commits/s")))
    run.method.append(
        f"**baseline**: {n} threads in one process, one connection each (the handler threads of a "
        f"1-process drain), each running autocommit `UPDATE bench SET n = n + 1 WHERE id = $1 RETURNING n` "
        f"on its own row as fast as it can for {seconds:g} s; then the same from one thread for "
        f"{seconds:g} s. The `x baseline` column divides each throughput by the rate of as many "
        "connections: the one-connection rate for the starts from one thread, the "
        f"{n}-connection rate for every other row."
    )


def run_start(run: Run, only: list[str]) -> None:
    size, definition = run.size, _shapes.single()
    # (schema, batch, caller threads): each call style once from one thread, whose rate is bounded by
    # one commit (WAL flush) per call, and once from concurrent callers, as a service starts workflows:
    # one call each from as many threads as the baseline has connections, batches from one caller
    # per worker process (a batch keeps a client and a server process busy; more callers only queue)
    runs = (
        ("start_single", 1, 1),
        ("start_single_many", 1, run.concurrency),
        ("start_batched", size.start_batch, 1),
        ("start_batched_many", size.start_batch, run.processes),
    )
    schemas: dict[str, EngineConfig] = {}
    for name, batch, threads in runs:
        config = schemas[name] = run.schema(name)
        with create_pool(config, min_size=threads, max_size=threads) as pool:
            if name == "start_single":
                value, alone = _single_start_rates(run, pool, config, definition)
            else:
                value = _throughput.start_rate(
                    pool, config, definition, size.starts, batch=batch, threads=threads
                )
        call = "start_workflow, one call each" if batch == 1 else f"start_workflows, {batch} per call"
        callers = "1 thread" if threads == 1 else f"{threads} threads"
        target = TARGETS.start_single_s if batch == 1 else TARGETS.start_batched_s
        run.rows.append(
            Row(
                f"start {size.starts:,} single-task",
                f"{call}, {callers}",
                rate(value, "workflows/s"),
                times_baseline(value, run.baseline_one if threads == 1 else run.baseline),
                *at_least(value, target, "/s"),
            )
        )
        if name == "start_single":
            run.rows.append(
                Row(
                    f"start {size.starts:,} single-task",
                    "its statement alone (no engine or pool code), 1 thread",
                    rate(alone, "workflows/s"),
                    times_baseline(alone, run.baseline_one),
                    "",
                    f"the row above runs at {value / alone:.2f}x this",
                )
            )
    run.method.append(
        f"**start**: {size.starts:,} single-task workflows started with one `start_workflow` call (one "
        f"transaction) each, first from one thread, whose rate is bounded by one commit (WAL flush) per "
        f"call, then {size.starts:,} more from {run.concurrency} threads (the baseline's connection count), "
        f"as a service's request threads would; then {size.starts:,} through `start_workflows` in calls of "
        f"{size.start_batch} from one thread, and {size.starts:,} more from {run.processes} threads (one "
        "caller per worker process of the drains). No version given, as a caller would. Each set runs in "
        "a schema of its own. The *statement alone* row is the floor under the one-thread `start_workflow` "
        f"row: {size.starts:,} more runs started by sending that call's statement (`workflow_start_one`, "
        "prepared, notifying as the call does) from one thread through a bare psycopg cursor, its "
        "parameters made beforehand by the engine's own code, in blocks of 500 that alternate with the "
        "calls' (so that a change in the machine's speed moves both). Its status cell gives the "
        "one-thread row's rate as a share of it: the rest is the engine's Python and the pool's checkout "
        "around the statement."
    )
    if "drain" in only:
        _drain_row(run, schemas["start_single"], 1, run.concurrency)
        _drain_row(run, schemas["start_batched"], 2, run.concurrency)
        _drain_row(run, schemas["start_single_many"], 1, run.wide)
        _drain_row(run, schemas["start_batched_many"], 2, run.wide)
        run.method.append(
            f"**drain**: each set the start left is drained: the two started from one thread by "
            f"`Worker(concurrency={run.concurrency})` in 1 and then 2 processes, the two started "
            f"concurrently by the *wide* workers, `concurrency={run.wide}`, in 1 and then 2 processes "
            "(a worker polls as many tasks as it has free handler slots, so more slots make bigger batches "
            "per statement and commit). The handler is `lambda ctx: None`; each process has a pool of "
            f"{_fleet.POOL_SIZE} connections (the handlers use none), and all are released together once "
            "their pools are open. Rate = completed tasks / (max `workflow_instances.updated_at` - min "
            "`task_executions.started_at`), both read from the database."
        )


def _single_start_rates(
    run: Run, pool: ConnectionPool[Any], config: EngineConfig, definition: WorkflowDefinition
) -> tuple[float, float]:
    """Return the one-thread start_workflow rate and its statement's alone, measured alternately."""
    alone_config = run.schema("start_statement")
    with create_pool(alone_config, min_size=1, max_size=1) as alone_pool:
        return _throughput.single_start_rates(
            pool, config, alone_pool, alone_config, definition, run.size.starts
        )


def _drain_row(run: Run, config: EngineConfig, processes: int, concurrency: int) -> None:
    result = _throughput.drain(config, processes, concurrency)
    wide = " (wide)" if concurrency == run.wide else ""
    run.rows.append(
        Row(
            f"drain {result.tasks:,} single-task",
            f"{processes} process{'es' if processes > 1 else ''} x {concurrency} threads{wide}",
            rate(result.tasks_per_s, "tasks/s"),
            times_baseline(result.tasks_per_s, run.baseline),
            *_with_note(at_least(result.tasks_per_s, TARGETS.drain_tasks_s, "tasks/s"), _crash_note(result)),
        )
    )


def _with_note(cells: tuple[str, str], note: str) -> tuple[str, str]:
    target, status = cells
    return target, f"{status}; {note}" if note else status


def run_chain(run: Run, only: list[str]) -> None:
    definition = _shapes.chain()
    for concurrency in (run.concurrency, run.wide):
        config = run.schema("chain" if concurrency == run.concurrency else "chain_wide")
        with create_pool(config, min_size=1, max_size=2) as pool:
            _shapes.start_in_batches(pool, config, definition, run.size.chains)
        result = _throughput.drain(config, run.processes, concurrency)
        label = f"chain {result.workflows:,} x 3 sequential"
        wide = " (wide)" if concurrency == run.wide else ""
        measure = f"{run.processes} processes x {concurrency} threads{wide}"
        run.rows.append(
            Row(
                label,
                measure,
                rate(result.workflows_per_s, "workflows/s"),
                times_baseline(result.workflows_per_s, run.baseline),
                *_with_note(
                    at_least(result.workflows_per_s, TARGETS.chain_workflows_s, "workflows/s"),
                    _crash_note(result),
                ),
            )
        )
        run.rows.append(
            Row(
                label,
                measure,
                rate(result.tasks_per_s, "tasks/s"),
                times_baseline(result.tasks_per_s, run.baseline),
            )
        )
    run.method.append(
        f"**chain**: {run.size.chains:,} workflows a → b → c started untimed (`start_workflows`), then "
        f"drained by {run.processes} worker processes; same timing as the drain; again with the wide "
        "concurrency."
    )


def run_fan(run: Run, only: list[str]) -> None:
    config = run.schema("fan")
    definition = _shapes.fan()
    with create_pool(config, min_size=1, max_size=2) as pool:
        _shapes.start_in_batches(pool, config, definition, run.size.fans, batch=10)
    result = _throughput.drain(config, run.processes, run.concurrency)
    run.rows.append(
        Row(
            f"fan {result.workflows:,} x (1 → {_shapes.FAN_WIDTH} → 1)",
            f"{run.processes} processes x {run.concurrency} threads",
            rate(result.tasks_per_s, "tasks/s"),
            times_baseline(result.tasks_per_s, run.baseline),
            "",
            _crash_note(result),
        )
    )
    run.method.append(
        f"**fan**: {run.size.fans:,} workflows split → {_shapes.FAN_WIDTH} parallel parts → join, started "
        f"untimed, drained by {run.processes} worker processes; same timing as the drain."
    )


def run_latency(run: Run, only: list[str]) -> None:
    poll = timedelta(milliseconds=100)
    paths = (
        ("LISTEN/NOTIFY", run.schema("latency_notify", notify=True)),
        ("poll only, 100 ms", run.schema("latency_poll", notify=False, poll_interval=poll)),
    )
    checkpointed = True
    for path, config in paths:
        # the drains before this wrote hundreds of MB of WAL: flush their pages now, not mid-measurement
        checkpointed = checkpoint(run.dsn) and checkpointed
        result = _latency.measure(config, run.size.latency)
        label = f"latency {result.samples}, {path}"
        # the target is for the NOTIFY path; the poll-only path shows what polling alone costs
        target, status = (
            latency_target(result.ready_to_handler, TARGETS.latency_p50_ms, TARGETS.latency_p99_ms)
            if path == "LISTEN/NOTIFY"
            else ("", f"no target (bounded by the {poll.total_seconds() * 1000:.0f} ms poll interval)")
        )
        run.rows.append(
            Row(label, "ready_at → handler start", latency_cells(result.ready_to_handler), "", target, status)
        )
        if path == "LISTEN/NOTIFY":
            run.rows.append(Row(label, "ready_at → started_at (DB)", latency_cells(result.ready_to_lease)))
            run.rows.append(Row(label, "commit returned → handler", latency_cells(result.commit_to_handler)))
            run.rows.append(
                Row(label, "leased by the start (direct dispatch)", f"{result.direct} of {result.samples}")
            )
            steps = (
                ("step: start_workflow call", result.start_call),
                ("step: start returned → poll sent", result.commit_to_poll),
                ("step: poll call", result.poll_call),
                ("step: poll returned → handler", result.poll_to_handler),
            )
            for measure, percentiles in steps:
                cells = "no task was polled" if percentiles is None else latency_cells(percentiles, digits=2)
                run.rows.append(Row(label, measure, cells))
    floor = _latency.commit_floor(run.dsn, "bench_latency_floor", run.size.latency)
    run.rows.append(
        Row(
            f"latency {run.size.latency}, floor",
            "one-row UPDATE commit, idle connection",
            latency_cells(floor),
            "",
            "",
            "ready → handler holds one (two when a poll leases the task)",
        )
    )
    run.method.append(
        f"**latency**: one idle worker process (concurrency {_latency.CONCURRENCY}); {run.size.latency} "
        "single-task workflows started one at a time 10-30 ms apart, after 20 unmeasured ones. `ready_at` "
        "is `now()` of the starting transaction, so ready → handler includes that transaction's own "
        "statements and commit; *commit returned → handler* starts the clock when `start_workflow` "
        "returns. Handler start is `time.time()` inside the handler; server and worker share the clock. "
        "The idle worker waits for direct dispatch (its default), so each start normally leases its task "
        "to it in its own statement (*leased by the start* counts those) and ready_at → started_at is 0. "
        "The *step* rows time the path's parts one by one: the `start_workflow` call (its statement and "
        "commit), then for tasks a poll leased: start returned → poll sent (NOTIFY delivery and the "
        "worker's wake-up), the poll statement (its lease and commit; the benchmark wraps the worker's "
        "poll to time it) and poll "
        "returned → handler start (the hand-off to a handler thread). They overlap a little: the "
        "NOTIFY goes out at commit, so the worker may send its poll before `start_workflow` has returned "
        "to the driver (start returned → poll sent is then negative), and their medians need not add "
        "up to the end-to-end row. "
        f"The *floor* row times {run.size.latency} autocommit `UPDATE bench SET n = n + 1 WHERE id = $1 "
        "RETURNING n` on one connection at the same pace: a round trip to a server woken from idle plus "
        "one WAL flush, the cost of the start's commit on the way from ready to handler (and of the "
        "poll's, for a task a poll leases). "
        + (
            "A `CHECKPOINT` runs before each path, so the earlier workloads' dirty pages are not "
            "written during it."
            if checkpointed
            else "The role may not run `CHECKPOINT`, so the earlier workloads' checkpoint may fall in it."
        )
    )


def run_history(run: Run, only: list[str]) -> None:
    size = run.size
    empty = run.schema("history_empty")
    full = run.schema("history_full")
    t0 = time.monotonic()
    _history.populate(full, size.history_rows)
    _progress(f"history: generated {size.history_rows:,} finished workflows in {time.monotonic() - t0:.0f} s")
    _history.populate(empty, 0)
    label = f"history {size.history_rows:,} finished"
    for depth in (1, size.history_backlog):
        if depth > 1:
            for config in (empty, full):
                _history.add_backlog(config, depth)
        result = _history.compare(empty, full, size.history_rows, size.history_cycles)
        queue = "queue depth 1" if depth == 1 else f"{depth:,} queued"
        cells = at_most(result.ratio, TARGETS.history_ratio) if depth == 1 else ("", "")
        run.rows.append(
            Row(
                label,
                f"acquire+complete, full ÷ empty, {queue}",
                f"{result.ratio:.2f} ({result.full_ms:.2f} vs {result.empty_ms:.2f} ms/task)",
                "",
                *cells,
            )
        )
        run.rows.append(
            Row(
                label,
                f"start_workflow, full ÷ empty, {queue}",
                f"{result.start_full_ms / result.start_empty_ms:.2f} "
                f"({result.start_full_ms:.2f} vs {result.start_empty_ms:.2f} ms)",
            )
        )
    run.method.append(
        f"**history**: {size.history_rows:,} finished single-task workflows ({size.history_rows:,} "
        f"executions, {5 * size.history_rows:,} events) generated with `INSERT … SELECT generate_series`, "
        f"then `VACUUM ANALYZE`; {size.history_cycles:,} start → `poll_tasks(limit=1)` → `complete_task` "
        "cycles on it and on an empty schema, interleaved in blocks of 50 (alternating which goes "
        "first) after a warm-up; medians per "
        f"task. Run twice: with only the cycle's own task queued (the target), then with "
        f"{size.history_backlog:,} more ready workflows queued in both schemas (each cycle serves the "
        "oldest), because the poll's plan depends on how many tasks are ready."
    )


STEPS: tuple[tuple[str, Callable[[Run, list[str]], None]], ...] = (
    ("baseline", run_baseline),
    ("start", run_start),
    ("chain", run_chain),
    ("fan", run_fan),
    ("latency", run_latency),
    ("history", run_history),
)
