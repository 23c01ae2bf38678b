"""Specification of workflow definitions: what is a valid DAG, and how registration treats versions."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from helpers import NAMESPACE, Pool, assert_history_valid, chain, query, register, start

from orchestrator_engine import (
    ConcurrencyConflictError,
    DefinitionConflictError,
    EngineConfig,
    InvalidDefinitionError,
    RetryPolicy,
    StartWorkflowRequest,
    TaskDefinition,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowNotFoundError,
)
from orchestrator_engine.coordinators.workflow import STALE_ATTEMPTS


def workflow(*tasks: TaskDefinition, name: str = "wf", namespace: str = NAMESPACE) -> WorkflowDefinition:
    return WorkflowDefinition(namespace=namespace, name=name, tasks=tasks)


# -- the shape of the DAG ------------------------------------------------------------------------


def test_workflow_without_tasks_is_invalid() -> None:
    with pytest.raises(InvalidDefinitionError, match="no tasks"):
        workflow()


def test_duplicate_task_ids_are_invalid() -> None:
    with pytest.raises(InvalidDefinitionError, match="duplicate task id 'charge'"):
        workflow(TaskDefinition("charge"), TaskDefinition("ship"), TaskDefinition("charge"))


def test_dependency_on_an_unknown_task_is_invalid() -> None:
    with pytest.raises(InvalidDefinitionError, match="'ship' depends on unknown task 'pack'"):
        workflow(TaskDefinition("charge"), TaskDefinition("ship", depends_on=["pack"]))


def test_task_that_depends_on_itself_is_invalid() -> None:
    with pytest.raises(InvalidDefinitionError, match="'loop' depends on itself"):
        workflow(TaskDefinition("loop", depends_on=["loop"]))


def test_dependency_listed_twice_is_invalid() -> None:
    with pytest.raises(InvalidDefinitionError, match="'b' lists a dependency twice"):
        workflow(TaskDefinition("a"), TaskDefinition("b", depends_on=["a", "a"]))


def test_cycle_is_invalid_and_the_message_lists_exactly_the_tasks_on_it() -> None:
    tasks = (
        TaskDefinition("entry"),
        TaskDefinition("first", depends_on=["entry", "third"]),
        TaskDefinition("second", depends_on=["first"]),
        TaskDefinition("third", depends_on=["second"]),
        TaskDefinition("bystander", depends_on=["entry"]),
    )
    with pytest.raises(InvalidDefinitionError, match="cycle") as caught:
        workflow(*tasks)
    path = str(caught.value).split("cycle:", 1)[1].strip().split(" -> ")
    assert path[0] == path[-1], "the cycle is shown closed, ending where it starts"
    assert sorted(path[:-1]) == ["first", "second", "third"]


def test_two_task_cycle_is_invalid() -> None:
    with pytest.raises(InvalidDefinitionError, match=r"cycle: (ping -> pong -> ping|pong -> ping -> pong)$"):
        workflow(TaskDefinition("ping", depends_on=["pong"]), TaskDefinition("pong", depends_on=["ping"]))


def test_tasks_must_be_task_definitions() -> None:
    with pytest.raises(InvalidDefinitionError, match="must be TaskDefinition"):
        WorkflowDefinition(namespace=NAMESPACE, name="wf", tasks=("a",))  # type: ignore[arg-type]


def test_depends_on_given_as_a_single_string_is_invalid() -> None:
    # iterating "ab" would silently mean depends_on=["a", "b"]
    with pytest.raises(InvalidDefinitionError, match="not a string"):
        TaskDefinition("c", depends_on="ab")


# -- names ---------------------------------------------------------------------------------------

BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("x" * 129, id="129-chars"),
    pytest.param("x" * 100_000, id="huge"),
    pytest.param("'; DROP TABLE x; --", id="sql-shaped"),
    pytest.param("two words", id="space"),
    pytest.param("trailing-newline\n", id="trailing-newline"),
    pytest.param("nul\x00byte", id="nul"),
    pytest.param("naïve", id="non-ascii"),
    pytest.param("-leading-dash", id="leading-dash"),
]

NAME_PLACES: dict[str, Callable[[str], object]] = {
    "task_id": lambda name: TaskDefinition(name),
    "dependency": lambda name: TaskDefinition("t", depends_on=[name]),
    "task_type": lambda name: TaskDefinition("t", task_type=name),
    "compensation": lambda name: TaskDefinition("t", compensation=name),
    "namespace": lambda name: workflow(TaskDefinition("t"), namespace=name),
    "workflow name": lambda name: workflow(TaskDefinition("t"), name=name),
}


@pytest.mark.parametrize("place", sorted(NAME_PLACES))
@pytest.mark.parametrize("name", BAD_NAMES)
def test_malformed_names_are_refused_wherever_they_appear(place: str, name: str) -> None:
    with pytest.raises(InvalidDefinitionError, match="is not a valid name"):
        NAME_PLACES[place](name)


def test_huge_names_are_not_echoed_in_full() -> None:
    with pytest.raises(InvalidDefinitionError) as caught:
        TaskDefinition("x" * 100_000)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("place", sorted(NAME_PLACES))
def test_names_of_128_letters_digits_and_punctuation_are_accepted(place: str) -> None:
    name = ("Ab_9.:-" * 19)[:128]
    NAME_PLACES[place](name)


# -- durations, attempts, versions ---------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: TaskDefinition("t", timeout=timedelta(0)), id="zero-timeout"),
        pytest.param(lambda: TaskDefinition("t", timeout=timedelta(seconds=-1)), id="negative-timeout"),
        pytest.param(lambda: RetryPolicy(initial_interval=timedelta(milliseconds=-1)), id="negative-initial"),
        pytest.param(lambda: RetryPolicy(max_interval=timedelta(0)), id="zero-max-interval"),
        pytest.param(lambda: RetryPolicy(max_interval=timedelta(seconds=-5)), id="negative-max-interval"),
    ],
)
def test_zero_or_negative_durations_are_refused(build: Callable[[], object]) -> None:
    with pytest.raises(InvalidDefinitionError, match="must be positive"):
        build()


def test_durations_longer_than_a_year_are_refused() -> None:
    with pytest.raises(InvalidDefinitionError, match="at most 366 days"):
        TaskDefinition("t", timeout=timedelta(days=367))


def test_max_interval_shorter_than_initial_interval_is_refused() -> None:
    with pytest.raises(InvalidDefinitionError, match="max_interval must not be shorter"):
        RetryPolicy(initial_interval=timedelta(seconds=10), max_interval=timedelta(seconds=5))


@pytest.mark.parametrize("attempts", [0, -1, -(2**40)])
def test_max_attempts_below_one_is_refused(attempts: int) -> None:
    with pytest.raises(InvalidDefinitionError, match="max_attempts must be between 1 and"):
        RetryPolicy(max_attempts=attempts)


@pytest.mark.parametrize("attempts", [True, 1.5, "3", None])
def test_max_attempts_must_be_an_int(attempts: Any) -> None:
    with pytest.raises(InvalidDefinitionError, match="max_attempts must be an int"):
        RetryPolicy(max_attempts=attempts)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backoff_coefficient", 0.5),
        ("backoff_coefficient", float("nan")),
        ("jitter", -0.1),
        ("jitter", 1.5),
        ("jitter", float("nan")),
    ],
)
def test_backoff_below_one_and_jitter_outside_zero_to_one_are_refused(field: str, value: float) -> None:
    options: dict[str, Any] = {field: value}
    with pytest.raises(InvalidDefinitionError, match=field):
        RetryPolicy(**options)


@pytest.mark.parametrize("version", [0, -1, 2**31, True, "1"])
def test_version_must_be_a_positive_int(version: Any) -> None:
    with pytest.raises(InvalidDefinitionError, match="version must be a positive int"):
        WorkflowDefinition(namespace=NAMESPACE, name="wf", tasks=(TaskDefinition("t"),), version=version)


# -- retry delays --------------------------------------------------------------------------------


def test_backoff_grows_by_the_coefficient_and_stops_at_max_interval() -> None:
    policy = RetryPolicy(
        max_attempts=10,
        initial_interval=timedelta(milliseconds=200),
        backoff_coefficient=2,
        max_interval=timedelta(seconds=1),
        jitter=0,
    )
    delays = [policy.delay_after(attempt) for attempt in range(1, 6)]
    assert delays == [timedelta(milliseconds=ms) for ms in (200, 400, 800, 1000, 1000)]


def test_jitter_spreads_delays_within_its_fraction_of_the_base() -> None:
    policy = RetryPolicy(
        initial_interval=timedelta(seconds=10), max_interval=timedelta(minutes=1), jitter=0.2
    )
    rng = random.Random(7)
    delays = {policy.delay_after(1, rng).total_seconds() for _ in range(200)}
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert len(delays) > 100, "jitter must actually vary the delay"


def test_zero_initial_interval_retries_without_delay() -> None:
    assert RetryPolicy(initial_interval=timedelta(0), jitter=0.5).delay_after(3) == timedelta(0)


# -- identity of a definition --------------------------------------------------------------------


def test_definition_survives_a_json_round_trip_with_the_same_hash() -> None:
    original = workflow(
        TaskDefinition(
            "reserve",
            retry=RetryPolicy(max_attempts=5, initial_interval=timedelta(milliseconds=250), jitter=0),
            timeout=timedelta(seconds=90),
            compensation="release",
        ),
        TaskDefinition("charge", depends_on=["reserve"], task_type="payments"),
    )
    copy = WorkflowDefinition.from_json(original.to_json())
    assert copy == original
    assert copy.content_hash == original.content_hash


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(TaskDefinition("b", depends_on=["a"], task_type="other"), id="task_type"),
        pytest.param(TaskDefinition("b", depends_on=["a"], compensation="undo_b"), id="compensation"),
        pytest.param(TaskDefinition("b", depends_on=["a"], retry=RetryPolicy(max_attempts=9)), id="retry"),
        pytest.param(TaskDefinition("b", depends_on=["a"], timeout=timedelta(seconds=5)), id="timeout"),
        pytest.param(TaskDefinition("b"), id="dependencies"),
    ],
)
def test_any_change_of_body_changes_the_content_hash(changed: TaskDefinition) -> None:
    base = workflow(TaskDefinition("a"), TaskDefinition("b", depends_on=["a"]))
    assert workflow(TaskDefinition("a"), changed).content_hash != base.content_hash


# -- registration (real PostgreSQL) --------------------------------------------------------------


@pytest.fixture
def wc(pool: Pool, engine_config: EngineConfig) -> WorkflowCoordinator:
    return WorkflowCoordinator(pool, engine_config)


def stored_versions(pool: Pool, config: EngineConfig, name: str) -> list[int]:
    rows = query(
        pool, config, "SELECT version FROM {}.workflow_definitions WHERE name = %s ORDER BY version", name
    )
    return [row["version"] for row in rows]


def test_registering_an_identical_definition_again_is_a_no_op(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    first = register(wc, "orders", chain("reserve", "charge"))
    again = WorkflowDefinition(namespace=NAMESPACE, name="orders", tasks=tuple(chain("reserve", "charge")))
    assert wc.register_workflow(again) == first
    assert stored_versions(pool, engine_config, "orders") == [1]
    assert wc.get_definition(NAMESPACE, "orders") == first


def test_a_different_body_under_the_same_version_is_a_conflict_and_the_first_body_stays(
    wc: WorkflowCoordinator,
) -> None:
    first = register(wc, "orders", chain("reserve", "charge"))
    with pytest.raises(DefinitionConflictError, match="new version"):
        register(wc, "orders", chain("reserve", "charge", "ship"))
    assert wc.get_definition(NAMESPACE, "orders", 1) == first


def test_a_task_id_that_names_another_tasks_compensation_is_refused_at_registration(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    # "compensate:x" attempt 1 and x's compensation attempt 1 would hand handlers one idempotency key
    clash = workflow(TaskDefinition("x", compensation="undo"), TaskDefinition("compensate:x"), name="clash")
    with pytest.raises(InvalidDefinitionError, match="names the compensation of task 'x'"):
        wc.register_workflow(clash)
    assert stored_versions(pool, engine_config, "clash") == []
    # without a compensation of x, or with another suffix, the keys cannot meet
    wc.register_workflow(workflow(TaskDefinition("x"), TaskDefinition("compensate:x"), name="plain"))
    wc.register_workflow(
        workflow(TaskDefinition("x", compensation="undo"), TaskDefinition("compensate:y"), name="other")
    )
    # one stored before the check still reads back, so its running instances keep going
    query(
        pool,
        engine_config,
        "INSERT INTO {}.workflow_definitions (namespace, name, version, definition, content_hash)"
        " VALUES (%s, 'clash', 1, %s, %s) RETURNING 1",
        NAMESPACE,
        json.dumps(clash.to_json()),
        clash.content_hash,
    )
    assert wc.get_definition(NAMESPACE, "clash") == clash


def test_versions_coexist_and_the_latest_is_the_default(wc: WorkflowCoordinator) -> None:
    v1 = register(wc, "orders", chain("reserve"), version=1)
    v2 = register(wc, "orders", chain("reserve", "charge"), version=2)
    assert wc.get_definition(NAMESPACE, "orders") == v2
    assert wc.get_definition(NAMESPACE, "orders", 1) == v1
    assert wc.get_definition(NAMESPACE, "orders", 2) == v2


def test_a_start_without_version_uses_a_version_another_engine_registered_after_this_one_cached_the_latest(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "orders", chain("v1_task"), version=1)
    assert start(wc, "orders").workflow_version == 1  # wc's engine has learnt that 1 is the latest
    elsewhere = WorkflowCoordinator(pool, engine_config)  # another engine: another process, say
    register(elsewhere, "orders", chain("v2_task"), version=2)

    latest = start(wc, "orders", run_id="after-v2")
    assert latest.workflow_version == 2
    assert [e.task_id for e in wc.list_tasks(latest.instance_id)] == ["v2_task"]
    assert_history_valid(wc, latest.instance_id)
    assert start(wc, "orders", version=1).workflow_version == 1
    rows = query(
        pool, engine_config, "SELECT count(*) AS n FROM {}.workflow_instances WHERE run_id = %s", "after-v2"
    )
    assert rows[0]["n"] == 1


def test_a_batch_planned_with_an_outdated_latest_version_starts_every_unversioned_run_on_the_new_one(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "orders", chain("v1_task"), version=1)
    start(wc, "orders")  # wc's engine has learnt that 1 is the latest
    register(WorkflowCoordinator(pool, engine_config), "orders", chain("v2_task"), version=2)

    batch = wc.start_workflows(
        [
            StartWorkflowRequest(NAMESPACE, "orders", "latest-a"),
            StartWorkflowRequest(NAMESPACE, "orders", "pinned", version=1),
            StartWorkflowRequest(NAMESPACE, "orders", "latest-b"),
        ]
    )
    assert [(i.run_id, i.workflow_version) for i in batch] == [
        ("latest-a", 2),
        ("pinned", 1),
        ("latest-b", 2),
    ]
    for instance in batch:
        assert_history_valid(wc, instance.instance_id)
    rows = query(pool, engine_config, "SELECT count(*) AS n FROM {}.workflow_instances")
    assert rows[0]["n"] == 4, "the batch planned on version 1 wrote nothing before it was planned again"


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_a_start_whose_latest_version_stays_superseded_gives_up_and_writes_nothing(
    wc: WorkflowCoordinator,
    pool: Pool,
    engine_config: EngineConfig,
    monkeypatch: pytest.MonkeyPatch,
    batch: bool,
) -> None:
    register(wc, "orders", chain("v1_task"), version=1)
    register(wc, "orders", chain("v2_task"), version=2)
    engine = wc.engine
    asked = []

    def outdated(
        conn: psycopg.Connection[Any], namespace: str, name: str, *, cached: bool
    ) -> WorkflowDefinition:
        # an engine whose read of the latest version keeps disagreeing with the statement's check
        asked.append(cached)
        return engine.definition(conn, namespace, name, 1)

    monkeypatch.setattr(engine, "latest_definition", outdated)
    requests = [StartWorkflowRequest(NAMESPACE, "orders", f"run-{i}") for i in range(2 if batch else 1)]
    start_them = (lambda: wc.start_workflows(requests)) if batch else (lambda: wc.start_workflow(requests[0]))
    with pytest.raises(ConcurrencyConflictError, match=r"latest version of .*/orders changed"):
        start_them()
    assert asked == [True] + [False] * (STALE_ATTEMPTS - 1), "planned again on a fresh read each time"
    rows = query(pool, engine_config, "SELECT count(*) AS n FROM {}.workflow_instances")
    assert rows[0]["n"] == 0


def test_a_start_in_a_host_transaction_uses_the_latest_version_that_transaction_sees(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig, dsn: str
) -> None:
    register(wc, "orders", chain("v1_task"), version=1)
    start(wc, "orders")  # wc's engine has learnt that 1 is the latest
    elsewhere = WorkflowCoordinator(pool, engine_config)
    uncommitted = WorkflowDefinition(
        namespace=NAMESPACE, name="orders", tasks=tuple(chain("v2_task")), version=2
    )
    with psycopg.connect(dsn) as host:
        host.execute("SELECT 1")  # the host's own transaction is open
        elsewhere.register_workflow(uncommitted, conn=host)
        assert start(wc, "orders", conn=host).workflow_version == 2
        host.rollback()

    after = start(wc, "orders")
    assert after.workflow_version == 1, "a version seen only inside a rolled-back transaction is not cached"
    assert [e.task_id for e in wc.list_tasks(after.instance_id)] == ["v1_task"]


def test_same_name_in_another_namespace_is_another_workflow(wc: WorkflowCoordinator) -> None:
    mine = register(wc, "orders", chain("reserve"), namespace="team-a")
    theirs = register(wc, "orders", chain("other"), namespace="team-b")
    assert wc.get_definition("team-a", "orders") == mine
    assert wc.get_definition("team-b", "orders") == theirs


@pytest.mark.parametrize("version", [None, 1, 7])
def test_unknown_definition_raises_workflow_not_found(wc: WorkflowCoordinator, version: int | None) -> None:
    with pytest.raises(WorkflowNotFoundError):
        wc.get_definition(NAMESPACE, "nope", version)


def test_definition_registered_in_a_rolled_back_host_transaction_does_not_exist(
    wc: WorkflowCoordinator, dsn: str
) -> None:
    definition = workflow(*chain("reserve"), name="orders")
    with psycopg.connect(dsn) as host:
        host.execute("SELECT 1")  # the host's own transaction is open
        wc.register_workflow(definition, conn=host)
        host.rollback()
    with pytest.raises(WorkflowNotFoundError):
        wc.get_definition(NAMESPACE, "orders")


def test_definition_rolled_back_with_its_host_transaction_does_not_shadow_a_later_registration(
    wc: WorkflowCoordinator, dsn: str
) -> None:
    abandoned = workflow(*chain("abandoned"), name="orders")
    with psycopg.connect(dsn) as host:
        host.execute("SELECT 1")  # the host's own transaction is open
        wc.register_workflow(abandoned, conn=host)
        start(wc, "orders", conn=host)
        host.rollback()

    kept = register(wc, "orders", chain("kept"))
    assert wc.get_definition(NAMESPACE, "orders") == kept
    instance = start(wc, "orders")
    assert [e.task_id for e in wc.list_tasks(instance.instance_id)] == ["kept"]
    assert_history_valid(wc, instance.instance_id)
