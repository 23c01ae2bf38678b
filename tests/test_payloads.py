"""Specification of payloads: what JSON the engine stores, and that a refused payload writes nothing."""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from helpers import (
    NAMESPACE,
    Pool,
    complete,
    fail,
    new_worker,
    poll_one,
    query,
    register,
    single_attempt,
    snapshot,
    start,
)

from orchestrator_engine import (
    EngineConfig,
    PayloadError,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskState,
    WorkflowCoordinator,
    WorkflowState,
)

#: after every test, each instance's history is replayed through the transition table
pytestmark = pytest.mark.usefixtures("every_history_follows_legal_edges")


def nested(depth: int) -> Any:
    """Return ``depth`` lists around one number, built without recursion."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_PAYLOADS = [
    pytest.param(object(), "not a JSON value", id="object"),
    pytest.param({"when": datetime.datetime(2024, 1, 1)}, "not a JSON value", id="datetime"),
    pytest.param({"amount": decimal.Decimal("1.5")}, "not a JSON value", id="decimal"),
    pytest.param([b"raw bytes"], "not a JSON value", id="bytes"),
    pytest.param({"tags": {"a", "b"}}, "not a JSON value", id="set"),
    pytest.param({1: "int key"}, "non-string object key", id="int-key"),
    pytest.param(float("nan"), "JSON cannot represent", id="nan"),
    pytest.param({"x": float("inf")}, "JSON cannot represent", id="infinity"),
    pytest.param([1, float("-inf")], "JSON cannot represent", id="minus-infinity"),
    pytest.param("a\x00b", "NUL", id="nul-in-string"),
    pytest.param({"k": ["ok", "\x00"]}, "NUL", id="nul-nested"),
    pytest.param({"bad\x00key": 1}, "NUL", id="nul-in-key"),
    pytest.param("\ud800", "lone surrogate", id="lone-surrogate"),
    pytest.param({"\udfff": 1}, "lone surrogate", id="lone-surrogate-in-key"),
    pytest.param(nested(1_000), "nested deeper", id="too-deep"),
    pytest.param(nested(100_000), "nested deeper", id="pathologically-deep"),
    pytest.param({"n": 10**5000}, "not a JSON value", id="integer-too-long"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_PAYLOADS)
def test_refused_payload_raises_payload_error_and_writes_nothing(
    wc: WorkflowCoordinator,
    tc: TaskCoordinator,
    pool: Pool,
    engine_config: EngineConfig,
    bad: Any,
    problem: str,
) -> None:
    register(wc, "single", [TaskDefinition("work", retry=single_attempt())])

    with pytest.raises(PayloadError, match=problem):
        start(wc, "single", bad, run_id="refused")
    assert wc.find_workflow(NAMESPACE, "single", "refused") is None
    assert query(pool, engine_config, "SELECT 1 FROM {}.workflow_instances") == []
    assert query(pool, engine_config, "SELECT 1 FROM {}.events") == []

    instance = start(wc, "single", {"fine": True})
    held = poll_one(tc, new_worker())
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(PayloadError, match=problem):
        complete(tc, held, bad)
    assert snapshot(wc, instance.instance_id) == before
    assert held.lease_holder is not None
    with pytest.raises(PayloadError, match=problem):
        tc.fail_task(held.execution_id, held.lease_holder, held.fence_token, {"detail": bad})
    assert snapshot(wc, instance.instance_id) == before

    fail(tc, held)
    assert wc.get_workflow(instance.instance_id).state is WorkflowState.FAILED
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(PayloadError, match=problem):
        tc.retry_task(instance.instance_id, "work", bad)
    assert snapshot(wc, instance.instance_id) == before


def test_lease_survives_a_refused_output_so_the_holder_can_report_a_valid_one(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    instance = start(wc, "single")
    held = poll_one(tc, new_worker())
    with pytest.raises(PayloadError):
        complete(tc, held, {"oops": float("nan")})
    assert complete(tc, held, {"oops": None}).state is TaskState.COMPLETED
    assert wc.get_workflow(instance.instance_id).output == {"work": {"oops": None}}


ODD_BUT_VALID = {
    "unicode": "naïve café ✓ 日本",
    "astral": "🦆 𝄞",
    "line separators": "a\u2028b\u2029c",
    "quotes and escapes": "\"'\\/\b\f\n\r\t",
    "": "empty key",
    "big integer": 2**63 + 1,
    "negative": -(2**53),
    "small float": 1.5e-7,
    "flags": [True, False, None],
    "empty": [{}, [], ""],
    "depth": nested(40),
}


def test_a_batch_start_keeps_odd_run_ids_and_inputs_exactly(wc: WorkflowCoordinator) -> None:
    # a batch's document of instances is written out by hand around each input's checked text
    register(wc, "pair", [TaskDefinition("first"), TaskDefinition("second", depends_on=["first"])])
    run_ids = [
        'quo"te',
        "back\\slash",
        "naïve ✓ 日本",
        "🦆 𝄞",
        "line\u2028sep",
        '{"json": 1}',
        "tab\tnew\nline",
    ]
    inputs: list[Any] = [ODD_BUT_VALID, None, "text", 2**63 + 1, [1, {"a": None}], {}, {"k": '"'}]
    requests = [StartWorkflowRequest(NAMESPACE, "pair", r, i) for r, i in zip(run_ids, inputs, strict=True)]
    started = wc.start_workflows(requests)
    assert [(i.run_id, i.input) for i in started] == list(zip(run_ids, inputs, strict=True))
    for instance, request in zip(started, requests, strict=True):
        found = wc.find_workflow(NAMESPACE, "pair", request.run_id)
        assert found is not None
        assert (found.instance_id, found.input) == (instance.instance_id, request.input)
    assert wc.start_workflows(requests) == started  # idempotent per run_id, as ever


class _Disguised(str):
    """A name whose formatting differs from its characters: a batch start must write the characters."""

    def __format__(self, spec: str) -> str:
        return 'x","workflow_name":"elsewhere'


def test_a_batch_start_writes_the_names_it_checked_not_how_they_format(wc: WorkflowCoordinator) -> None:
    register(wc, "pair", [TaskDefinition("first")])
    requests = [StartWorkflowRequest(_Disguised(NAMESPACE), _Disguised("pair"), f"d-{i}") for i in range(2)]
    started = wc.start_workflows(requests)
    assert [(i.namespace, i.workflow_name) for i in started] == [(NAMESPACE, "pair")] * 2
    assert all(wc.find_workflow(NAMESPACE, "pair", f"d-{i}") is not None for i in range(2))


def test_odd_but_valid_json_round_trips_unchanged_through_every_stage(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "pair", [TaskDefinition("first"), TaskDefinition("second", depends_on=["first"])])
    instance = start(wc, "pair", ODD_BUT_VALID)
    assert wc.get_workflow(instance.instance_id).input == ODD_BUT_VALID
    worker = new_worker()

    first = poll_one(tc, worker)
    assert first.input == {"workflow": ODD_BUT_VALID, "dependencies": {}}
    complete(tc, first, ODD_BUT_VALID)
    second = poll_one(tc, worker)
    assert second.input == {"workflow": ODD_BUT_VALID, "dependencies": {"first": ODD_BUT_VALID}}
    complete(tc, second, [ODD_BUT_VALID])

    assert wc.get_workflow(instance.instance_id).output == {"first": ODD_BUT_VALID, "second": [ODD_BUT_VALID]}


@pytest.mark.parametrize("value", [None, 0, "", [], {}, False])
def test_empty_and_falsy_values_are_stored_as_given(
    wc: WorkflowCoordinator, tc: TaskCoordinator, value: Any
) -> None:
    register(wc, "single", [TaskDefinition("work")])
    instance = start(wc, "single", value)
    held = poll_one(tc, new_worker())
    assert held.input == {"workflow": value, "dependencies": {}}
    complete(tc, held, value)
    assert wc.get_workflow(instance.instance_id).output == {"work": value}


# -- the size limit ------------------------------------------------------------------------------

LIMIT = 64


@pytest.fixture
def small(pool: Pool, engine_config: EngineConfig) -> tuple[WorkflowCoordinator, TaskCoordinator]:
    """Return coordinators that refuse payloads over LIMIT bytes of UTF-8 JSON."""
    config = replace(engine_config, max_payload_bytes=LIMIT)
    return WorkflowCoordinator(pool, config), TaskCoordinator(pool, config)


@pytest.mark.parametrize(
    ("text", "fits"),
    [
        pytest.param("x" * (LIMIT - 2), True, id="exactly-at-limit"),
        pytest.param("x" * (LIMIT - 1), False, id="one-byte-over"),
        pytest.param("é" * ((LIMIT - 2) // 2), True, id="multibyte-at-limit"),
        pytest.param("é" * ((LIMIT - 2) // 2 + 1), False, id="multibyte-over-though-few-characters"),
    ],
)
def test_input_size_is_measured_in_utf8_bytes_of_its_json(
    small: tuple[WorkflowCoordinator, TaskCoordinator], text: str, fits: bool
) -> None:
    wc, _ = small
    register(wc, "single", [TaskDefinition("work")])
    if fits:
        assert start(wc, "single", text, run_id="sized").input == text
    else:
        with pytest.raises(PayloadError, match=f"over the limit of {LIMIT} bytes"):
            start(wc, "single", text, run_id="sized")
        assert wc.find_workflow(NAMESPACE, "single", "sized") is None


@pytest.mark.parametrize(
    ("report", "accepted"),
    [(complete, TaskState.COMPLETED), (fail, TaskState.FAILED)],
    ids=["output", "error"],
)
def test_result_over_the_limit_is_refused_and_the_task_stays_running(
    small: tuple[WorkflowCoordinator, TaskCoordinator],
    report: Callable[[TaskCoordinator, TaskExecution, str], TaskExecution],
    accepted: TaskState,
) -> None:
    wc, tc = small
    register(wc, "single", [TaskDefinition("work")])
    instance = start(wc, "single")
    held = poll_one(tc, new_worker())
    before = snapshot(wc, instance.instance_id)
    with pytest.raises(PayloadError, match="over the limit"):
        report(tc, held, "y" * LIMIT)
    assert snapshot(wc, instance.instance_id) == before
    assert report(tc, held, "short").state is accepted
