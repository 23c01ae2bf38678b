"""Turn measurements into the one results table, and write RESULTS.md around it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from ._env import SHOWN_SETTINGS, Machine, Probe
from ._latency import Percentiles

HEADER = ("workload", "measure", "result", "x baseline", "target", "status")


@dataclass(frozen=True)
class Row:
    workload: str
    measure: str
    result: str
    vs_baseline: str = ""
    target: str = ""
    status: str = ""

    def cells(self) -> tuple[str, ...]:
        return (self.workload, self.measure, self.result, self.vs_baseline, self.target, self.status)


def rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def times_baseline(value: float, baseline: float | None) -> str:
    return "" if not baseline else f"{value / baseline:.3f}x"


def at_least(value: float, target: float, unit: str) -> tuple[str, str]:
    """Return (target, status) cells for a throughput that should reach ``target``."""
    status = "met" if value >= target else "MISSED"
    return f"≥ {target:,.0f} {unit}", f"{status} ({value / target:.2f}x target)"


def at_most(value: float, target: float) -> tuple[str, str]:
    """Return (target, status) cells for a ratio that should stay at or below ``target``."""
    status = "met" if value <= target else "MISSED"
    return f"≤ {target:g}", f"{status} ({value - target:+.2f})"


def latency_cells(p: Percentiles, digits: int = 1) -> str:
    return f"p50 {p.p50_ms:.{digits}f} / p99 {p.p99_ms:.{digits}f} / max {p.max_ms:.{digits}f} ms"


def latency_target(p: Percentiles, p50_ms: float, p99_ms: float) -> tuple[str, str]:
    missed = [
        f"{name} {got:.1f} > {want:g} ms"
        for name, got, want in (("p50", p.p50_ms, p50_ms), ("p99", p.p99_ms, p99_ms))
        if got > want
    ]
    target = f"p50 ≤ {p50_ms:g}, p99 ≤ {p99_ms:g} ms"
    return target, ("MISSED (" + "; ".join(missed) + ")") if missed else "met"


def table(rows: Sequence[Row]) -> str:
    """Render the rows as a Markdown table with padded columns (readable in a terminal too)."""
    grid = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(HEADER))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(HEADER), rule, *(line(r.cells()) for r in rows)])


def results_markdown(
    *,
    command: str,
    machine: Machine,
    server: str,
    settings: Mapping[str, str],
    method: Sequence[str],
    loads: Sequence[tuple[str, str]],
    drift: Sequence[Probe],
    rows: Sequence[Row],
) -> str:
    """Return the full RESULTS.md text."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{command}` on {when}; rerun it to refresh this file.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine.cpus} x {machine.cpu_model}",
        f"- memory: {machine.memory_gib:.1f} GiB",
        f"- Python {machine.python}, psycopg {machine.psycopg}",
        f"- orchestrator-engine at commit {machine.engine_commit}",
        "- load average (1 / 5 / 15 min; it counts this benchmark's own processes too, threads waiting on "
        "fsync included) and the CPU share other processes and the hypervisor took during each workload:",
        *(f"  - {when}: {load}" for when, load in loads),
        "",
        *drift_lines(drift),
        "## PostgreSQL",
        "",
        f"{server}, version {settings.get('server_version', '?')}; settings in force (`SHOW`):",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {name} | {settings.get(name, '')} |" for name in SHOWN_SETTINGS),
        "",
        "## Method",
        "",
        *(f"- {m}" for m in method),
        "",
        "## Results",
        "",
        table(rows),
        "",
    ]
    return "\n".join(lines)


def drift_lines(drift: Sequence[Probe]) -> list[str]:
    """Return the Drift section: the machine's speed before the first workload and after each."""
    if not drift:
        return []
    first = drift[0]
    return [
        "## Drift",
        "",
        "Each workload runs once, so a change in the machine's speed during the run moves its row. "
        "Before the first workload and after each one, the run measures the one-connection commit "
        "ceiling briefly and times a fixed loop of Python (the client's CPU speed, comparable across "
        "runs of the same Python); compare each workload's row with the probes on either side of it.",
        "",
        "| when | commits/s, 1 connection | x first | Python loop, million iterations/s | x first |",
        "|---|---|---|---|---|",
        *(
            f"| {p.when} | {p.commits_s:,.0f} | {p.commits_s / first.commits_s:.2f}x | "
            f"{p.python_ops_s / 1e6:.2f} | {p.python_ops_s / first.python_ops_s:.2f}x |"
            for p in drift
        ),
        "",
    ]
