"""WorkflowCoordinator: definitions, idempotent start, lifecycle control and history."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from ..config import EngineConfig
from ..definitions import WorkflowDefinition, check_attempt_keys
from ..errors import (
    ConcurrencyConflictError,
    DefinitionConflictError,
    InvalidStateError,
    TaskNotFoundError,
    WorkflowNotFoundError,
)
from ..models import (
    EventType,
    TaskExecution,
    WorkflowEvent,
    WorkflowInstance,
    WorkflowState,
    event_from_row,
    execution_from_row,
    instance_from_row,
)
from ..telemetry import traced
from ._engine import Engine
from ._ids import as_name, as_run_id, as_uuid, as_version, new_id_texts

W = WorkflowState
PURGEABLE = (W.COMPLETED, W.CANCELLED, W.COMPENSATED)

#: how many times a start plans again on a latest version that its statement found superseded; one
#: more is needed only when yet another version commits in between, so running out means the
#: versions keep changing (or the engine's read of the latest disagrees with the statement's)
STALE_ATTEMPTS = 10


@dataclass(frozen=True)
class StartWorkflowRequest:
    """Ask for one run of a workflow; ``run_id`` makes the start idempotent."""

    namespace: str
    workflow_name: str
    run_id: str
    input: Any = None
    version: int | None = None


class WorkflowCoordinator:
    """Register definitions, start workflows and control their lifecycle.

    Each method is one transaction. Writes accept ``conn=`` to run inside the caller's open transaction
    (as a savepoint), so a host can start a workflow atomically with its own business writes.
    """

    def __init__(
        self, pool: ConnectionPool[Any], config: EngineConfig, *, engine: Engine | None = None
    ) -> None:
        self._engine = engine or Engine(pool, config)

    @property
    def engine(self) -> Engine:
        return self._engine

    # -- definitions -----------------------------------------------------------------------------

    @traced("orchestrator.register_workflow")
    def register_workflow(
        self, definition: WorkflowDefinition, *, conn: psycopg.Connection[Any] | None = None
    ) -> WorkflowDefinition:
        """Store a validated definition; registering the identical body again is a no-op."""
        if not isinstance(definition, WorkflowDefinition):
            raise TypeError(f"register_workflow takes a WorkflowDefinition, got {type(definition).__name__}")
        check_attempt_keys(definition)
        repos = self._engine.repos
        with self._engine.transaction(conn) as c:
            repos.definitions.definition_insert_if_absent(
                c,
                namespace=definition.namespace,
                name=definition.name,
                version=definition.version,
                definition=json.dumps(definition.to_json()),
                content_hash=definition.content_hash,
            )
            row = repos.definitions.definition_get(
                c, definition.namespace, definition.name, definition.version
            )
        assert row is not None
        # this engine's next start without a version looks the latest up again (other engines' starts
        # notice the new version through the guard of workflow_start_many)
        self._engine.forget_latest(definition.namespace, definition.name)
        if row["content_hash"] != definition.content_hash:
            raise DefinitionConflictError(
                f"{definition.namespace}/{definition.name} version {definition.version} is already "
                "registered with a different body; register it under a new version"
            )
        return definition

    def get_definition(self, namespace: str, name: str, version: int | None = None) -> WorkflowDefinition:
        """Return a registered definition (the latest version when ``version`` is None)."""
        as_name(namespace, "namespace")
        as_name(name, "workflow name")
        as_version(version)
        with self._engine.reading() as c:
            return self._resolve(c, namespace, name, version)

    def _resolve(
        self, c: psycopg.Connection[Any], namespace: str, name: str, version: int | None
    ) -> WorkflowDefinition:
        if version is None:
            return self._engine.latest_definition(c, namespace, name, cached=False)
        return self._engine.definition(c, namespace, name, version)

    # -- start -----------------------------------------------------------------------------------

    @traced("orchestrator.start_workflow")
    def start_workflow(
        self, request: StartWorkflowRequest, *, conn: psycopg.Connection[Any] | None = None
    ) -> WorkflowInstance:
        """Start a run, or return the existing one for the same (namespace, workflow_name, run_id)."""
        input_text = self._check_request(request)
        return self._start(conn, [(request, input_text)])[0]

    @traced("orchestrator.start_workflows")
    def start_workflows(
        self, requests: list[StartWorkflowRequest], *, conn: psycopg.Connection[Any] | None = None
    ) -> list[WorkflowInstance]:
        """Start many runs in one transaction; each is idempotent per run_id like ``start_workflow``."""
        # a batch mostly starts runs of one workflow: check its names once
        valid: set[tuple[str, str]] = set()
        checked = [(r, self._check_request(r, valid)) for r in requests]
        if not checked:
            return []
        return self._start(conn, checked)

    def _check_request(self, request: StartWorkflowRequest, valid: set[tuple[str, str]] | None = None) -> str:
        """Check ``request`` and return its input as JSON text; ``valid``: names checked already."""
        if not isinstance(request, StartWorkflowRequest):
            raise TypeError(f"expected a StartWorkflowRequest, got {type(request).__name__}")
        names = (request.namespace, request.workflow_name)
        # only plain strings are remembered: a str subclass is checked each time
        plain = type(names[0]) is str and type(names[1]) is str
        if valid is None or not plain or names not in valid:
            as_name(request.namespace, "namespace")
            as_name(request.workflow_name, "workflow name")
            if valid is not None and plain:
                valid.add(names)
        as_run_id(request.run_id)
        as_version(request.version)
        return self._engine.encode(request.input, "workflow input")

    def _start(
        self, conn: psycopg.Connection[Any] | None, checked: list[tuple[StartWorkflowRequest, str]]
    ) -> list[WorkflowInstance]:
        """Run the start in the host's transaction, else as one autocommit statement when it can be."""
        if len(checked) == 1:
            return [self._start_one(conn, *checked[0])]
        if conn is None:
            # the start is one statement, atomic on its own (see Engine.single); it notifies idle
            # workers itself unless another write of this engine that notifies is in flight, in which
            # case the notification follows its commit (see Engine.notifying)
            announce: set[str] = set()
            try:
                with self._engine.notifying() as inline, self._engine.single() as c:
                    started = self._start_many(
                        c, checked, in_transaction=False, announce=None if inline else announce
                    )
            finally:
                # the statement has committed (or rolled back, and a spare wake-up costs one poll),
                # even when reading back an instance that existed raised afterwards
                if announce:
                    self._engine.announce_later(announce)
            if started is not None:
                return started
        with self._engine.transaction(conn) as c:
            started = self._start_many(c, checked, in_transaction=True, announce=None)
        assert started is not None
        return started

    def _start_one(
        self, conn: psycopg.Connection[Any] | None, request: StartWorkflowRequest, input_text: str
    ) -> WorkflowInstance:
        """Start one workflow with one statement, or return the instance its run_id started before.

        Outside a host's transaction the statement commits alone (see Engine.single) and notifies idle
        workers itself, unless another write of this engine that notifies is in flight: then the
        notification follows its commit (see Engine.notifying). Only such a start can lease its task
        in the start (direct dispatch): in a host's transaction the lease would tick before the host
        commits, and a start that does not notify could not tell the worker.
        """
        engine = self._engine
        notify = engine.config.notify
        if conn is not None:
            with engine.transaction(conn) as c:
                return self._start_single(
                    c, request, input_text, channel=engine.channel if notify else None, direct=False
                )[0]
        with engine.notifying() as inline, engine.single() as c:
            instance, started = self._start_single(
                c,
                request,
                input_text,
                channel=engine.channel if notify and inline else None,
                direct=notify and inline and engine.config.direct_dispatch,
            )
        if started and not inline:
            engine.announce_later([instance.namespace])
        return instance

    def _start_single(
        self,
        c: psycopg.Connection[Any],
        request: StartWorkflowRequest,
        input_text: str,
        *,
        channel: str | None,
        direct: bool,
    ) -> tuple[WorkflowInstance, bool]:
        """Start one workflow (workflow_start_one); return its instance and whether this started it.

        ``direct``: the start may lease its task to an idle worker. It sends the statement that can
        (workflow_start_direct) only while the engine expects one to wait (Engine.expect_waiting):
        with nobody waiting, that statement's claim and lease parts would cost about as much as the
        start itself. Both statements tell whether a worker waited, for the next start to choose.
        """
        engine = self._engine
        for attempt in range(STALE_ATTEMPTS):
            definition = self._definitions_of(c, [(request, input_text)], fresh=attempt > 0)[
                (request.namespace, request.workflow_name, request.version)
            ]
            if definition is None:
                return self._existing(c, request), False
            plan = engine.start_plan(definition, _start_plan)
            params = start_one_parameters(request, input_text, definition, plan, channel)
            row = engine.repos.instances.workflow_start_one(
                c, params, direct=direct and engine.expect_waiting(request.namespace)
            )
            engine.saw_waiting(request.namespace, row["waiting"])
            if not row["stale"]:
                break
            # as in _start_many: plan again on the latest version read now
        else:
            raise _superseded([request])
        if row["instance_id"] is None:
            return self._existing(c, request), False
        # a task leased in the start (direct dispatch) added its TASK_STARTED
        sequence_number = plan.sequence_number + row["granted"]
        value = json.loads(input_text)
        inserted = (row["instance_id"], row["created_at"], row["updated_at"])
        return _started_instance(request, definition.version, value, sequence_number, inserted), True

    def _start_many(
        self,
        c: psycopg.Connection[Any],
        checked: list[tuple[StartWorkflowRequest, str]],
        *,
        in_transaction: bool,
        announce: set[str] | None,
    ) -> list[WorkflowInstance] | None:
        """Start a batch with one statement; run_ids that exist (or repeat) return their instance.

        Outside a transaction, return None without writing anything if a workflow is unknown: only a
        transaction keeps the batch all-or-nothing then, since the others' start would commit before
        the unknown one's run_id is found missing. The statement notifies idle workers itself unless
        ``announce`` is given: then the namespaces that got an instance are added to it instead, for
        the caller to announce once the statement has committed.
        """
        channel = self._engine.channel if self._engine.config.notify and announce is None else None
        for attempt in range(STALE_ATTEMPTS):
            definitions = self._definitions_of(c, checked, fresh=attempt > 0)
            if not in_transaction and None in definitions.values():
                return None
            batch = _StartBatch(lambda d: self._engine.start_plan(d, _start_plan))
            for order, (request, input_text) in enumerate(checked):
                definition = definitions[(request.namespace, request.workflow_name, request.version)]
                if definition is not None:
                    batch.add(request, input_text, definition, order)
            columns, rows = self._engine.repos.instances.workflow_start_many(
                c, batch.instances, batch.plan_texts, channel=channel
            )
            if not rows[0][columns.index("stale")]:
                break
            # another engine registered a newer version since this one cached the latest: nothing was
            # written, so plan again on the latest versions read now (this repeats only while new
            # versions keep committing between that read and the statement)
        else:
            raise _superseded([request for request, _ in checked])
        started = batch.started(columns, rows)
        if announce is not None:
            announce.update(instance.namespace for instance in started.values())
        return [
            started.get((request.namespace, request.workflow_name, request.run_id))
            or self._existing(c, request)
            for request, _ in checked
        ]

    def _existing(self, c: psycopg.Connection[Any], request: StartWorkflowRequest) -> WorkflowInstance:
        """Return the instance that ``request``'s run_id started before; unknown workflows raise.

        Started before, or by a concurrent caller, whose commit ON CONFLICT waited for.
        """
        row = self._engine.repos.instances.workflow_get_by_run_id(
            c, request.namespace, request.workflow_name, request.run_id
        )
        if row is None:
            version = "latest version" if request.version is None else f"version {request.version}"
            raise WorkflowNotFoundError(f"no workflow {request.namespace}/{request.workflow_name} {version}")
        return instance_from_row(row)

    def _definitions_of(
        self, c: psycopg.Connection[Any], checked: list[tuple[StartWorkflowRequest, str]], *, fresh: bool
    ) -> dict[tuple[str, str, int | None], WorkflowDefinition | None]:
        """Map each requested (namespace, name, version) to its definition, None if it is unknown.

        The latest versions come from the engine's cache unless ``fresh``: workflow_start_many checks
        that they still are the latest.
        """
        definitions: dict[tuple[str, str, int | None], WorkflowDefinition | None] = {}
        for request, _ in checked:
            key = (request.namespace, request.workflow_name, request.version)
            if key in definitions:
                continue
            try:
                if request.version is None:
                    definitions[key] = self._engine.latest_definition(
                        c, request.namespace, request.workflow_name, cached=not fresh
                    )
                else:
                    definitions[key] = self._engine.definition(
                        c, request.namespace, request.workflow_name, request.version
                    )
            except WorkflowNotFoundError:
                definitions[key] = None  # fine if the run_id exists already; checked after the start
        return definitions

    # -- reading ---------------------------------------------------------------------------------

    @traced("orchestrator.get_workflow")
    def get_workflow(self, instance_id: UUID | str) -> WorkflowInstance:
        """Return one instance; unknown ids raise WorkflowNotFoundError."""
        iid = as_uuid(instance_id, "instance_id")
        with self._engine.reading() as c:
            row = self._engine.repos.instances.workflow_get(c, iid)
        if row is None:
            raise WorkflowNotFoundError(f"no workflow instance {iid}")
        return instance_from_row(row)

    def find_workflow(self, namespace: str, workflow_name: str, run_id: str) -> WorkflowInstance | None:
        """Return the instance started with this run_id, if any."""
        as_name(namespace, "namespace")
        as_name(workflow_name, "workflow name")
        as_run_id(run_id)
        with self._engine.reading() as c:
            row = self._engine.repos.instances.workflow_get_by_run_id(c, namespace, workflow_name, run_id)
        return None if row is None else instance_from_row(row)

    @traced("orchestrator.list_tasks")
    def list_tasks(self, instance_id: UUID | str) -> list[TaskExecution]:
        """Return every execution of the instance, every attempt, oldest first."""
        iid = as_uuid(instance_id, "instance_id")
        with self._engine.reading() as c:
            if self._engine.repos.instances.workflow_get(c, iid) is None:
                raise WorkflowNotFoundError(f"no workflow instance {iid}")
            rows = self._engine.repos.executions.task_list_for_instance(c, iid)
        return [execution_from_row(r) for r in rows]

    @traced("orchestrator.get_history")
    def get_history(self, instance_id: UUID | str) -> list[WorkflowEvent]:
        """Return the instance's events ordered by sequence_number (1..n, no gaps)."""
        iid = as_uuid(instance_id, "instance_id")
        with self._engine.reading() as c:
            if self._engine.repos.instances.workflow_get(c, iid) is None:
                raise WorkflowNotFoundError(f"no workflow instance {iid}")
            rows = self._engine.repos.events.event_list_for_instance(c, iid)
        return [event_from_row(r) for r in rows]

    # -- control ---------------------------------------------------------------------------------

    @traced("orchestrator.pause_workflow")
    def pause_workflow(
        self, instance_id: UUID | str, *, conn: psycopg.Connection[Any] | None = None
    ) -> WorkflowInstance:
        """Stop handing out the instance's tasks; leased tasks may still complete."""
        return self._control(instance_id, conn, W.PAUSED, EventType.WORKFLOW_PAUSED)

    @traced("orchestrator.resume_workflow")
    def resume_workflow(
        self, instance_id: UUID | str, *, conn: psycopg.Connection[Any] | None = None
    ) -> WorkflowInstance:
        """Hand out the instance's tasks again."""
        return self._control(instance_id, conn, W.RUNNING, EventType.WORKFLOW_RESUMED)

    @traced("orchestrator.cancel_workflow")
    def cancel_workflow(
        self, instance_id: UUID | str, *, conn: psycopg.Connection[Any] | None = None
    ) -> WorkflowInstance:
        """End the instance: open executions are cancelled and running leases revoked."""
        return self._control(instance_id, conn, W.CANCELLED, EventType.WORKFLOW_CANCELLED)

    def _control(
        self,
        instance_id: UUID | str,
        conn: psycopg.Connection[Any] | None,
        target: WorkflowState,
        event: EventType,
    ) -> WorkflowInstance:
        iid = as_uuid(instance_id, "instance_id")
        with self._engine.transaction(conn) as c:
            unit = self._engine.lock(c, iid)
            if unit.state is target:
                return instance_from_row(unit.row)  # repeating a control call is a no-op
            if target is W.RUNNING and unit.state is not W.PAUSED:
                raise InvalidStateError(
                    f"cannot resume a {unit.state.value} workflow", state=unit.state.value
                )
            payload: dict[str, Any] = {"from": unit.state.value}
            unit.move(target, event, payload)
            if target is W.CANCELLED:
                payload["cancelled_executions"] = unit.stop_open_work(None)
            if target is W.RUNNING:
                unit.scheduled = True  # wake workers: the instance's ready tasks are eligible again
            return instance_from_row(unit.flush_and_read())

    @traced("orchestrator.trigger_compensation")
    def trigger_compensation(
        self, instance_id: UUID | str, from_task_id: str, *, conn: psycopg.Connection[Any] | None = None
    ) -> WorkflowInstance:
        """Stop forward work and undo ``from_task_id``, what it depends on and what depends on it."""
        iid = as_uuid(instance_id, "instance_id")
        with self._engine.transaction(conn) as c:
            unit = self._engine.lock(c, iid)
            if not isinstance(from_task_id, str) or from_task_id not in unit.definition.by_id:
                raise TaskNotFoundError(f"workflow {iid} has no task {from_task_id!r}")
            if unit.state not in (W.RUNNING, W.PAUSED, W.FAILED) or unit.compensation_began():
                raise InvalidStateError(
                    f"cannot compensate a {unit.state.value} workflow "
                    "(use retry_task to resume a failed compensation)",
                    state=unit.state.value,
                )
            scope = (
                {from_task_id}
                | unit.definition.ancestors(from_task_id)
                | unit.definition.descendants(from_task_id)
            )
            unit.start_compensation(scope, {"trigger": "manual", "from_task": from_task_id})
            return instance_from_row(unit.flush_and_read())

    # -- retention -------------------------------------------------------------------------------

    @traced("orchestrator.purge")
    def purge(
        self,
        *,
        older_than: timedelta,
        states: Iterable[WorkflowState] = PURGEABLE,
        batch_size: int = 500,
        max_batches: int | None = None,
    ) -> int:
        """Delete finished instances (with executions, leases, events) in bounded batches; return the count.

        Each batch is its own short transaction and skips rows another transaction holds, so purging
        never blocks the engine for long. By default only terminal states are purged; FAILED may be
        named explicitly (it could still be retried, so purging it is the operator's decision).
        """
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise ValueError("older_than must be a non-negative timedelta")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
            raise ValueError("batch_size must be an int between 1 and 100000")
        chosen = [WorkflowState(s).value for s in states]
        if not chosen or any(WorkflowState(s) not in (*PURGEABLE, W.FAILED) for s in chosen):
            raise ValueError(
                f"only finished states can be purged: {[s.value for s in (*PURGEABLE, W.FAILED)]}"
            )
        total = batches = 0
        while max_batches is None or batches < max_batches:
            with self._engine.transaction() as c:
                deleted = self._engine.repos.maintenance.maintenance_purge_batch(
                    c, chosen, older_than, batch_size
                )
            total += len(deleted)
            batches += 1
            if len(deleted) < batch_size:
                break
        return total


def _superseded(requests: list[StartWorkflowRequest]) -> ConcurrencyConflictError:
    """Return the error of a start whose latest versions were superseded STALE_ATTEMPTS times running."""
    names = sorted({f"{r.namespace}/{r.workflow_name}" for r in requests if r.version is None})
    return ConcurrencyConflictError(
        f"the latest version of {', '.join(names)} changed under each of {STALE_ATTEMPTS} attempts to "
        "start; nothing was started"
    )


#: how many ids a batch start makes at a time
_ID_CHUNK = 256


class _StartBatch:
    """What workflow_start_many is sent: each instance once, and each definition's plan once.

    The statement builds the task rows and the first events from the plan (see its comment), so a
    start sends its input once and no per-task or per-event documents.
    """

    def __init__(self, plan_of: Callable[[WorkflowDefinition], StartPlan] | None = None) -> None:
        #: each instance as a JSON object's text (see add)
        self.instances: list[str] = []
        self.plan_texts: list[str] = []
        self._ids: list[str] = []  # made in chunks: one clock and one random read for many starts
        self._plan_of = plan_of or _start_plan  # the coordinator's goes through the engine's cache
        self._plans: dict[tuple[str, str, int], tuple[int, int]] = {}  # -> (index, sequence number)
        #: by the instance id's integer, which the loaded UUID has at hand (its text it must format)
        self._meta: dict[int, tuple[StartWorkflowRequest, str, int, int]] = {}

    def add(
        self, request: StartWorkflowRequest, input_text: str, definition: WorkflowDefinition, order: int
    ) -> None:
        """Plan one start: a new instance id and one execution id per task of ``definition``."""
        key = (definition.namespace, definition.name, definition.version)
        plan = self._plans.get(key)
        if plan is None:
            made = self._plan_of(definition)
            plan = self._plans[key] = (len(self.plan_texts), made.sequence_number)
            self.plan_texts.append(made.text)
        needed = 1 + len(definition.tasks)
        if len(self._ids) < needed:
            self._ids = new_id_texts(max(needed, _ID_CHUNK))
        instance_id, execution_ids = self._ids[-1], self._ids[-needed:-1]
        del self._ids[-needed:]
        self._meta[int(instance_id, 16)] = (request, input_text, definition.version, plan[1])
        ids = ",".join(f'"{e}"' for e in execution_ids)
        # written out here, not by json.dumps of a dict: the input goes in as the text its encoding
        # checked (encoding it again inside the dict cost a tenth of a bulk start's client CPU), and
        # namespaces and workflow names are plain names (check_name), safe inside quotes as they are.
        # str.__str__: the characters the name check saw, even from a str subclass with a __format__
        namespace, name = str.__str__(request.namespace), str.__str__(request.workflow_name)
        self.instances.append(
            f'{{"instance_id":"{instance_id}","namespace":"{namespace}",'
            f'"workflow_name":"{name}","workflow_version":{definition.version},'
            f'"run_id":{json.dumps(request.run_id)},"input":{input_text},"ord":{order},'
            f'"latest":{"true" if request.version is None else "false"},"plan":{plan[0]},'
            f'"execution_ids":[{ids}]}}'
        )

    def started(
        self, columns: list[str], rows: list[tuple[Any, ...]]
    ) -> dict[tuple[str, str, str], WorkflowInstance]:
        """Map (namespace, workflow name, run_id) to each instance the statement inserted (its rows)."""
        at, created, updated = (columns.index(c) for c in ("instance_id", "created_at", "updated_at"))
        # the row of NULLs (nothing was started) has no id
        found = [(self._meta[_id_int(row[at])], row) for row in rows if row[at] is not None]
        # the inputs decoded by one call: a call per input cost more than decoding them
        inputs = json.loads("[" + ",".join(meta[1] for meta, _ in found) + "]")
        out = {}
        for ((request, _, version, sequence_number), row), value in zip(found, inputs, strict=True):
            out[(request.namespace, request.workflow_name, request.run_id)] = _started_instance(
                request, version, value, sequence_number, (row[at], row[created], row[updated])
            )
        return out


def _id_int(value: Any) -> int:
    """Return a loaded uuid's integer: a UUID unless the host's connection loads uuids otherwise."""
    return value.int if isinstance(value, UUID) else UUID(str(value)).int


def _started_instance(
    request: StartWorkflowRequest,
    version: int,
    value: Any,
    sequence_number: int,
    inserted: tuple[UUID, datetime, datetime],
) -> WorkflowInstance:
    """Return the instance a start statement inserted: its row holds only the id and timestamps
    (``inserted``: instance_id, created_at, updated_at).

    ``value`` is the input decoded from the text the start sent, so the instance holds the JSON the
    database has, not the caller's objects; it is decoded only for runs the statement started.
    """
    instance_id, created_at, updated_at = inserted
    return WorkflowInstance(
        instance_id=instance_id,
        namespace=request.namespace,
        workflow_name=request.workflow_name,
        workflow_version=version,
        run_id=request.run_id,
        state=W.RUNNING,
        input=value,
        output=None,
        sequence_number=sequence_number,
        created_at=created_at,
        updated_at=updated_at,
    )


def start_one_parameters(
    request: StartWorkflowRequest,
    input_text: str,
    definition: WorkflowDefinition,
    plan: StartPlan,
    channel: str | None,
) -> dict[str, Any]:
    """Return what workflow_start_one (and workflow_start_direct) is sent to start ``request``."""
    instance_id, *execution_ids = new_id_texts(1 + len(definition.tasks))
    return {
        "instance_id": instance_id,
        "namespace": request.namespace,
        "workflow_name": request.workflow_name,
        "workflow_version": definition.version,
        "run_id": request.run_id,
        "input": input_text,
        "latest": request.version is None,
        "sequence_number": plan.sequence_number,
        "pending_tasks": plan.pending_tasks,
        "tasks": plan.tasks,
        # an array literal: psycopg inspects a list's items to choose how to send it
        "execution_ids": "{" + ",".join(execution_ids) + "}",
        "channel": channel,
    }


class StartPlan(NamedTuple):
    """What the start statements are sent of a definition, made once per definition (Engine.start_plan)."""

    #: the whole plan as JSON, for workflow_start_many: sequence_number, pending_tasks and tasks
    text: str
    #: the plan's "tasks" array as JSON, for workflow_start_one
    tasks: str
    #: the sequence number of the last start event
    sequence_number: int
    #: how many tasks the instance has to finish
    pending_tasks: int


def _start_plan(definition: WorkflowDefinition) -> StartPlan:
    """Return a definition's start plan.

    Event 1 is WORKFLOW_STARTED; each root task (no dependencies) gets the next number for its
    TASK_SCHEDULED event, in definition order.
    """
    tasks = []
    sequence_number = 1
    for n, t in enumerate(definition.tasks, start=1):
        root = not t.depends_on
        sequence_number += root
        tasks.append(
            {
                "n": n,
                "task_id": t.task_id,
                "task_type": t.type,
                "max_attempts": t.retry.max_attempts,
                "depends_on": list(t.depends_on),
                "timeout_ms": None if t.timeout is None else round(t.timeout.total_seconds() * 1000),
                "seq": sequence_number if root else None,
            }
        )
    plan = {"sequence_number": sequence_number, "pending_tasks": len(definition.tasks), "tasks": tasks}
    return StartPlan(json.dumps(plan), json.dumps(tasks), sequence_number, len(definition.tasks))
