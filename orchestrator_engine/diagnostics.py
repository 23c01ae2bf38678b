"""Answers for operators: queue status, why an instance is not progressing, the DAG as Mermaid."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from .coordinators._engine import Engine
from .definitions import WorkflowDefinition
from .errors import WorkflowNotFoundError
from .models import WorkflowState

#: a ready task type nobody leased within this window probably has no worker polling it
POLLER_WINDOW = timedelta(minutes=5)


def status(engine: Engine) -> dict[str, Any]:
    """Return workflow counts by namespace and state, ready-queue ages, and leases about to lapse."""
    m = engine.repos.maintenance
    within = engine.config.lease_duration / 3
    with engine.reading() as c:
        counts = m.maintenance_counts_by_state(c)
        ready = m.maintenance_oldest_ready(c)
        lapsing = m.maintenance_leases_lapsing(c, within)
    return {
        "workflows": [
            {"namespace": r["namespace"], "state": r["state"], "count": r["workflows"]} for r in counts
        ],
        "ready": [
            {
                "namespace": r["namespace"],
                "task_type": r["task_type"],
                "ready": r["ready"],
                "oldest_age_s": round(float(r["oldest_age_s"]), 3),
            }
            for r in ready
        ],
        "leases_lapsing": [
            {
                "execution_id": str(r["execution_id"]),
                "instance_id": str(r["workflow_instance_id"]),
                "task_id": r["task_id"],
                "holder": str(r["lease_holder"]),
                "remaining_s": round(float(r["remaining_s"]), 3),
            }
            for r in lapsing
        ],
    }


def explain(engine: Engine, instance_id: UUID) -> list[str]:
    """Say, one line per reason, why an instance is where it is and what would move it on."""
    repos = engine.repos
    with engine.reading() as c:
        row = repos.instances.workflow_get(c, instance_id)
        if row is None:
            raise WorkflowNotFoundError(f"no workflow instance {instance_id}")
        try:
            definition = engine.definition(c, row["namespace"], row["workflow_name"], row["workflow_version"])
        except WorkflowNotFoundError:
            # deleted by hand (no foreign key keeps it since migration 0008): check_invariants reports it
            return [
                f"its definition {row['namespace']}/{row['workflow_name']} version {row['workflow_version']} "
                "is not registered (deleted by hand?): nothing can move it on until that version is "
                "registered again"
            ]
        executions = repos.executions.task_list_for_instance(c, instance_id)
        now = repos.maintenance.maintenance_now(c)
        polled = repos.maintenance.maintenance_recent_pollers(c, POLLER_WINDOW)
    state = WorkflowState(row["state"])
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for e in executions:
        latest[(e["kind"], e["task_id"])] = e  # ordered oldest first, so the last one wins
    if state in (WorkflowState.COMPLETED, WorkflowState.CANCELLED, WorkflowState.COMPENSATED):
        return [f"finished: {state.value}"]
    reasons: list[str] = []
    if state is WorkflowState.PAUSED:
        reasons.append("paused: no task is handed out until resume_workflow")
    if state is WorkflowState.FAILED:
        for e in latest.values():
            if e["state"] == "FAILED":
                what = "compensation of" if e["kind"] == "COMPENSATION" else "task"
                message = (
                    (e["error"] or {}).get("message", "") if isinstance(e["error"], dict) else e["error"]
                )
                reasons.append(
                    f"failed: {what} {e['task_id']} attempt {e['attempt_number']} failed ({message}); "
                    "use retry_task, or trigger_compensation"
                )
    completed = {t for (k, t), e in latest.items() if k == "FORWARD" and e["state"] == "COMPLETED"}
    for (kind, task_id), e in sorted(latest.items()):
        label = f"compensation of {task_id}" if kind == "COMPENSATION" else task_id
        if e["state"] == "PENDING":
            deps = definition.by_id[task_id].depends_on if kind == "FORWARD" else e["depends_on"]
            waiting = [d for d in deps if d not in completed] if kind == "FORWARD" else list(deps)
            reasons.append(f"{label} waits on {', '.join(waiting)}")
        elif e["state"] == "READY":
            if e["ready_at"] is not None and e["ready_at"] > now:
                reasons.append(f"{label} is in backoff until {e['ready_at'].isoformat()}")
            elif e["task_type"] not in polled:
                reasons.append(
                    f"{label} is ready, but no worker has leased task type {e['task_type']!r} "
                    f"in the last {int(POLLER_WINDOW.total_seconds() // 60)} minutes"
                )
            elif e["ready_at"] is None:  # parked while the workflow is paused or failed
                reasons.append(f"{label} is ready once the workflow runs again")
            else:
                reasons.append(f"{label} is ready since {e['ready_at'].isoformat()}")
        elif e["state"] == "RUNNING":
            when, holder, token = e["lease_expires_at"], e["lease_holder"], e["fence_token"]
            if when <= now:
                reasons.append(
                    f"{label}: lease of {holder} lapsed at {when.isoformat()}; the next poll reclaims it"
                )
            else:
                reasons.append(f"{label} is leased by {holder} until {when.isoformat()} (token {token})")
    return reasons or [f"{state.value}: nothing is waiting"]


def mermaid(definition: WorkflowDefinition) -> str:
    """Return the DAG as a Mermaid flowchart; compensations are drawn as dotted edges."""
    lines = ["flowchart TD"]
    for t in definition.tasks:
        lines.append(f'    {_node(t.task_id)}["{t.task_id}"]')
    for t in definition.tasks:
        for dep in t.depends_on:
            lines.append(f"    {_node(dep)} --> {_node(t.task_id)}")
        if t.compensation:
            lines.append(
                f'    {_node(t.task_id)} -. undo .-> {_node("undo_" + t.task_id)}(["{t.compensation}"])'
            )
    return "\n".join(lines)


def _node(task_id: str) -> str:
    return "n_" + "".join(ch if ch.isalnum() else "_" for ch in task_id)
