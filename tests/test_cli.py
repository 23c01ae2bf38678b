"""Every command-line verb, its JSON output and its exit codes."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from orchestrator_engine import (
    EngineConfig,
    RetryPolicy,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowState,
)
from orchestrator_engine.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_VIOLATIONS, main

ONCE = RetryPolicy(max_attempts=1, initial_interval=timedelta(0), jitter=0)
SAGA = WorkflowDefinition(
    "cli",
    "order",
    [
        TaskDefinition("reserve", compensation="release", retry=ONCE),
        TaskDefinition("charge", depends_on=["reserve"], retry=ONCE),
    ],
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out = run(capsys, *argv, "--json")
    assert code == EXIT_OK, out
    return json.loads(out)


@pytest.fixture
def started(pool: Any, engine_config: EngineConfig) -> tuple[WorkflowCoordinator, TaskCoordinator, uuid.UUID]:
    wc = WorkflowCoordinator(pool, engine_config)
    wc.register_workflow(SAGA)
    instance = wc.start_workflow(StartWorkflowRequest("cli", "order", "run-1", {"sku": "x"}))
    return wc, TaskCoordinator(pool, engine_config, engine=wc.engine), instance.instance_id


def test_migrate_reports_up_to_date_on_a_migrated_database(
    capsys: pytest.CaptureFixture[str], dsn: str
) -> None:
    assert run_json(capsys, "migrate", "--dsn", dsn) == {"applied": []}
    assert run(capsys, "migrate", "--dsn", dsn) == (EXIT_OK, "up to date\n")


def test_status_counts_workflows_and_ready_tasks(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    report = run_json(capsys, "status", "--dsn", dsn)
    assert report["workflows"] == [{"namespace": "cli", "state": "RUNNING", "count": 1}]
    assert [(r["task_type"], r["ready"]) for r in report["ready"]] == [("reserve", 1)]
    code, text = run(capsys, "status", "--dsn", dsn)
    assert code == EXIT_OK
    assert "RUNNING" in text
    assert "reserve" in text


def test_show_prints_tasks_and_history(capsys: pytest.CaptureFixture[str], dsn: str, started: Any) -> None:
    _, _, instance_id = started
    shown = run_json(capsys, "show", str(instance_id), "--dsn", dsn)
    assert shown["instance"]["state"] == "RUNNING"
    assert sorted(t["task_id"] for t in shown["tasks"]) == ["charge", "reserve"]
    assert [e["event_type"] for e in shown["history"]][:2] == ["WORKFLOW_STARTED", "TASK_SCHEDULED"]
    code, text = run(capsys, "show", str(instance_id), "--dsn", dsn)
    assert code == EXIT_OK
    assert "WORKFLOW_STARTED" in text


def test_pause_resume_and_cancel_change_the_state(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    wc, _, instance_id = started
    assert run_json(capsys, "pause", str(instance_id), "--dsn", dsn)["state"] == "PAUSED"
    assert run_json(capsys, "resume", str(instance_id), "--dsn", dsn)["state"] == "RUNNING"
    assert run(capsys, "cancel", str(instance_id), "--dsn", dsn) == (EXIT_OK, "cancel: CANCELLED\n")
    assert wc.get_workflow(instance_id).state is WorkflowState.CANCELLED
    # resuming a cancelled workflow makes no sense: the engine refuses, exit code 3
    assert main(["resume", str(instance_id), "--dsn", dsn]) == EXIT_REFUSED
    assert "cannot resume" in capsys.readouterr().err


def test_retry_and_compensate_drive_a_failed_saga(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    wc, tc, instance_id = started
    worker = uuid.uuid4()
    (reserve,) = tc.poll_tasks(worker)
    tc.complete_task(reserve.execution_id, worker, reserve.fence_token, {"r": 1})
    (charge,) = tc.poll_tasks(worker)
    wc.pause_workflow(instance_id)
    tc.fail_task(charge.execution_id, worker, charge.fence_token, "declined")
    # reserve has a compensation, so the terminal failure compensates instead of failing
    assert wc.get_workflow(instance_id).state is WorkflowState.COMPENSATING
    # retrying a task that is not FAILED-latest is refused; compensating twice too
    assert main(["retry", str(instance_id), "reserve", "--dsn", dsn]) == EXIT_REFUSED
    assert main(["compensate", str(instance_id), "reserve", "--dsn", dsn]) == EXIT_REFUSED
    capsys.readouterr()
    (undo,) = tc.poll_tasks(worker)
    tc.fail_task(undo.execution_id, worker, undo.fence_token, "warehouse offline")
    assert wc.get_workflow(instance_id).state is WorkflowState.FAILED
    assert run_json(capsys, "retry", str(instance_id), "reserve", "--dsn", dsn)["attempt_number"] == 2
    (undo2,) = tc.poll_tasks(worker)
    tc.complete_task(undo2.execution_id, worker, undo2.fence_token, None)
    assert wc.get_workflow(instance_id).state is WorkflowState.COMPENSATED


def test_compensate_verb_triggers_compensation(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    _, tc, instance_id = started
    worker = uuid.uuid4()
    (reserve,) = tc.poll_tasks(worker)
    tc.complete_task(reserve.execution_id, worker, reserve.fence_token, {"r": 1})
    assert (
        run_json(capsys, "compensate", str(instance_id), "reserve", "--dsn", dsn)["state"] == "COMPENSATING"
    )


def test_doctor_is_clean_then_explains_a_paused_instance(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    wc, _, instance_id = started
    wc.pause_workflow(instance_id)
    report = run_json(capsys, "doctor", str(instance_id), "--dsn", dsn)
    assert report["violations"] == []
    assert any(line.startswith("paused") for line in report["explain"])
    assert any("no worker has leased task type 'reserve'" in line for line in report["explain"])


def test_doctor_exits_1_when_an_invariant_is_broken(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    _, _, instance_id = started
    with psycopg.connect(dsn, autocommit=True) as conn:
        # simulate corruption an operator must hear about: a gap in the event sequence
        conn.execute(
            "DELETE FROM orchestrator.events WHERE workflow_instance_id = %s AND sequence_number = 1",
            (instance_id,),
        )
    code, text = run(capsys, "doctor", "--dsn", dsn)
    assert code == EXIT_VIOLATIONS
    assert "gapless-events" in text


def test_doctor_reports_rows_left_by_an_instance_deleted_around_the_engine(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    # no foreign key removes a workflow's rows with it since 0005; only purge does
    _, tc, instance_id = started
    assert len(tc.poll_tasks(uuid.uuid4())) == 1  # a lease row too
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM orchestrator.workflow_instances WHERE instance_id = %s", (instance_id,))
    code, text = run(capsys, "doctor", "--dsn", dsn)
    assert code == EXIT_VIOLATIONS
    orphans = {line.strip() for line in text.splitlines() if "rows-have-instance" in line}
    assert orphans == {
        f"VIOLATION rows-have-instance in {instance_id}: {n} {child} rows of an instance that does not exist"
        for n, child in ((3, "events"), (1, "execution_leases"), (2, "task_executions"))
    }


def test_doctor_reports_an_instance_whose_definition_was_deleted_by_hand(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    # no foreign key refuses it since 0008: the engine never deletes a definition, doctor checks
    _, _, instance_id = started
    assert run(capsys, "doctor", "--dsn", dsn)[0] == EXIT_OK
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM orchestrator.workflow_definitions WHERE namespace = 'cli' AND name = 'order'"
        )
    code, text = run(capsys, "doctor", "--dsn", dsn)
    assert code == EXIT_VIOLATIONS
    lost = {line.strip() for line in text.splitlines() if "instance-has-definition" in line}
    detail = "runs cli/order version 1, which is not registered"
    assert lost == {f"VIOLATION instance-has-definition in {instance_id}: {detail}"}
    # asked about that instance, doctor says why it cannot move on, beside the same violation
    code, text = run(capsys, "doctor", str(instance_id), "--dsn", dsn)
    assert code == EXIT_VIOLATIONS
    assert f"VIOLATION instance-has-definition in {instance_id}: {detail}" in text
    assert "its definition cli/order version 1 is not registered (deleted by hand?)" in text


def test_doctor_reports_a_repeated_event_key_and_an_execution_key_that_does_not_match(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    # no index holds either since 0006: the engine makes them so, and doctor checks they are
    _, _, instance_id = started
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE orchestrator.events SET idempotency_key = %s"
            " WHERE workflow_instance_id = %s AND sequence_number IN (1, 2)",
            (f"{instance_id}:started", instance_id),
        )
        (charge,) = conn.execute(
            "UPDATE orchestrator.task_executions SET idempotency_key = idempotency_key || 'x'"
            " WHERE workflow_instance_id = %s AND task_id = 'charge' RETURNING execution_id",
            (instance_id,),
        ).fetchone()  # type: ignore[misc]
    code, text = run(capsys, "doctor", "--dsn", dsn)
    assert code == EXIT_VIOLATIONS
    found = {line.strip() for line in text.splitlines() if line.strip().startswith("VIOLATION")}
    assert found == {
        f"VIOLATION event-keys-unique in {instance_id}: 2 events with idempotency key {instance_id}:started",
        f"VIOLATION execution-key-matches in {instance_id}: execution {charge}"
        f" has idempotency key {instance_id}:charge:1x",
    }


def test_purge_deletes_only_old_finished_workflows(
    capsys: pytest.CaptureFixture[str], dsn: str, started: Any
) -> None:
    wc, _, instance_id = started
    wc.cancel_workflow(instance_id)
    assert run_json(capsys, "purge", "--older-than", "1h", "--dsn", dsn) == {"deleted": 0}
    time.sleep(0.01)
    assert run_json(capsys, "purge", "--older-than", "0s", "--dsn", dsn) == {"deleted": 1}
    assert main(["show", str(instance_id), "--dsn", dsn]) == EXIT_REFUSED


def test_graph_prints_the_dag_as_mermaid(capsys: pytest.CaptureFixture[str], dsn: str, started: Any) -> None:
    code, text = run(capsys, "graph", "cli", "order", "--dsn", dsn)
    assert code == EXIT_OK
    assert text.startswith("flowchart TD")
    assert "n_reserve --> n_charge" in text
    assert "release" in text


def test_unknown_instance_and_bad_input_exit_3(capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    assert main(["show", str(uuid.uuid4()), "--dsn", dsn]) == EXIT_REFUSED
    assert main(["show", "not-a-uuid", "--dsn", dsn]) == EXIT_REFUSED
    assert "not a UUID" in capsys.readouterr().err


def test_unreachable_database_exits_4_without_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    dsn = "postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere?connect_timeout=1"
    assert main(["status", "--dsn", dsn]) == EXIT_UNREACHABLE
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.err + captured.out


def test_bad_usage_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["purge", "--older-than", "soon"])
    assert exc.value.code == 2
