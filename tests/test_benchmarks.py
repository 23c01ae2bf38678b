"""Specification of the benchmark suite: the queue scans stay on their partial indexes, and a smoke run works.

No timing is asserted anywhere: numbers belong in benchmarks/RESULTS.md, not in a test's verdict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql

# benchmarks/ is a directory of the checkout, not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _shapes
from benchmarks._ab import _imports_package, materialize
from benchmarks._env import engine_config, vacuum_analyze
from benchmarks._plans import SCHEMA, Population, auto_explained, parameters, populate
from benchmarks._profile import _shape, _statement_names
from benchmarks._sql import bench_queries
from orchestrator_engine import TaskCoordinator, create_pool, migrate
from orchestrator_engine.sql import native_queries, queries

ROOT = Path(__file__).resolve().parent.parent
#: a few thousand finished workflows and a few hundred queued: enough that a sequential scan would
#: be priced above the index scans the queue is designed around
POPULATION = Population(finished=3_000, ready=300)
#: how a worker polls: the task types it handles, as many tasks as it has free slots
POLL = {"namespace": None, "task_types": [_shapes.TASK_TYPE], "lease": timedelta(seconds=30)}


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every node of an EXPLAIN (FORMAT JSON) plan tree, CTEs and sub-plans included."""
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _plan(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    query = queries(SCHEMA)[name]
    row = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()
    assert row is not None
    return list(_nodes(row[0][0]["Plan"]))


@pytest.fixture
def explained(dsn: str) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """Populate a schema like a busy engine's, ANALYZE it, and return the plans of the two queue scans."""
    config = engine_config(dsn, SCHEMA)
    migrate(config)
    sample = populate(config, POPULATION)  # ends with VACUUM ANALYZE
    params = parameters(sample)
    # a poll as big as a wide worker's: estimates of a hundred rows and more make a small table's
    # sequential scan look cheaper to the planner than a hundred probes
    params["wide_poll"] = {**params["task_poll_and_lease"], "limit": 128}
    statements = {
        "task_poll_and_lease": "task_poll_and_lease",
        "wide_poll": "task_poll_and_lease",
        "task_select_lapsed": "task_select_lapsed",
        "task_finish_if_fenced": "task_finish_if_fenced",
        "task_complete_many": "task_complete_many",
        "task_release_dependents": "task_release_dependents",
        "workflow_update_if_sequence": "workflow_update_if_sequence",
        "workflow_start_one": "workflow_start_one",
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield {key: _plan(conn, name, params[key]) for key, name in statements.items()}


def _index_names(nodes: list[dict[str, Any]]) -> set[str]:
    return {n["Index Name"] for n in nodes if "Index Name" in n}


def _seq_scanned(nodes: list[dict[str, Any]]) -> set[str]:
    return {n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"}


def _executed_plans(
    conn: psycopg.Connection[Any], name: str, params: dict[str, Any]
) -> list[list[dict[str, Any]]]:
    """Run statement ``name`` (rolled back); return the nodes of every plan it ran, functions' included."""
    plans = auto_explained(conn, queries(SCHEMA)[name], params, fmt="json")
    return [list(_nodes(json.loads(plan)["Plan"])) for plan in plans]


def _assert_pick_walks_the_ready_index(plans: list[list[dict[str, Any]]]) -> None:
    """The pick reads the ready index in order and stops at the limit: no bitmap, no sort, no scan."""
    picks = [nodes for nodes in plans if "ix_task_executions_ready" in _index_names(nodes)]
    assert len(picks) == 1, [sorted(_index_names(nodes)) for nodes in plans]
    kinds = [n["Node Type"] for n in picks[0]]
    assert "Index Scan" in kinds, kinds
    assert not {"Sort", "Bitmap Heap Scan", "Bitmap Index Scan", "Seq Scan"} & set(kinds), kinds
    for nodes in plans:
        assert "task_executions" not in _seq_scanned(nodes)


@pytest.mark.parametrize("limit", [16, 128])
def test_poll_walks_the_ready_index_on_an_analysed_schema(dsn: str, limit: int) -> None:
    config = engine_config(dsn, SCHEMA)
    migrate(config)
    populate(config, POPULATION)  # ends with VACUUM ANALYZE
    with psycopg.connect(dsn, autocommit=True) as conn:
        plans = _executed_plans(conn, "task_poll_and_lease", {**POLL, "worker_id": uuid4(), "limit": limit})
    _assert_pick_walks_the_ready_index(plans)


@pytest.mark.parametrize("limit", [16, 128])
def test_poll_walks_the_ready_index_before_any_statistics(dsn: str, limit: int) -> None:
    # a new queue, never analysed: the planner guesses a handful of ready rows and, inline, preferred
    # reading every ready row through a bitmap and sorting them, on every poll
    config = engine_config(dsn, SCHEMA)
    migrate(config)
    with create_pool(config, min_size=1, max_size=1) as pool:
        _shapes.start_in_batches(pool, config, _shapes.single(), 3_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        plans = _executed_plans(conn, "task_poll_and_lease", {**POLL, "worker_id": uuid4(), "limit": limit})
    _assert_pick_walks_the_ready_index(plans)


def test_lapsed_lease_scan_reaches_executions_and_instances_by_primary_key(
    explained: dict[str, list[dict[str, Any]]],
) -> None:
    # the lease table holds only the leases in flight (fifty here): the planner may read it whole
    nodes = explained["task_select_lapsed"]
    assert {"pk_task_executions", "pk_workflow_instances"} <= _index_names(nodes)
    assert not {"task_executions", "workflow_instances"} & _seq_scanned(nodes)


def test_lapsed_lease_scan_reads_the_lease_expiry_index_when_many_leases_are_out(dsn: str) -> None:
    config = engine_config(dsn, SCHEMA)
    migrate(config)
    with create_pool(config, min_size=1, max_size=1) as pool:
        _shapes.start_in_batches(pool, config, _shapes.single(), 3_000)
        tasks = TaskCoordinator(pool, config)
        for _ in range(2):  # 2,000 leases out: a poll takes at most 1,000
            tasks.poll_tasks(uuid4(), task_types=[_shapes.TASK_TYPE], limit=1000)
    vacuum_analyze(dsn, SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        nodes = _plan(conn, "task_select_lapsed", {"limit": 8})
    assert "ix_execution_leases_expires" in _index_names(nodes)
    assert not {"task_executions", "workflow_instances", "execution_leases"} & _seq_scanned(nodes)


@pytest.mark.parametrize(
    "statement",
    [
        "task_poll_and_lease",
        "wide_poll",
        "task_finish_if_fenced",
        "task_complete_many",
        "workflow_update_if_sequence",
    ],
)
def test_hot_statements_reach_instances_by_primary_key(
    explained: dict[str, list[dict[str, Any]]], statement: str
) -> None:
    nodes = explained[statement]
    assert "workflow_instances" not in _seq_scanned(nodes)
    assert "pk_workflow_instances" in _index_names(nodes)


@pytest.mark.parametrize("statement", ["task_release_dependents", "task_complete_many"])
def test_released_dependents_are_found_through_the_instance_index(
    explained: dict[str, list[dict[str, Any]]], statement: str
) -> None:
    nodes = explained[statement]
    assert "task_executions" not in _seq_scanned(nodes)
    assert "uk_task_executions_attempt" in _index_names(nodes)


def test_a_single_start_reads_no_table_whole_but_the_waiting_workers(
    explained: dict[str, list[dict[str, Any]]],
) -> None:
    # the latest version through the definitions' key; the run_id's conflict through uk_idempotency
    # (an arbiter index, not a plan node). waiting_workers holds a row per idle worker process
    nodes = explained["workflow_start_one"]
    assert _seq_scanned(nodes) <= {"waiting_workers"}, _seq_scanned(nodes)
    assert "pk_workflow_definitions" in _index_names(nodes)


@pytest.mark.slow
def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<name>`` from the checkout, as its README says; its output as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_smoke_run_prints_the_table_and_writes_results(dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    result = _script("run.py", "--size", "smoke", "--dsn", dsn, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| workload" in result.stdout
    for workload in ("baseline", "start", "drain", "chain", "fan", "latency", "history"):
        assert f"| {workload}" in result.stdout, workload
    # the latency path timed step by step: the start, the wake-up, the poll, the hand-off
    for step in ("start_workflow call", "start returned → poll sent", "poll call", "poll returned → handler"):
        assert f"step: {step}" in result.stdout, step
    text = out.read_text(encoding="utf-8")
    assert "## Results" in text
    assert "synchronous_commit" in text
    # the machine's speed, probed before the first workload and after each step (drain runs in start's)
    drift = text.split("## Drift", 1)[1].split("##", 1)[0]
    for step in ("baseline", "start", "chain", "fan", "latency", "history"):
        assert f"| after {step} | " in drift, drift
    assert "| before | " in drift, drift
    before = next(line for line in drift.splitlines() if line.startswith("| before | "))
    assert before.count("| 1.00x |") == 2, before


def test_ab_copies_of_the_package_import_nothing_of_the_original(tmp_path: Path) -> None:
    # a copy that still imported orchestrator_engine would run the working tree's code on both sides
    materialize(None, "oe_copy", tmp_path)
    probe = (
        "import importlib, pkgutil, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import oe_copy\n"
        "for m in pkgutil.walk_packages(oe_copy.__path__, 'oe_copy.'):\n"
        "    if m.name != 'oe_copy.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'orchestrator_engine'))\n"
        "print(oe_copy.migrator.migrations_dir())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded, migrations = result.stdout.splitlines()
    assert loaded == "[]"
    assert Path(migrations) == tmp_path / "oe_copy" / "migrations"


def test_ab_refuses_an_import_of_the_package_it_cannot_rename() -> None:
    assert _imports_package("import os, orchestrator_engine\n")
    assert _imports_package("def f():\n    import orchestrator_engine.worker as w\n")
    assert not _imports_package('"""from orchestrator_engine import X, as a docstring says"""\n')
    assert not _imports_package("from .config import EngineConfig\n")


@pytest.mark.parametrize("workload", ["start", "bulk"])
def test_ab_runs_a_revision_and_the_working_tree_side_by_side(dsn: str, workload: str) -> None:
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: ab.py compares a git revision")
    result = _script("ab.py", "HEAD", "--workload", workload, "--rounds", "2", "--block", "10", "--dsn", dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    sides = ("| A (", "| B (working tree)")
    rows = [line for line in result.stdout.splitlines() if line.startswith(sides)]
    assert len(rows) == 2, result.stdout
    assert all(row.split("|")[2].strip() == "20" for row in rows), "2 measured blocks of 10 per side"
    assert "paired blocks" in result.stdout
    with psycopg.connect(dsn) as conn:  # it leaves no schema behind
        left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname IN ('ab_a', 'ab_b')").fetchone()
    assert left == (0,)


def test_the_profile_names_each_statement_by_its_words_alone() -> None:
    # profile_drain labels pg_stat_statements rows by the words of each named statement: no two
    # statements may share them, and constants, parameters and comments must not count
    names = _statement_names("bench_profile")
    assert len(names) == len(native_queries("bench_profile")) + len(bench_queries("bench_profile"))
    assert names[_shape(native_queries("bench_profile")["task_complete_many_ids"].text.decode())] == (
        "task_complete_many_ids"
    )
    assert _shape("SELECT a -- why\nFROM t WHERE b = 'x' AND c > 10 AND d = %(d)s") == _shape(
        "SELECT a FROM t WHERE b = $1 AND c > $2 AND d = $3"
    )
    assert _shape("SELECT a FROM t") != _shape("SELECT b FROM t")
