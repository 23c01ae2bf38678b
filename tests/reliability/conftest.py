"""Shared by the reliability suite: its size, and the figures it prints when it ends."""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from orchestrator_engine.check import CheckReport, check_invariants

#: ORCHESTRATOR_RELIABILITY=full runs every scenario at full size; the default keeps CI fast.
FULL = os.environ.get("ORCHESTRATOR_RELIABILITY", "").lower() == "full"


def scale(ci: int, full: int) -> int:
    """Return the size of a scenario: ``ci`` by default, ``full`` with ORCHESTRATOR_RELIABILITY=full."""
    return full if FULL else ci


@dataclass
class FaultLog:
    """Figures the suite reports in its closing lines."""

    workflows: int = 0
    bad_inputs: int = 0
    violations: int = 0
    checks: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_workflows(self, n: int) -> None:
        with self._lock:
            self.workflows += n

    def record_fault(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.faults[kind] += n

    def record_bad_inputs(self, n: int) -> None:
        with self._lock:
            self.bad_inputs += n

    def check(self, dsn: str, *, schema: str = "orchestrator", require_finished: bool = True) -> CheckReport:
        """Run the invariant checker on ``dsn`` and count what it found."""
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            report = check_invariants(conn, schema=schema, require_finished=require_finished)
        with self._lock:
            self.checks += 1
            self.violations += len(report.violations)
        return report


_LOG = FaultLog()


@pytest.fixture(scope="session")
def fault_log() -> FaultLog:
    return _LOG


def pytest_terminal_summary(terminalreporter: Any) -> None:
    log = _LOG
    if not (log.workflows or log.faults or log.bad_inputs or log.checks):
        return
    tr = terminalreporter
    tr.section("reliability figures")
    tr.write_line(f"size: {'full' if FULL else 'ci'} (ORCHESTRATOR_RELIABILITY=full for the full run)")
    tr.write_line(f"workflows run: {log.workflows}")
    faults = ", ".join(f"{k}={v}" for k, v in sorted(log.faults.items())) or "none"
    tr.write_line(f"faults injected: {sum(log.faults.values())} ({faults})")
    tr.write_line(f"bad inputs tried: {log.bad_inputs}")
    tr.write_line(f"invariant checks run: {log.checks}; invariant violations found: {log.violations}")
