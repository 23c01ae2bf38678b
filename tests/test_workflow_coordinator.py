"""Specification of WorkflowCoordinator: idempotent start, reads, lifecycle control, the state machine."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from uuid import RFC_4122, UUID

import psycopg
import pytest
from helpers import (
    NAMESPACE,
    Pool,
    assert_history_valid,
    chain,
    complete,
    drive,
    event_id_for,
    event_types,
    events_of,
    executions,
    fail,
    lease_row,
    new_worker,
    poll_all,
    poll_one,
    query,
    register,
    single_attempt,
    snapshot,
    start,
    states,
)
from psycopg import sql

from orchestrator_engine import (
    EngineConfig,
    EventType,
    FencingError,
    InvalidStateError,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskState,
    WorkflowCoordinator,
    WorkflowInstance,
    WorkflowNotFoundError,
    WorkflowState,
    create_pool,
)
from orchestrator_engine.check import check_invariants
from orchestrator_engine.models import (
    TASK_TRANSITIONS,
    WORKFLOW_TRANSITIONS,
    can_transition_task,
    can_transition_workflow,
)

W = WorkflowState


#: after every test, each instance's history is replayed through the transition table
pytestmark = pytest.mark.usefixtures("every_history_follows_legal_edges")


def diamond(**options: Any) -> list[TaskDefinition]:
    return [
        TaskDefinition("root", **options),
        TaskDefinition("left", depends_on=["root"], **options),
        TaskDefinition("right", depends_on=["root"], **options),
        TaskDefinition("join", depends_on=["left", "right"], **options),
    ]


def count_instances(pool: Pool, config: EngineConfig, run_id: str) -> int:
    rows = query(pool, config, "SELECT count(*) AS n FROM {}.workflow_instances WHERE run_id = %s", run_id)
    return int(rows[0]["n"])


# -- start ---------------------------------------------------------------------------------------


def test_start_creates_a_running_instance_with_root_tasks_ready_and_the_rest_pending(
    wc: WorkflowCoordinator,
) -> None:
    register(wc, "shop", diamond())
    instance = start(wc, "shop", {"order": 42}, run_id="order-42")

    assert instance.state is W.RUNNING
    assert (instance.namespace, instance.workflow_name, instance.workflow_version) == (NAMESPACE, "shop", 1)
    assert (instance.run_id, instance.input, instance.output) == ("order-42", {"order": 42}, None)
    assert states(wc, instance.instance_id) == {
        "join": "PENDING",
        "left": "PENDING",
        "right": "PENDING",
        "root": "READY",
    }
    history = assert_history_valid(wc, instance.instance_id)
    assert event_types(history) == ["WORKFLOW_STARTED", "TASK_SCHEDULED"]
    assert history[0].payload == {"run_id": "order-42", "workflow_version": 1}
    assert history[1].payload["task_id"] == "root"


def test_root_task_input_carries_the_workflow_input_and_no_dependencies(wc: WorkflowCoordinator) -> None:
    register(wc, "shop", chain("a", "b"))
    instance = start(wc, "shop", {"order": 42})
    [root] = executions(wc, instance.instance_id, task_id="a")
    assert root.input == {"workflow": {"order": 42}, "dependencies": {}}
    [waiting] = executions(wc, instance.instance_id, task_id="b")
    assert waiting.input is None


def test_starting_again_with_the_same_run_id_returns_the_existing_instance_unchanged(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "shop", chain("a"))
    first = start(wc, "shop", {"try": 1}, run_id="same")
    again = start(wc, "shop", {"try": 2}, run_id="same")
    assert again == first
    assert again.input == {"try": 1}
    assert count_instances(pool, engine_config, "same") == 1
    assert len(wc.get_history(first.instance_id)) == 2


def test_twelve_simultaneous_starts_with_one_run_id_create_exactly_one_instance(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "shop", diamond())
    callers = 12
    barrier = threading.Barrier(callers, timeout=30)
    results: list[WorkflowInstance] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            barrier.wait()
            results.append(start(wc, "shop", {"n": 1}, run_id="contended"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(results) == callers
    assert len({r.instance_id for r in results}) == 1
    assert count_instances(pool, engine_config, "contended") == 1
    instance_id = results[0].instance_id
    assert len(wc.list_tasks(instance_id)) == 4, "tasks were created once"
    assert len(events_of(wc, instance_id, EventType.WORKFLOW_STARTED)) == 1


@pytest.fixture
def listener(dsn: str, wc: WorkflowCoordinator) -> Iterator[psycopg.Connection[Any]]:
    """Yield a connection that LISTENs on the channel where the engine wakes idle workers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(wc.engine.channel)))
        yield conn


def wake_ups(listener: psycopg.Connection[Any], count: int) -> list[str]:
    """Return the namespaces of the next ``count`` wake-ups, in commit order."""
    return [n.payload for n in listener.notifies(timeout=10, stop_after=count)]


def test_a_start_wakes_workers_and_a_repeated_start_does_not(
    wc: WorkflowCoordinator, listener: psycopg.Connection[Any]
) -> None:
    register(wc, "shop", chain("a"))
    register(wc, "shop", chain("a"), namespace="other")
    start(wc, "shop", run_id="once")
    start(wc, "shop", run_id="once")  # exists already: no new work for a worker
    wc.start_workflows(
        [StartWorkflowRequest("other", "shop", "batch-1"), StartWorkflowRequest("other", "shop", "batch-2")]
    )
    assert wake_ups(listener, 2) == [NAMESPACE, "other"], "one wake-up for each start that started something"


def test_a_start_with_notify_off_or_rolled_back_with_its_host_wakes_no_worker(
    wc: WorkflowCoordinator,
    pool: Pool,
    engine_config: EngineConfig,
    host: psycopg.Connection[Any],
    listener: psycopg.Connection[Any],
) -> None:
    register(wc, "shop", chain("a"))
    register(wc, "shop", chain("a"), namespace="other")
    start(WorkflowCoordinator(pool, replace(engine_config, notify=False)), "shop")
    host.execute("INSERT INTO public.orders VALUES (1)")  # opens the host's implicit transaction
    start(wc, "shop", conn=host)
    host.rollback()
    start(wc, "shop", namespace="other")
    assert wake_ups(listener, 1) == ["other"]


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit-pool", "transaction-pool"])
def test_a_start_overlapping_another_commits_without_notify_and_is_announced_after(
    autocommit: bool,
    engine_config: EngineConfig,
    host: psycopg.Connection[Any],
    listener: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL serialises the commits of transactions that NOTIFY (one lock, held through the WAL
    flush), so while one start of an engine is in flight, another commits without notifying and the
    engine announces it once it has committed (on a pool of non-autocommit connections too, where the
    start is a transaction of its own)."""
    with create_pool(engine_config, kwargs={"autocommit": autocommit}) as pool:
        wc = WorkflowCoordinator(pool, engine_config)
        register(wc, "shop", chain("a"))
        register(wc, "shop", chain("a"), namespace="other")
        repo = wc.engine.repos.instances
        channels: dict[str, str | None] = {}
        committed_when_announced: list[bool] = []
        start_one, announce = repo.workflow_start_one, repo.announce

        def start_spy(conn: psycopg.Connection[Any], params: dict[str, Any], **kw: Any) -> Any:
            channels[params["run_id"]] = params["channel"]
            return start_one(conn, params, **kw)

        visible = sql.SQL("SELECT count(*) FROM {}.workflow_instances WHERE run_id = 'overlapping'").format(
            sql.Identifier(engine_config.schema)
        )

        def announce_spy(conn: psycopg.Connection[Any], channel: str, namespaces: list[str]) -> None:
            with psycopg.connect(engine_config.dsn) as other:
                committed_when_announced.append(other.execute(visible).fetchone() == (1,))
            announce(conn, channel, namespaces)

        monkeypatch.setattr(repo, "workflow_start_one", start_spy)
        monkeypatch.setattr(repo, "announce", announce_spy)
        host.execute("INSERT INTO public.orders VALUES (1)")  # opens the host's implicit transaction
        start(wc, "shop", run_id="held", conn=host)  # which now holds this run_id, uncommitted
        assert channels.pop("held") == wc.engine.channel, "in a host's transaction the start notifies itself"
        in_flight = threading.Thread(target=start, args=(wc, "shop"), kwargs={"run_id": "held"})
        in_flight.start()  # waits on the host's transaction (ON CONFLICT), holding its NOTIFY turn
        deadline = time.monotonic() + 10
        with psycopg.connect(engine_config.dsn, autocommit=True) as probe:
            while not probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ).fetchone()[0]:  # type: ignore[index]
                assert time.monotonic() < deadline, "the first start never waited on the host's run_id"
                time.sleep(0.01)

        overlapping = start(wc, "shop", namespace="other", run_id="overlapping")
        assert channels["overlapping"] is None, "the overlapping start does not notify in its transaction"
        assert wake_ups(listener, 1) == ["other"], "it is announced"
        assert committed_when_announced == [True], "once committed"
        assert wc.find_workflow("other", "shop", "overlapping") == overlapping

        host.commit()
        in_flight.join(timeout=10)
        assert not in_flight.is_alive()
        assert channels["held"] == wc.engine.channel, "the start in flight notified itself"
        assert wake_ups(listener, 1) == [NAMESPACE], "the host's commit announces its start"
        assert wc.find_workflow(NAMESPACE, "shop", "held") is not None


def test_an_announcement_that_failed_is_sent_again(
    wc: WorkflowCoordinator, listener: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = wc.engine.repos.instances
    real, tries = repo.announce, []

    def flaky(conn: psycopg.Connection[Any], channel: str, namespaces: list[str]) -> None:
        tries.append(namespaces)
        if len(tries) == 1:
            raise psycopg.OperationalError("the connection dropped")
        real(conn, channel, namespaces)

    monkeypatch.setattr(repo, "announce", flaky)
    wc.engine.announce_later(["other"])
    assert wake_ups(listener, 1) == ["other"]
    assert tries == [["other"], ["other"]]


def test_a_start_through_a_pool_of_non_autocommit_connections_is_committed(
    engine_config: EngineConfig, wc: WorkflowCoordinator
) -> None:
    register(wc, "shop", chain("a"))
    with create_pool(engine_config, kwargs={"autocommit": False}) as plain:
        started = start(WorkflowCoordinator(plain, engine_config), "shop", run_id="kept")
    assert wc.find_workflow(NAMESPACE, "shop", "kept") == started


def test_same_run_id_in_two_workflows_starts_two_instances(wc: WorkflowCoordinator) -> None:
    register(wc, "shop", chain("a"))
    register(wc, "refund", chain("a"))
    assert start(wc, "shop", run_id="r").instance_id != start(wc, "refund", run_id="r").instance_id


def test_start_many_is_idempotent_per_run_id(wc: WorkflowCoordinator) -> None:
    register(wc, "shop", chain("a"))
    requests = [StartWorkflowRequest(NAMESPACE, "shop", f"batch-{i}", {"i": i}) for i in range(3)]
    first = wc.start_workflows(requests)
    assert [i.input for i in first] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert wc.start_workflows(requests) == first


def test_start_many_in_a_host_transaction_whose_connection_loads_uuids_as_text(
    wc: WorkflowCoordinator, dsn: str
) -> None:
    # the started rows are read through the host connection's adapters: its own uuid loader too
    from psycopg.types.string import TextLoader

    register(wc, "shop", chain("a"))
    requests = [StartWorkflowRequest(NAMESPACE, "shop", f"text-{i}", {"i": i}) for i in range(3)]
    with psycopg.connect(dsn) as conn:
        conn.adapters.register_loader("uuid", TextLoader)
        started = wc.start_workflows(requests, conn=conn)
    assert [i.run_id for i in started] == ["text-0", "text-1", "text-2"]
    assert [wc.get_workflow(str(i.instance_id)).input for i in started] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_start_many_is_all_or_nothing(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "shop", chain("a"))
    requests = [
        StartWorkflowRequest(NAMESPACE, "shop", "kept-only-if-all-start"),
        StartWorkflowRequest(NAMESPACE, "never-registered", "doomed"),
    ]
    with pytest.raises(WorkflowNotFoundError):
        wc.start_workflows(requests)
    assert count_instances(pool, engine_config, "kept-only-if-all-start") == 0


@pytest.mark.parametrize(
    ("name", "version"), [("never-registered", None), ("never-registered", 1), ("shop", 2)]
)
def test_starting_an_unknown_workflow_or_version_raises_workflow_not_found(
    wc: WorkflowCoordinator, pool: Pool, engine_config: EngineConfig, name: str, version: int | None
) -> None:
    register(wc, "shop", chain("a"))
    with pytest.raises(WorkflowNotFoundError):
        start(wc, name, run_id="lost", version=version)
    assert count_instances(pool, engine_config, "lost") == 0


def test_a_running_instance_keeps_its_version_when_a_new_one_is_registered(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", chain("v1_first", "v1_second"), version=1)
    old = start(wc, "shop")
    register(wc, "shop", chain("v2_only"), version=2)

    latest_run = start(wc, "shop")
    pinned_run = start(wc, "shop", version=1)
    assert (old.workflow_version, latest_run.workflow_version, pinned_run.workflow_version) == (1, 2, 1)

    worker = new_worker()
    done = drive(tc, worker)
    by_instance: dict[UUID, list[str]] = {}
    for e in done:
        by_instance.setdefault(e.workflow_instance_id, []).append(e.task_id)
    assert by_instance[old.instance_id] == ["v1_first", "v1_second"]
    assert by_instance[pinned_run.instance_id] == ["v1_first", "v1_second"]
    assert by_instance[latest_run.instance_id] == ["v2_only"]
    assert wc.get_workflow(old.instance_id).state is W.COMPLETED


# -- host transactions ---------------------------------------------------------------------------


@pytest.fixture
def host(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """Yield a connection of the host application, which owns a table of its own."""
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE public.orders (id int PRIMARY KEY)")
    with psycopg.connect(dsn) as conn:
        yield conn


def host_orders(host: psycopg.Connection[Any]) -> list[int]:
    rows = host.execute("SELECT id FROM public.orders").fetchall()
    host.rollback()
    return [row[0] for row in rows]


def test_start_inside_a_host_transaction_that_rolls_back_leaves_no_trace(
    wc: WorkflowCoordinator,
    tc: TaskCoordinator,
    host: psycopg.Connection[Any],
    pool: Pool,
    engine_config: EngineConfig,
) -> None:
    register(wc, "shop", chain("a"))
    host.execute("INSERT INTO public.orders VALUES (1)")  # opens the host's implicit transaction
    inside = start(wc, "shop", run_id="outbox", conn=host)
    assert inside.state is W.RUNNING
    host.rollback()

    assert host_orders(host) == []
    assert wc.find_workflow(NAMESPACE, "shop", "outbox") is None
    with pytest.raises(WorkflowNotFoundError):
        wc.get_workflow(inside.instance_id)
    assert query(pool, engine_config, "SELECT * FROM {}.events") == []
    assert tc.poll_tasks(new_worker()) == []


def test_start_inside_a_host_transaction_that_commits_exists_with_the_host_write(
    wc: WorkflowCoordinator, tc: TaskCoordinator, host: psycopg.Connection[Any]
) -> None:
    register(wc, "shop", chain("a"))
    host.execute("INSERT INTO public.orders VALUES (1)")  # opens the host's implicit transaction
    inside = start(wc, "shop", run_id="outbox", conn=host)
    assert wc.find_workflow(NAMESPACE, "shop", "outbox") is None, "invisible before the host commits"
    host.commit()

    assert host_orders(host) == [1]
    assert wc.find_workflow(NAMESPACE, "shop", "outbox") == inside
    assert poll_one(tc, new_worker()).workflow_instance_id == inside.instance_id


# -- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["get_workflow", "list_tasks", "get_history"])
def test_reading_an_unknown_instance_raises_workflow_not_found(wc: WorkflowCoordinator, read: str) -> None:
    method: Callable[[UUID], object] = getattr(wc, read)
    with pytest.raises(WorkflowNotFoundError):
        method(uuid.uuid4())


def test_list_tasks_returns_every_attempt(wc: WorkflowCoordinator, tc: TaskCoordinator) -> None:
    register(wc, "shop", [TaskDefinition("flaky", retry=single_attempt())])
    # single_attempt makes the first failure terminal; retry_task adds attempts on demand
    instance = start(wc, "shop")
    worker = new_worker()
    fail(tc, poll_one(tc, worker))
    tc.retry_task(instance.instance_id, "flaky")
    fail(tc, poll_one(tc, worker))
    tc.retry_task(instance.instance_id, "flaky")
    complete(tc, poll_one(tc, worker), "ok")

    attempts = wc.list_tasks(instance.instance_id)
    assert [(e.task_id, e.attempt_number, e.state) for e in attempts] == [
        ("flaky", 1, TaskState.FAILED),
        ("flaky", 2, TaskState.FAILED),
        ("flaky", 3, TaskState.COMPLETED),
    ]


def test_history_is_numbered_from_one_without_gaps(wc: WorkflowCoordinator, tc: TaskCoordinator) -> None:
    register(wc, "shop", diamond())
    instance = start(wc, "shop")
    drive(tc, new_worker())
    history = wc.get_history(instance.instance_id)
    assert [e.sequence_number for e in history] == list(range(1, len(history) + 1))
    assert history[-1].event_type == "WORKFLOW_COMPLETED"
    assert wc.get_workflow(instance.instance_id).sequence_number == len(history)


def test_an_events_id_is_a_version_8_uuid_named_by_its_idempotency_key(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "shop", diamond())
    instance = start(wc, "shop")
    drive(tc, new_worker())
    history = wc.get_history(instance.instance_id)
    keys = {
        r["sequence_number"]: r["idempotency_key"]
        for r in query(
            pool,
            engine_config,
            "SELECT sequence_number, idempotency_key FROM {}.events WHERE workflow_instance_id = %s",
            instance.instance_id,
        )
    }
    assert len(history) == len(keys) == 14  # started, 3 per task, completed
    for event in history:
        assert event.event_id.version == 8
        assert event.event_id.variant == uuid.RFC_4122
        assert event.event_id == event_id_for(keys[event.sequence_number])
    # the same key names the same id, whichever statement writes the event: the first event of a
    # run is named by its instance alone
    assert history[0].event_id == event_id_for(f"{instance.instance_id}:started")
    assert len({e.event_id for e in history}) == len(history)


def test_the_event_id_function_is_inlined_where_it_is_called_and_ignores_the_client_encoding(
    pool: Pool, engine_config: EngineConfig
) -> None:
    # migration 0009 names the expression once; the statements' plans must still hold the expression
    # itself (a call per event would cost a function call each), and a key must name one id whatever
    # encoding the session speaks
    keys = ["plain", "caf\u00e9:\u20ac", "\U0001f600:astral"]
    with pool.connection() as conn:
        plan = conn.execute(
            sql.SQL("EXPLAIN VERBOSE SELECT {}.event_id(k) FROM unnest(%s::text[]) AS u(k)").format(
                sql.Identifier(engine_config.schema)
            ),
            (keys,),
        ).fetchall()
        ids = {}
        for encoding in ("UTF8", "LATIN9", "UTF8"):
            conn.execute(sql.SQL("SET client_encoding TO {}").format(sql.Literal(encoding)))
            rows = conn.execute(
                sql.SQL("SELECT {}.event_id(%s)").format(sql.Identifier(engine_config.schema)),
                (keys[1],),
            ).fetchall()
            ids[encoding] = rows[0][0]
        conn.execute("RESET client_encoding")
        named = conn.execute(
            sql.SQL("SELECT k, {}.event_id(k) FROM unnest(%s::text[]) AS u(k)").format(
                sql.Identifier(engine_config.schema)
            ),
            (keys,),
        ).fetchall()
    output = "\n".join(line for (line,) in plan)
    assert "sha256(convert_to(" in output, output
    assert "event_id(" not in output, output
    assert ids["UTF8"] == ids["LATIN9"] == event_id_for(keys[1])
    assert dict(named) == {k: event_id_for(k) for k in keys}


def test_completed_workflow_output_maps_every_task_to_its_output(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", diamond())
    instance = start(wc, "shop", {"order": 1})
    drive(tc, new_worker(), lambda e: {"from": e.task_id})
    finished = wc.get_workflow(instance.instance_id)
    assert finished.state is W.COMPLETED
    assert finished.output == {t: {"from": t} for t in ("root", "left", "right", "join")}


def test_concurrent_completions_of_twenty_parallel_branches_are_all_kept(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    branches = [f"branch_{i:02}" for i in range(20)]
    register(wc, "fanout", [TaskDefinition(b) for b in branches])
    instance = start(wc, "fanout")
    leased = poll_all(tc, new_worker())
    assert sorted(e.task_id for e in leased) == branches

    barrier = threading.Barrier(len(leased), timeout=30)
    errors: list[BaseException] = []

    def finish(index: int) -> None:
        try:
            barrier.wait()
            complete(tc, leased[index], {"n": index})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(len(leased))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    finished = wc.get_workflow(instance.instance_id)
    assert finished.state is W.COMPLETED
    assert finished.output == {e.task_id: {"n": i} for i, e in enumerate(leased)}
    history = assert_history_valid(wc, instance.instance_id)
    assert event_types(history).count("TASK_COMPLETED") == 20
    assert event_types(history).count("WORKFLOW_COMPLETED") == 1


# -- pause and resume ----------------------------------------------------------------------------


def test_paused_workflow_hands_out_no_task_until_resumed(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", [TaskDefinition("a"), TaskDefinition("b")])
    instance = start(wc, "shop")
    ready = executions(wc, instance.instance_id)
    worker = new_worker()

    paused = wc.pause_workflow(instance.instance_id)
    assert paused.state is W.PAUSED
    assert tc.poll_tasks(worker, limit=10) == []
    assert [tc.acquire_task(e.execution_id, worker) for e in ready] == [None, None]
    assert states(wc, instance.instance_id) == {"a": "READY", "b": "READY"}

    assert wc.resume_workflow(instance.instance_id).state is W.RUNNING
    assert sorted(e.task_id for e in poll_all(tc, worker)) == ["a", "b"]
    assert event_types(events_of(wc, instance.instance_id, EventType.WORKFLOW_PAUSED)) == ["WORKFLOW_PAUSED"]
    assert len(events_of(wc, instance.instance_id, EventType.WORKFLOW_RESUMED)) == 1


def test_ready_tasks_of_paused_workflows_do_not_hold_back_the_queue(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool
) -> None:
    register(wc, "shop", [TaskDefinition("a")])
    paused = [start(wc, "shop") for _ in range(20)]
    for p in paused:
        wc.pause_workflow(p.instance_id)
    running = start(wc, "shop")
    worker = new_worker()

    # the twenty older ready tasks are parked, so the oldest leasable one is the running workflow's
    leased = tc.poll_tasks(worker, limit=1)
    assert [e.workflow_instance_id for e in leased] == [running.instance_id]
    assert [e.ready_at for e in executions(wc, paused[0].instance_id)] == [None]
    with pool.connection() as conn:
        assert check_invariants(conn).ok

    wc.resume_workflow(paused[0].instance_id)
    resumed = executions(wc, paused[0].instance_id)
    assert resumed[0].ready_at is not None, "resuming makes the parked task leasable again"
    assert [e.workflow_instance_id for e in tc.poll_tasks(worker, limit=5)] == [paused[0].instance_id]
    with pool.connection() as conn:
        assert check_invariants(conn).ok


def test_ready_tasks_of_a_failed_workflow_wait_for_retry_task(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool
) -> None:
    register(wc, "shop", [TaskDefinition("a", retry=single_attempt()), TaskDefinition("b")])
    instance = start(wc, "shop")
    worker = new_worker()
    a = tc.poll_tasks(worker, task_types=["a"])[0]
    fail(tc, a)
    assert wc.get_workflow(instance.instance_id).state is W.FAILED
    assert states(wc, instance.instance_id) == {"a": "FAILED", "b": "READY"}
    assert tc.poll_tasks(worker, limit=10) == [], "b is ready, but its workflow failed"
    with pool.connection() as conn:
        assert check_invariants(conn).ok

    tc.retry_task(instance.instance_id, "a")
    assert sorted(e.task_id for e in tc.poll_tasks(worker, limit=10)) == ["a", "b"]
    with pool.connection() as conn:
        assert check_invariants(conn).ok


def test_task_leased_before_pause_can_complete_and_its_result_is_kept(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", chain("a", "b"))
    instance = start(wc, "shop")
    worker = new_worker()
    a = poll_one(tc, worker)
    wc.pause_workflow(instance.instance_id)

    done = complete(tc, a, {"kept": True})
    assert done.state is TaskState.COMPLETED
    assert wc.get_workflow(instance.instance_id).state is W.PAUSED
    assert states(wc, instance.instance_id) == {"a": "COMPLETED", "b": "READY"}
    assert tc.poll_tasks(worker) == [], "b is ready but the workflow is paused"

    wc.resume_workflow(instance.instance_id)
    b = poll_one(tc, worker)
    assert b.input["dependencies"] == {"a": {"kept": True}}
    complete(tc, b, 2)
    assert wc.get_workflow(instance.instance_id).output == {"a": {"kept": True}, "b": 2}


def test_last_task_leased_before_pause_completes_the_paused_workflow(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", chain("only"))
    instance = start(wc, "shop")
    only = poll_one(tc, new_worker())
    wc.pause_workflow(instance.instance_id)
    complete(tc, only, "done")
    finished = wc.get_workflow(instance.instance_id)
    assert (finished.state, finished.output) == (W.COMPLETED, {"only": "done"})


# -- cancel --------------------------------------------------------------------------------------


def test_cancel_cancels_open_executions_and_fences_the_running_one(
    wc: WorkflowCoordinator, tc: TaskCoordinator, pool: Pool, engine_config: EngineConfig
) -> None:
    register(wc, "shop", [*chain("a", "b"), TaskDefinition("c"), TaskDefinition("d")])
    instance = start(wc, "shop")
    worker = new_worker()
    [running] = tc.poll_tasks(worker, task_types=["a"])
    finished = poll_one(tc, worker)
    complete(tc, finished, "before cancel")
    [still_ready] = [t for t in ("c", "d") if t != finished.task_id]

    cancelled = wc.cancel_workflow(instance.instance_id)
    assert cancelled.state is W.CANCELLED
    assert states(wc, instance.instance_id) == {
        "a": "CANCELLED",
        "b": "CANCELLED",
        finished.task_id: "COMPLETED",
        still_ready: "CANCELLED",
    }
    assert lease_row(pool, engine_config, running.execution_id) is None
    [event] = events_of(wc, instance.instance_id, EventType.WORKFLOW_CANCELLED)
    assert event.payload == {"from": "RUNNING", "cancelled_executions": 3}

    before = snapshot(wc, instance.instance_id)
    with pytest.raises(FencingError):
        complete(tc, running, "too late")
    assert snapshot(wc, instance.instance_id) == before
    assert tc.poll_tasks(worker, limit=10) == []


def test_cancel_of_a_paused_or_failed_workflow_is_allowed(
    wc: WorkflowCoordinator, tc: TaskCoordinator
) -> None:
    register(wc, "shop", [TaskDefinition("a", retry=single_attempt())])
    paused = start(wc, "shop")
    wc.pause_workflow(paused.instance_id)
    assert wc.cancel_workflow(paused.instance_id).state is W.CANCELLED

    failed = start(wc, "shop")
    fail(tc, poll_one(tc, new_worker()))
    assert wc.get_workflow(failed.instance_id).state is W.FAILED
    assert wc.cancel_workflow(failed.instance_id).state is W.CANCELLED


# -- control calls: no-ops and illegal moves -----------------------------------------------------


def make_running(wc: WorkflowCoordinator, tc: TaskCoordinator) -> UUID:
    return start(wc, "control").instance_id


def make_paused(wc: WorkflowCoordinator, tc: TaskCoordinator) -> UUID:
    instance_id = make_running(wc, tc)
    wc.pause_workflow(instance_id)
    return instance_id


def make_cancelled(wc: WorkflowCoordinator, tc: TaskCoordinator) -> UUID:
    instance_id = make_running(wc, tc)
    wc.cancel_workflow(instance_id)
    return instance_id


def make_completed(wc: WorkflowCoordinator, tc: TaskCoordinator) -> UUID:
    instance_id = make_running(wc, tc)
    drive(tc, new_worker())
    return instance_id


def make_failed(wc: WorkflowCoordinator, tc: TaskCoordinator) -> UUID:
    instance_id = make_running(wc, tc)
    fail(tc, poll_one(tc, new_worker()))
    return instance_id


def make_compensating(wc: WorkflowCoordinator, tc: TaskCoordinator) -> UUID:
    instance_id = make_running(wc, tc)
    complete(tc, poll_one(tc, new_worker()))
    wc.trigger_compensation(instance_id, "a")
    return instance_id


MAKERS: dict[str, Callable[[WorkflowCoordinator, TaskCoordinator], UUID]] = {
    "RUNNING": make_running,
    "PAUSED": make_paused,
    "CANCELLED": make_cancelled,
    "COMPLETED": make_completed,
    "FAILED": make_failed,
    "COMPENSATING": make_compensating,
}


@pytest.fixture
def control(wc: WorkflowCoordinator) -> None:
    register(
        wc,
        "control",
        [
            TaskDefinition("a", retry=single_attempt(), compensation="undo_a"),
            TaskDefinition("b", depends_on=["a"], retry=single_attempt()),
        ],
    )


@pytest.mark.usefixtures("control")
@pytest.mark.parametrize(
    ("state", "call"),
    [
        ("PAUSED", "pause_workflow"),
        ("RUNNING", "resume_workflow"),
        ("CANCELLED", "cancel_workflow"),
    ],
)
def test_repeating_a_control_call_is_a_no_op(
    wc: WorkflowCoordinator, tc: TaskCoordinator, state: str, call: str
) -> None:
    instance_id = MAKERS[state](wc, tc)
    before = snapshot(wc, instance_id)
    again: WorkflowInstance = getattr(wc, call)(instance_id)
    assert again == before.instance
    assert snapshot(wc, instance_id) == before


@pytest.mark.usefixtures("control")
@pytest.mark.parametrize(
    ("state", "call"),
    [
        ("CANCELLED", "resume_workflow"),
        ("CANCELLED", "pause_workflow"),
        ("COMPLETED", "pause_workflow"),
        ("COMPLETED", "resume_workflow"),
        ("COMPLETED", "cancel_workflow"),
        ("FAILED", "pause_workflow"),
        ("FAILED", "resume_workflow"),
        ("COMPENSATING", "pause_workflow"),
        ("COMPENSATING", "resume_workflow"),
        ("COMPENSATING", "cancel_workflow"),
    ],
)
def test_illegal_control_calls_raise_invalid_state_and_change_nothing(
    wc: WorkflowCoordinator, tc: TaskCoordinator, state: str, call: str
) -> None:
    instance_id = MAKERS[state](wc, tc)
    before = snapshot(wc, instance_id)
    assert before.instance.state.value == state
    with pytest.raises(InvalidStateError) as caught:
        getattr(wc, call)(instance_id)
    assert caught.value.state == state
    assert snapshot(wc, instance_id) == before


@pytest.mark.parametrize("call", ["pause_workflow", "resume_workflow", "cancel_workflow"])
def test_control_of_an_unknown_instance_raises_workflow_not_found(wc: WorkflowCoordinator, call: str) -> None:
    with pytest.raises(WorkflowNotFoundError):
        getattr(wc, call)(uuid.uuid4())


# -- the state machine itself --------------------------------------------------------------------


def test_workflow_transition_table_forbids_leaving_a_terminal_state() -> None:
    assert not can_transition_workflow(W.COMPLETED, W.RUNNING)
    for terminal in (W.COMPLETED, W.CANCELLED, W.COMPENSATED):
        assert terminal.is_terminal
        assert [dst for dst in W if can_transition_workflow(terminal, dst)] == []


def test_workflow_transition_table_has_only_the_documented_edges() -> None:
    assert not can_transition_workflow(W.COMPENSATING, W.RUNNING), "undoing never goes back to doing"
    assert not can_transition_workflow(W.COMPENSATING, W.CANCELLED)
    assert not can_transition_workflow(W.FAILED, W.PAUSED)
    assert all(src is not dst for src, dst in WORKFLOW_TRANSITIONS), "no self-loops: repeats are no-ops"
    reachable = {W.RUNNING}
    for _ in W:
        reachable |= {dst for src, dst in WORKFLOW_TRANSITIONS if src in reachable}
    assert reachable == set(W), "every state is reachable from RUNNING"


def test_task_transition_table_never_reopens_a_finished_attempt() -> None:
    assert not can_transition_task(TaskState.COMPLETED, TaskState.RUNNING)
    assert not can_transition_task(TaskState.FAILED, TaskState.READY)
    assert not can_transition_task(TaskState.PENDING, TaskState.RUNNING), "dependencies come first"
    finished = {s for s in TaskState if s.is_terminal}
    assert finished == {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED}
    assert {src for src, _ in TASK_TRANSITIONS}.isdisjoint(finished)


def test_ids_made_in_batches_are_distinct_time_ordered_uuidv7_texts() -> None:
    from orchestrator_engine.coordinators._ids import new_id, new_id_texts

    before = new_id()
    texts = new_id_texts(1_000)
    after = new_id()
    ids = [UUID(t) for t in texts]
    assert [i.hex for i in ids] == texts, "32 lower-case hex digits, which PostgreSQL's uuid input takes"
    assert len(set(ids)) == 1_000
    assert {(i.version, i.variant) for i in ids} == {(7, RFC_4122)}
    # the first 48 bits are the Unix time in ms: between two ids made before and after
    assert all(before.int >> 80 <= i.int >> 80 <= after.int >> 80 for i in ids)
    assert new_id_texts(0) == []
