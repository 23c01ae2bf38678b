"""Profile one drain: database time per statement, CPU per process kind, and (with py-spy) Python stacks."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from orchestrator_engine import create_pool
from orchestrator_engine.sql import native_queries

from . import _shapes
from ._env import fresh_schema, server, vacuum_analyze
from ._fleet import WorkerReport, WorkerSpec, run_workers
from ._sql import bench_queries
from ._throughput import read_window, wait_until_finished

SCHEMA = "bench_profile"
#: the harness's own progress probes, left out of the statement table
HARNESS_MARKERS = ("AS busy", "AS open")
PROFILE_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track_planning": "on",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/profile_drain.py",
        description="Drain single-task workflows and show where database time and CPU go.",
    )
    parser.add_argument("--dsn", help="a server with pg_stat_statements preloaded; default: embedded")
    parser.add_argument("--tasks", type=int, default=10_000, help="workflows to start and drain")
    parser.add_argument(
        "--shape", choices=("single", "chain"), default="single", help="single-task or 3-task chain workflows"
    )
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--analyze", action="store_true", help="VACUUM ANALYZE the queue before draining")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="record each worker with py-spy into DIR")
    args = parser.parse_args(argv)
    with server(args.dsn, PROFILE_SETTINGS) as (dsn, description):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        config = fresh_schema(dsn, SCHEMA)
        with create_pool(config, min_size=1, max_size=2) as pool:
            _shapes.start_in_batches(pool, config, getattr(_shapes, args.shape)(), args.tasks)
        if args.analyze:
            vacuum_analyze(dsn, SCHEMA)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        cpu: dict[str, dict[int, float]] = {}
        spies: list[subprocess.Popen[bytes]] = []

        def drive() -> None:
            cpu["before"] = _backend_cpu(dsn)
            wait_until_finished(config)
            cpu["after"] = _backend_cpu(dsn)

        def attach(pids: list[int]) -> None:
            if args.py_spy is not None:
                spies.extend(_start_py_spy(pids, args.py_spy))

        spec = WorkerSpec(dsn=config.dsn, schema=SCHEMA, concurrency=args.concurrency)
        reports = run_workers(spec, args.processes, drive, on_release=attach)
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
            spy.wait(60)
        window = read_window(config)
        print(
            f"{description}; {window.tasks:,} tasks drained by {args.processes} x {args.concurrency} in "
            f"{window.seconds:.1f} s = {window.tasks_per_s:,.0f} tasks/s"
        )
        _print_cpu(cpu, reports, window.tasks, window.seconds)
        _print_task_times(dsn)
        _print_statements(dsn, window.tasks)
    if args.py_spy is not None:
        for raw in sorted(args.py_spy.glob("worker-*.txt")):
            print(f"\npy-spy --gil, {raw.name} (samples of the thread holding the GIL):")
            print(summarise_py_spy(raw))
    return 0


def _backend_cpu(dsn: str) -> dict[int, float]:
    """Return CPU seconds used so far by each server process (clients and background), read from /proc."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity").fetchall()]
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # not on this machine, or already gone
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _print_cpu(
    cpu: dict[str, dict[int, float]], reports: list[WorkerReport], tasks: int, seconds: float
) -> None:
    before, after = cpu.get("before", {}), cpu.get("after", {})
    server_cpu = sum(v - before.get(pid, 0.0) for pid, v in after.items())
    worker_cpu = sum(r.cpu_s for r in reports)
    print(
        f"CPU: workers {worker_cpu:.1f} s ({worker_cpu / tasks * 1000:.3f} ms/task), server processes "
        f"{server_cpu:.1f} s ({server_cpu / tasks * 1000:.3f} ms/task), over {seconds:.1f} s wall on "
        f"{os.cpu_count()} CPUs"
    )
    switches = sum(r.switches for r in reports)
    if switches:
        print(f"worker threads' context switches: {switches / tasks:.1f} per task")


def _print_task_times(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        row = conn.execute(bench_queries(SCHEMA)["profile_task_times"]).fetchone()
    if row and row["p50"] is not None:
        print(
            f"lease held (started_at -> finished_at): p50 {row['p50']:.1f} / p99 {row['p99']:.1f} / "
            f"max {row['max']:.1f} ms"
        )


def _print_statements(dsn: str, tasks: int) -> None:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute(bench_queries(SCHEMA)["profile_statements"], {"schema": SCHEMA}).fetchall()
    rows = [r for r in rows if not any(m in r["query"] for m in HARNESS_MARKERS)]
    total = sum(r["exec_ms"] + r["plan_ms"] for r in rows) or 1.0
    names = _statement_names(SCHEMA)
    print(f"database time (exec + plan): {total / tasks:.3f} ms/task")
    print(
        f"{'calls/task':>10} {'exec ms/call':>12} {'plans/call':>10} {'ms/plan':>8} {'% of db':>7}  statement"
    )
    for r in rows[:20]:
        calls = r["calls"] or 1
        print(
            f"{r['calls'] / tasks:10.2f} {r['exec_ms'] / calls:12.3f} {r['plans'] / calls:10.2f} "
            f"{r['plan_ms'] / (r['plans'] or 1):8.3f} "
            f"{(r['exec_ms'] + r['plan_ms']) / total * 100:6.1f}%  "
            f"{names.get(_shape(r['query'])) or _first_words(r['query'])}"
        )


def _statement_names(schema: str) -> dict[str, str]:
    """Map the shape (see _shape) of each named statement, the engine's and the benchmark's, to its name."""
    names = {_shape(q.as_string()): f"(benchmark) {name}" for name, q in bench_queries(schema).items()}
    names.update((_shape(q.text.decode()), name) for name, q in native_queries(schema).items())
    return names


#: comments, and the benchmark's %(name)s parameters
_IGNORED = re.compile(r"--[^\n]*|%\(\w+\)s")
_STRING = re.compile(r"'(?:[^']|'')*'")
_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
#: words that are, or may stand beside, a constant that pg_stat_statements shows as a parameter (an
#: extract() field is one)
_CONSTANT_WORDS = {"true", "false", "null", "interval", "epoch"}


def _shape(query: str) -> str:
    """Return the words of a statement that pg_stat_statements keeps as they are: no comments, no
    constants or parameters (it shows constants as parameters; %(name)s is the benchmark's), no
    punctuation."""
    text = _STRING.sub(" ", _IGNORED.sub(" ", query))
    return " ".join(w for w in _WORD.findall(text) if w.lower() not in _CONSTANT_WORDS)


def _first_words(query: str) -> str:
    lines = [ln.strip() for ln in query.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    return " ".join(" ".join(lines).split())[:90]


def _start_py_spy(pids: list[int], out_dir: Path) -> list[subprocess.Popen[bytes]]:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy is not installed (pip install py-spy): skipping the Python profile")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [
                exe,
                "record",
                "--gil",  # only the thread holding the GIL: what keeps the interpreter busy
                "--pid",
                str(pid),
                "--rate",
                "100",
                "--format",
                "raw",
                "--output",
                str(out_dir / f"worker-{pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]
    time.sleep(0.5)  # let py-spy attach before the first tasks are leased
    return spies


def summarise_py_spy(raw: Path, top: int = 25) -> str:
    """Return the functions with the most samples on top of the stack, and the engine's inclusive ones."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            if "orchestrator_engine" in frame:
                inclusive[frame] += n
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; most time on top of the stack:"]
    lines += [f"  {n / total * 100:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("  engine frames, inclusive:")
    lines += [f"  {n / total * 100:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)
