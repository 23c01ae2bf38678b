"""Two versions of the engine in one process, their starts alternating: a comparison the machine's drift
cannot skew.

This machine class changes speed by a quarter within minutes, so two benchmark runs, one per version,
differ by more than most changes do. Here both versions run side by side: each is a copy of its
``orchestrator_engine`` package imported under a name of its own, with its own migrations, schema and
one-connection pool, and blocks of starts alternate between them (A B, B A, ...), so a change in speed
moves both.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ._env import drop_schema, server
from ._shapes import NAMESPACE, TASK_TYPE

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "orchestrator_engine"
#: an absolute import of the package, which a copy under another name must make of itself
_ABSOLUTE_IMPORT = re.compile(rf"^(\s*)(from|import) {PACKAGE}\b", re.MULTILINE)


def resolve(revision: str) -> str:
    """Return the commit ``revision`` names, or exit with git's own message."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--end-of-options", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode:
        raise SystemExit(f"ab.py: {revision!r} is not a commit of {ROOT}: {found.stderr.strip()}")
    return found.stdout.strip()


def materialize(revision: str | None, name: str, dest: Path) -> None:
    """Write the package (and its migrations, inside it) as it is at ``revision`` to ``dest/name``.

    ``revision`` None is this checkout's working tree, uncommitted changes included.
    """
    target = dest / name
    if revision is None:
        shutil.copytree(ROOT / PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "migrations", target / "migrations")
    else:
        made = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", revision, PACKAGE, "migrations"],
            check=False,
            capture_output=True,
        )
        if made.returncode:  # a revision without the package or its migrations at the top level
            raise SystemExit(f"ab.py: git archive {revision}: {made.stderr.decode().strip()}")
        archive = made.stdout
        unpacked = dest / f".{name}"
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12 and later
                tar.extractall(unpacked, filter="data")
            else:  # our own repository's archive
                tar.extractall(unpacked)
        (unpacked / PACKAGE).rename(target)
        (unpacked / "migrations").rename(target / "migrations")
        shutil.rmtree(unpacked)
    for source in target.rglob("*.py"):
        text = _ABSOLUTE_IMPORT.sub(rf"\1\2 {name}", source.read_text(encoding="utf-8"))
        # any other import of the package (after a comma, say) would run the working tree's code
        # under the copy's name: refuse to compare rather than compare the same code twice
        if _imports_package(text):
            raise SystemExit(f"ab.py: {source.relative_to(dest)} imports {PACKAGE} in a way it cannot rename")
        source.write_text(text, encoding="utf-8")


def _imports_package(text: str) -> bool:
    """Say whether the module ``text`` has an import statement that names the original package."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:  # a relative import stays in the copy
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] == PACKAGE for n in names):
            return True
    return False


@dataclass
class Side:
    """One version: its package, coordinator, backend and what its blocks took."""

    label: str
    engine: ModuleType
    coordinator: Any
    pool: Any
    backend: int | None
    workflows: int = 0
    wall: float = 0.0
    client: float = 0.0
    server: float = 0.0
    blocks: list[float] = field(default_factory=list)


def open_side(label: str, module: str, dsn: str, schema: str, *, home: Path, local: bool) -> Side:
    """Import the copy ``module`` (from ``home``), migrate ``schema`` and register the workflow.

    ``local``: the server runs on this machine, so its backend's CPU can be read.
    """
    engine = importlib.import_module(module)
    migrations = importlib.import_module(f"{module}.migrator").migrations_dir()
    if not migrations.resolve().is_relative_to(home.resolve()):
        raise RuntimeError(f"{module} reads its migrations from {migrations}, not from its copy")
    drop_schema(dsn, schema)
    config = engine.EngineConfig(dsn=dsn, schema=schema)
    engine.migrate(config)
    pool = engine.create_pool(config, min_size=1, max_size=1)
    coordinator = engine.WorkflowCoordinator(pool, config)
    coordinator.register_workflow(
        engine.WorkflowDefinition(NAMESPACE, "single", [engine.TaskDefinition("t", task_type=TASK_TYPE)])
    )
    with pool.connection() as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    return Side(label, engine, coordinator, pool, int(row[0]) if local else None)


def _cpu_seconds(pid: int | None) -> float:
    """Return the CPU time a local process has run, in nanoseconds' resolution (schedstat)."""
    if pid is None:
        return 0.0
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def run_block(side: Side, workload: str, block: int, first: int) -> None:
    """Start ``block`` single-task workflows on ``side``: one call each, or one batch."""
    requests = [
        side.engine.StartWorkflowRequest(NAMESPACE, "single", f"ab-{first + i}", {"i": first + i})
        for i in range(block)
    ]
    t0, c0, s0 = time.perf_counter(), time.thread_time(), _cpu_seconds(side.backend)
    if workload == "start":
        for request in requests:
            side.coordinator.start_workflow(request)
    else:
        side.coordinator.start_workflows(requests)
    wall = time.perf_counter() - t0
    side.wall += wall
    side.client += time.thread_time() - c0
    side.server += _cpu_seconds(side.backend) - s0
    side.workflows += block
    side.blocks.append(block / wall)


def report(sides: list[Side]) -> str:
    lines = [
        "| side | workflows | workflows/s | wall µs/workflow | client CPU µs/workflow "
        "| server CPU µs/workflow |",
        "|---|---|---|---|---|---|",
    ]
    for s in sides:
        server_cpu = f"{s.server * 1e6 / s.workflows:,.1f}" if s.backend is not None else "n/a"
        per = 1e6 / s.workflows
        lines.append(
            f"| {s.label} | {s.workflows:,} | {s.workflows / s.wall:,.0f} | {s.wall * per:,.1f} "
            f"| {s.client * per:,.1f} | {server_cpu} |"
        )
    a, b = sides
    ahead = sum(1 for x, y in zip(a.blocks, b.blocks, strict=True) if y > x)
    lines.append(
        f"\n{b.label} / {a.label}: {b.workflows / b.wall / (a.workflows / a.wall):.3f}x the workflows/s; "
        f"{b.label} was faster in {ahead} of {len(a.blocks)} paired blocks"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/ab.py",
        description="Compare a git revision (A) with this checkout's working tree (B), blocks alternating.",
    )
    parser.add_argument("base", help="the git revision to compare against, e.g. HEAD or main~3")
    parser.add_argument(
        "--workload",
        choices=("start", "bulk"),
        default="start",
        help="start_workflow calls, or one start_workflows batch per block",
    )
    parser.add_argument("--rounds", type=int, default=20, help="measured blocks per side (even, >= 2)")
    parser.add_argument("--block", type=int, default=200, help="workflows per block")
    parser.add_argument(
        "--warmup",
        type=int,
        help="unmeasured blocks per side first (default 1 for start, 10 for bulk: a connection plans a "
        "statement's first runs, and a bulk block is one run)",
    )
    parser.add_argument(
        "--dsn", help="database to run in (its schemas ab_a and ab_b are dropped); default: embedded"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.rounds % 2:
        parser.error("--rounds must be even and at least 2, so that each side goes first as often")
    warmup = args.warmup if args.warmup is not None else (1 if args.workload == "start" else 10)
    base = resolve(args.base)
    with tempfile.TemporaryDirectory(prefix="orchestrator-ab-") as tmp, server(args.dsn, {}) as (dsn, where):
        home = Path(tmp)
        materialize(base, "oe_ab_a", home)
        materialize(None, "oe_ab_b", home)
        sys.path.insert(0, tmp)
        sides: list[Side] = []
        try:
            local = args.dsn is None
            sides.append(open_side(f"A ({base[:12]})", "oe_ab_a", dsn, "ab_a", home=home, local=local))
            sides.append(open_side("B (working tree)", "oe_ab_b", dsn, "ab_b", home=home, local=local))
            first = 0
            for round_ in range(warmup + args.rounds):
                for side in sides if round_ % 2 else sides[::-1]:
                    run_block(side, args.workload, args.block, first)
                    first += args.block
                if round_ == warmup - 1:  # warmed up: statements prepared and planned, caches full
                    for side in sides:
                        side.workflows, side.wall, side.client, side.server = 0, 0.0, 0.0, 0.0
                        side.blocks.clear()
        finally:
            for side in sides:
                side.pool.close()
            for schema in ("ab_a", "ab_b"):
                drop_schema(dsn, schema)
    print(
        f"{args.workload}, {args.rounds} blocks of {args.block} per side after {warmup} unmeasured, "
        f"alternating; {where}"
    )
    print(report(sides))
    return 0
