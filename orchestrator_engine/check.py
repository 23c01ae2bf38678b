"""Check the engine's invariants by reading its tables; safe to run against production data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from .models import DISPATCHABLE, EVENT_TARGET_STATE, EventType, WorkflowState, can_transition_workflow
from .sql import queries

_STARTS = ("TASK_STARTED", "COMPENSATION_TASK_STARTED")


@dataclass(frozen=True)
class Violation:
    """One broken invariant, with the instance it was found in."""

    invariant: str
    instance_id: UUID | None
    detail: str


@dataclass
class CheckReport:
    """What ``check_invariants`` found."""

    instances: int = 0
    events_replayed: int = 0
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        return (
            f"{self.instances} instances checked, {self.events_replayed} events replayed, "
            f"{len(self.violations)} invariant violations"
        )


def check_invariants(
    conn: psycopg.Connection[Any], *, schema: str = "orchestrator", require_finished: bool = False
) -> CheckReport:
    """Verify every invariant the engine promises; ``require_finished`` also flags unfinished workflows.

    Run it in a REPEATABLE READ (or SERIALIZABLE READ ONLY DEFERRABLE) transaction on a busy database so
    that every query reads the same snapshot.
    """
    q = queries(schema)
    report = CheckReport()

    def rows(name: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(q[name], params or {})
            yield from cur

    def flag(invariant: str, instance_id: UUID | None, detail: str) -> None:
        report.violations.append(Violation(invariant, instance_id, detail))

    for r in rows("check_sequence_gaps"):
        flag(
            "gapless-events",
            r["instance_id"],
            f"sequence_number {r['sequence_number']} but {r['events']} events "
            f"numbered {r['lowest']}..{r['highest']}",
        )
    for r in rows("check_duplicate_completions"):
        flag(
            "one-accepted-completion",
            r["workflow_instance_id"],
            f"execution {r['execution_id']} accepted {r['accepted']}x",
        )
    for r in rows("check_duplicate_event_keys"):
        flag(
            "event-keys-unique",
            r["workflow_instance_id"],
            f"{r['events']} events with idempotency key {r['idempotency_key']}",
        )
    for r in rows("check_execution_keys"):
        flag(
            "execution-key-matches",
            r["workflow_instance_id"],
            f"execution {r['execution_id']} has idempotency key {r['idempotency_key']}",
        )
    for r in rows("check_duplicate_completed_tasks"):
        flag(
            "one-completed-execution",
            r["workflow_instance_id"],
            f"{r['kind']} task {r['task_id']} completed {r['completed']}x",
        )
    for r in rows("check_incomplete_completed_workflows"):
        flag(
            "completed-means-all-tasks", r["instance_id"], f"{r['completed']} of {r['tasks']} tasks completed"
        )
    for r in rows("check_fence_order"):
        flag(
            "fences-increase",
            r["workflow_instance_id"],
            f"execution {r['execution_id']} granted token {r['fence_token']} after {r['previous']}",
        )
    for r in rows("check_lease_behind_execution"):
        flag(
            "fences-increase",
            r["workflow_instance_id"],
            f"lease of {r['execution_id']} is behind its execution",
        )
    for r in rows("check_running_without_lease"):
        flag(
            "running-has-lease",
            r["workflow_instance_id"],
            f"execution {r['execution_id']} is RUNNING without a lease",
        )
    for r in rows("check_rows_without_instance"):
        flag(
            "rows-have-instance",
            r["workflow_instance_id"],
            f"{r['n']} {r['child']} rows of an instance that does not exist",
        )
    for r in rows("check_instances_without_definition"):
        flag(
            "instance-has-definition",
            r["instance_id"],
            f"runs {r['namespace']}/{r['workflow_name']} version {r['workflow_version']}, "
            "which is not registered",
        )
    for r in rows("check_open_work_in_finished_workflows"):
        flag(
            "finished-has-no-open-work",
            r["workflow_instance_id"],
            f"execution {r['execution_id']} is {r['state']} in a {r['workflow_state']} workflow",
        )
    for r in rows("check_ready_parking"):
        flag(
            "ready-parked-unless-runnable",
            r["workflow_instance_id"],
            f"READY execution {r['execution_id']} is {'parked' if r['parked'] else 'leasable'} "
            f"in a {r['workflow_state']} workflow",
        )
    for r in rows("check_lease_expiry"):
        flag(
            "lease-expiry-matches",
            r["workflow_instance_id"],
            f"{r['state']} execution {r['execution_id']} "
            + ("has a lease row with the wrong expiry" if r["has_lease_row"] else "has no lease row"),
        )
    if require_finished:
        for r in rows("check_unfinished_workflows"):
            flag("every-workflow-finishes", r["instance_id"], f"still {r['state']}")

    states = {r["instance_id"]: WorkflowState(r["state"]) for r in rows("check_instance_states")}
    report.instances = len(states)
    _replay(rows, states, report, flag)
    return report


def _replay(rows: Any, states: dict[UUID, WorkflowState], report: CheckReport, flag: Any) -> None:
    """Replay each history through the transition table; tasks may only start in dispatchable states."""
    event_types = [e.value for e in EVENT_TARGET_STATE] + list(_STARTS)
    current: UUID | None = None
    state: WorkflowState | None = None

    def finish(instance_id: UUID | None, replayed: WorkflowState | None) -> None:
        if instance_id is not None and replayed is not states.get(instance_id):
            flag(
                "history-matches-state",
                instance_id,
                f"history ends {replayed} but the row says {states.get(instance_id)}",
            )

    for r in rows("check_replay_events", {"event_types": event_types}):
        report.events_replayed += 1
        iid, name = r["workflow_instance_id"], r["event_type"]
        if iid != current:
            finish(current, state)
            current, state = iid, None
        if name in _STARTS:
            if state not in DISPATCHABLE:
                flag(
                    "no-dispatch-when-not-running",
                    iid,
                    f"task started at #{r['sequence_number']} while {state}",
                )
            continue
        target = EVENT_TARGET_STATE[EventType(name)]
        if state is None:
            if name != EventType.WORKFLOW_STARTED.value:
                flag("legal-transitions", iid, f"history begins with {name}")
        elif not can_transition_workflow(state, target):
            flag(
                "legal-transitions",
                iid,
                f"{state.value} -> {target.value} at #{r['sequence_number']} ({name})",
            )
        state = target
    finish(current, state)
