"""Model-based test: hypothesis drives the real engine and a small in-memory model in lockstep.

The model holds what the engine's rules say must be true — each workflow's state, each execution's
state, lease holder and fence token, which worker was handed which token — and after every step the
engine must agree with it exactly (``get_workflow``, ``list_tasks``). Rules start workflows, poll and
acquire as several workers, complete and fail with the token a worker was given (current or stale),
present tokens no grant ever issued, pause, resume, cancel, compensate, retry, renew and force leases to
lapse. Each run gets a fresh database, and ends with the invariant checker.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast
from uuid import UUID

import psycopg
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import conninfo, sql

from orchestrator_engine import (
    EngineConfig,
    FencingError,
    InvalidStateError,
    RetryPolicy,
    StartWorkflowRequest,
    TaskCoordinator,
    TaskDefinition,
    TaskExecution,
    TaskNotFoundError,
    WorkflowCoordinator,
    WorkflowDefinition,
    WorkflowInstance,
    WorkflowState,
    create_pool,
)
from reliability.conftest import FaultLog, scale

NS = "model"
SCHEMA = "orchestrator"
W = WorkflowState
FORWARD, COMPENSATION = "FORWARD", "COMPENSATION"
PENDING, READY, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "PENDING",
    "READY",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
)
OPEN = (PENDING, READY, RUNNING)
#: every grant fits in this lease, so a lease lapses only when the lapse rule says so
LEASE = timedelta(hours=1)
#: poll_tasks reclaims at most this many lapsed leases before leasing (RECLAIM_PER_CALL), on every
#: poll when reclaim_interval is zero
RECLAIM_PER_POLL = 8
MAX_INSTANCES = 4

TWICE = RetryPolicy(max_attempts=2, initial_interval=timedelta(0), jitter=0)
ONCE = RetryPolicy(max_attempts=1, initial_interval=timedelta(0), jitter=0)
DEFINITIONS = {
    "pair": WorkflowDefinition(
        NS, "pair", (TaskDefinition("a", retry=TWICE), TaskDefinition("b", depends_on=["a"], retry=TWICE))
    ),
    # compensations run in reverse order: release waits for refund
    "saga": WorkflowDefinition(
        NS,
        "saga",
        (
            TaskDefinition("reserve", compensation="release", retry=TWICE),
            TaskDefinition("charge", depends_on=["reserve"], compensation="refund", retry=ONCE),
            TaskDefinition("ship", depends_on=["charge"], retry=ONCE),
            TaskDefinition("audit", retry=TWICE),
        ),
    ),
}
TASK_IDS = sorted({t.task_id for d in DEFINITIONS.values() for t in d.tasks} | {"ghost"})
WORKERS = tuple(UUID(int=n) for n in (1, 2, 3))


# -- the model ------------------------------------------------------------------------------------------


@dataclass
class MExec:
    """What the model knows of one execution."""

    kind: str
    task_id: str
    attempt: int
    state: str
    max_attempts: int
    depends_on: tuple[str, ...]
    deps_remaining: int
    created: int
    ready_step: int | None
    lapse_count: int = 0
    holder: UUID | None = None
    token: int = 0
    #: set when the test forced the lease into the past; the order in which lapsed leases are reclaimed
    lapsed_at: int | None = None
    execution_id: UUID | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.kind, self.task_id, self.attempt)


@dataclass
class MInstance:
    instance_id: UUID
    definition: WorkflowDefinition
    run_id: str
    state: W = W.RUNNING
    pending_tasks: int = 0
    pending_compensations: int = 0
    execs: list[MExec] = field(default_factory=list)

    def find(self, key: tuple[str, str, int]) -> MExec:
        (found,) = [e for e in self.execs if e.key == key]
        return found


@dataclass(frozen=True)
class Claim:
    """A grant a worker received: it may be current or long stale."""

    instance_id: UUID
    key: tuple[str, str, int]
    token: int


class Model:
    """The engine's rules, written as plainly as possible, on in-memory records."""

    def __init__(self) -> None:
        self.instances: dict[UUID, MInstance] = {}
        self.step = 0
        #: each workflow's state when the current step began, for unpark_resumed
        self._states: dict[UUID, W] = {}
        self._created = 0
        self._lapses = 0

    def new_exec(
        self,
        inst: MInstance,
        kind: str,
        task_id: str,
        attempt: int,
        *,
        depends_on: tuple[str, ...] = (),
        deps_remaining: int = 0,
        max_attempts: int,
        lapse_count: int = 0,
    ) -> MExec:
        self._created += 1
        state = PENDING if deps_remaining else READY
        e = MExec(
            kind,
            task_id,
            attempt,
            state,
            max_attempts,
            depends_on,
            deps_remaining,
            self._created,
            self.step if state == READY else None,
            lapse_count,
        )
        inst.execs.append(e)
        return e

    def start(self, instance_id: UUID, definition: WorkflowDefinition, run_id: str) -> MInstance:
        inst = MInstance(instance_id, definition, run_id, pending_tasks=len(definition.tasks))
        for t in definition.tasks:
            self.new_exec(
                inst,
                FORWARD,
                t.task_id,
                1,
                depends_on=t.depends_on,
                deps_remaining=len(t.depends_on),
                max_attempts=t.retry.max_attempts,
            )
        self.instances[instance_id] = inst
        return inst

    def unpark_resumed(self) -> None:
        """Apply the parking rule to the step that just ended; call it before each new step.

        READY executions of a PAUSED or FAILED workflow are parked; the statement that makes the
        workflow RUNNING or COMPENSATING again sets their ready_at to its now(), so they queue behind
        everything made ready in earlier steps (docs/concepts/leases-and-fencing.md).
        """
        for iid, inst in self.instances.items():
            before = self._states.get(iid, inst.state)
            if before in (W.PAUSED, W.FAILED) and inst.state in (W.RUNNING, W.COMPENSATING):
                for e in inst.execs:
                    if e.state == READY:
                        e.ready_step = self.step
            self._states[iid] = inst.state

    def ready(self) -> list[tuple[MInstance, MExec]]:
        """Executions poll_tasks may lease: READY, in a RUNNING or COMPENSATING workflow."""
        return [
            (inst, e)
            for inst in self.instances.values()
            if inst.state in (W.RUNNING, W.COMPENSATING)
            for e in inst.execs
            if e.state == READY
        ]

    def grant(self, e: MExec, worker: UUID) -> None:
        e.state, e.holder, e.token, e.lapsed_at = RUNNING, worker, e.token + 1, None

    def complete(self, inst: MInstance, e: MExec) -> None:
        e.state, e.lapsed_at = COMPLETED, None
        for d in inst.execs:
            if d.kind == e.kind and d.state == PENDING and e.task_id in d.depends_on:
                d.deps_remaining -= 1
                if d.deps_remaining == 0:
                    d.state, d.ready_step = READY, self.step
        if e.kind == FORWARD:
            inst.pending_tasks -= 1
            if inst.pending_tasks == 0 and inst.state in (W.RUNNING, W.PAUSED):
                inst.state = W.COMPLETED
        else:
            inst.pending_compensations -= 1
            if inst.pending_compensations == 0 and inst.state is W.COMPENSATING:
                inst.state = W.COMPENSATED

    def fail(self, inst: MInstance, e: MExec, *, lapsed: bool = False) -> None:
        e.state, e.lapsed_at = FAILED, None
        if lapsed:
            e.lapse_count += 1
        tries = e.attempt + e.lapse_count
        if tries < e.max_attempts and inst.state not in (W.CANCELLED, W.COMPENSATED, W.COMPLETED):
            self.new_exec(
                inst,
                e.kind,
                e.task_id,
                e.attempt + 1,
                depends_on=e.depends_on,
                max_attempts=e.max_attempts,
                lapse_count=e.lapse_count,
            )
            return
        self.terminal_failure(inst, e)

    def terminal_failure(self, inst: MInstance, e: MExec) -> None:
        if e.kind == COMPENSATION:
            if inst.state is W.COMPENSATING:
                inst.state = W.FAILED
            return
        if inst.state not in (W.RUNNING, W.PAUSED):
            return
        done = {x.task_id for x in inst.execs if x.kind == FORWARD and x.state == COMPLETED}
        if any(inst.definition.by_id[t].compensation for t in done):
            self.start_compensation(inst, done)
        else:
            inst.state = W.FAILED

    def start_compensation(self, inst: MInstance, candidates: set[str]) -> None:
        self.stop_open_work(inst, FORWARD)
        inst.state = W.COMPENSATING
        done = {x.task_id for x in inst.execs if x.kind == FORWARD and x.state == COMPLETED}
        undo = {t for t in done & candidates if inst.definition.by_id[t].compensation}
        for task_id in sorted(undo):
            waits_for = tuple(sorted(inst.definition.descendants(task_id) & undo))
            self.new_exec(
                inst,
                COMPENSATION,
                task_id,
                1,
                depends_on=waits_for,
                deps_remaining=len(waits_for),
                max_attempts=inst.definition.by_id[task_id].retry.max_attempts,
            )
        inst.pending_compensations = len(undo)
        if not undo:
            inst.state = W.COMPENSATED

    def stop_open_work(self, inst: MInstance, kind: str | None) -> None:
        for x in inst.execs:
            if x.state in OPEN and (kind is None or x.kind == kind):
                x.state, x.lapsed_at = CANCELLED, None

    def lapse(self, e: MExec) -> None:
        self._lapses += 1
        e.lapsed_at = self._lapses

    def handle_lapsed(self, inst: MInstance, e: MExec) -> None:
        """The engine's task_lapsed: hand the execution back, or fail it when no grant is left."""
        if e.attempt + e.lapse_count + 1 > e.max_attempts:
            self.fail(inst, e, lapsed=True)
        else:
            e.state, e.holder, e.lapsed_at = READY, None, None
            e.lapse_count += 1

    def reclaim(self, limit: int) -> int:
        lapsed = sorted(
            (
                (e.lapsed_at, inst.instance_id, e)
                for inst in self.instances.values()
                for e in inst.execs
                if e.state == RUNNING and e.lapsed_at is not None
            ),
            key=lambda t: t[0],
        )[:limit]
        by_instance: dict[UUID, list[MExec]] = {}
        for _, iid, e in lapsed:
            by_instance.setdefault(iid, []).append(e)
        for iid, execs in by_instance.items():
            for e in execs:
                if e.state == RUNNING:  # an earlier one may have stopped the workflow's open work
                    self.handle_lapsed(self.instances[iid], e)
        return len(lapsed)

    def latest(self, inst: MInstance, task_id: str) -> MExec | None:
        found = [e for e in inst.execs if e.task_id == task_id]
        return max(found, key=lambda e: (e.created, e.attempt)) if found else None


# -- the machine ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """What every run needs from the pytest fixtures."""

    server_dsn: str
    template: str
    fault_log: FaultLog


class EngineMachine(RuleBasedStateMachine):
    """Drive one fresh database; after each step the engine must agree with the model."""

    def __init__(self, env: Env) -> None:
        super().__init__()
        self.env = env
        self.dbname = f"orch_model_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(env.server_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(self.dbname), sql.Identifier(env.template)
                )
            )
        self.dsn = conninfo.make_conninfo(env.server_dsn, dbname=self.dbname)
        self.config = EngineConfig(
            dsn=self.dsn,
            lease_duration=LEASE,
            renewal_interval=timedelta(minutes=1),
            # every poll reclaims, so the model knows which lapsed leases a poll takes back
            reclaim_interval=timedelta(0),
            notify=False,
        )
        self.pool = create_pool(self.config, min_size=1, max_size=2)
        self.wc = WorkflowCoordinator(self.pool, self.config)
        self.tc = TaskCoordinator(self.pool, self.config)
        for definition in DEFINITIONS.values():
            self.wc.register_workflow(definition)
        self.model = Model()
        self.claims: dict[UUID, list[Claim]] = {w: [] for w in WORKERS}
        self.runs = 0

    def teardown(self) -> None:
        try:
            report = self.env.fault_log.check(self.dsn, require_finished=False)
            self.env.fault_log.record_workflows(len(self.model.instances))
            assert report.ok, report.violations
        finally:
            self.pool.close()
            with psycopg.connect(self.env.server_dsn, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.dbname))
                )

    # -- helpers -------------------------------------------------------------------------------------

    def _tick(self) -> None:
        self.model.unpark_resumed()
        self.model.step += 1

    def _instance(self, pick: int) -> MInstance:
        # start order, not id order: ids are random, and a replayed example must pick the same instance
        ids = list(self.model.instances)
        return self.model.instances[ids[pick % len(ids)]]

    def _known_execs(self) -> list[tuple[MInstance, MExec]]:
        return [
            (inst, e)
            for inst in self.model.instances.values()
            for e in inst.execs
            if e.execution_id is not None
        ]

    def _has_claims(self) -> bool:
        return any(self.claims.values())

    def _holds(self, worker: UUID, claim: Claim) -> bool:
        e = self.model.instances[claim.instance_id].find(claim.key)
        return e.state == RUNNING and e.holder == worker and e.token == claim.token

    def _claim(
        self, worker_pick: int, pick: int, *, current: bool = False
    ) -> tuple[UUID, Claim, MInstance, MExec]:
        """Pick a claim; with ``current``, prefer one whose lease the worker still holds."""
        holders = [w for w in WORKERS if self.claims[w]]
        worker = holders[worker_pick % len(holders)]
        claims = self.claims[worker]
        live = [c for c in claims if self._holds(worker, c)] if current else []
        pool = live or claims
        claim = pool[pick % len(pool)]
        inst = self.model.instances[claim.instance_id]
        e = inst.find(claim.key)
        assert e.execution_id is not None
        return worker, claim, inst, e

    def _record_grant(self, inst: MInstance, e: MExec, worker: UUID, got: TaskExecution) -> None:
        if e.execution_id is None:  # created earlier in this same step (a reclaim that compensates)
            e.execution_id = got.execution_id
        assert got.execution_id == e.execution_id
        self.model.grant(e, worker)
        assert got.fence_token == e.token, f"{e.key}: token {got.fence_token}, model {e.token}"
        assert got.lease_holder == worker
        self.claims[worker].append(Claim(inst.instance_id, e.key, e.token))

    def _snapshot(self, inst: MInstance) -> tuple[Any, ...]:
        return (
            self.wc.get_workflow(inst.instance_id),
            self.wc.list_tasks(inst.instance_id),
            len(self.wc.get_history(inst.instance_id)),
        )

    def _expect_refusal(self, inst: MInstance, error: type[Exception], call: Callable[[], object]) -> None:
        """Run a call the model says must be refused; it must raise ``error`` and change nothing."""
        before = self._snapshot(inst)
        with pytest.raises(error):
            call()
        assert self._snapshot(inst) == before

    # -- starting -------------------------------------------------------------------------------------

    @initialize(names=st.lists(st.sampled_from(sorted(DEFINITIONS)), min_size=1, max_size=2))
    def start_some_workflows(self, names: list[str]) -> None:
        for name in names:
            self.start_workflow(name)

    @precondition(lambda self: len(self.model.instances) < MAX_INSTANCES)
    @rule(name=st.sampled_from(sorted(DEFINITIONS)))
    def start_workflow(self, name: str) -> None:
        self._tick()
        self.runs += 1
        run_id = f"run-{self.runs}"
        started = self.wc.start_workflow(StartWorkflowRequest(NS, name, run_id, {"n": self.runs}))
        assert started.state is W.RUNNING
        self.model.start(started.instance_id, DEFINITIONS[name], run_id)

    def _start_again_with_the_same_run_id(self, inst: MInstance) -> None:
        before = self._snapshot(inst)
        again = self.wc.start_workflow(StartWorkflowRequest(NS, inst.definition.name, inst.run_id, "other"))
        assert again.instance_id == inst.instance_id
        assert self._snapshot(inst) == before

    # -- leasing -------------------------------------------------------------------------------------

    @rule(
        worker=st.sampled_from(WORKERS),
        # what to do with each grant: mostly complete, so workflows get far enough to finish or
        # compensate; "hold" keeps the lease for later (and staler) reports
        plan=st.lists(st.sampled_from(["complete", "complete", "fail", "hold"]), min_size=1, max_size=4),
        drain=st.booleans(),
    )
    def work(self, worker: UUID, plan: list[str], drain: bool) -> None:
        """Poll like a worker (one grant per planned step, or every ready execution) and act on each grant."""
        self._tick()
        before = len(self.claims[worker])
        self._poll(worker, 100 if drain else len(plan))
        for claim, step in zip(self.claims[worker][before:], plan, strict=False):
            if step != "hold":
                inst = self.model.instances[claim.instance_id]
                self._report(worker, claim, inst, inst.find(claim.key), step == "complete")

    def _poll(self, worker: UUID, limit: int) -> None:
        self.model.reclaim(RECLAIM_PER_POLL)
        # oldest first: executions made ready in an earlier step have an earlier ready_at
        ready = sorted(self.model.ready(), key=lambda ie: (ie[1].ready_step or 0, ie[1].created))
        candidates = {(inst.instance_id, e.key): (inst, e) for inst, e in ready}
        # Executions made ready in the same step may share a ready_at (one transaction, one now()), and
        # poll_tasks leaves the order of equal ready_at unspecified. A limit that cut through such a
        # group would let the engine pick which ones run, and the rest of the example (and the rules
        # hypothesis can draw) would depend on it, so the limit is moved to the end of the group.
        while 0 < limit < len(ready) and ready[limit][1].ready_step == ready[limit - 1][1].ready_step:
            limit += 1
        got = self.tc.poll_tasks(worker, namespace=NS, limit=limit)
        assert len(got) == min(limit, len(candidates)), (len(got), limit, sorted(candidates))
        chosen = [(x.workflow_instance_id, (x.kind.value, x.task_id, x.attempt_number)) for x in got]
        assert len(set(chosen)) == len(chosen)
        assert set(chosen) <= candidates.keys(), (chosen, sorted(candidates))
        # the limit ends between steps, so exactly the oldest ``limit`` candidates must be leased
        expected = [(inst.instance_id, e.key) for inst, e in ready[:limit]]
        assert set(chosen) == set(expected), ("poll skipped an older ready execution", chosen, expected)
        taken = [candidates[k][1].ready_step or 0 for k in chosen]
        assert taken == sorted(taken), "poll returned its grants out of ready order"
        # the engine's order within a group is unspecified: record grants in the model's order, so
        # the claims (which later rules pick by position) are the same on every run
        by_key = dict(zip(chosen, got, strict=True))
        for k in expected:
            inst, e = candidates[k]
            self._record_grant(inst, e, worker, by_key[k])

    @precondition(lambda self: bool(self._known_execs()))
    @rule(worker=st.sampled_from(WORKERS), pick=st.integers(0, 1_000))
    def acquire(self, worker: UUID, pick: int) -> None:
        self._tick()
        known = self._known_execs()
        inst, e = known[pick % len(known)]
        assert e.execution_id is not None
        grantable = inst.state in (W.RUNNING, W.COMPENSATING)
        if grantable and e.state == RUNNING and e.lapsed_at is not None:
            self.model.handle_lapsed(inst, e)
        got = self.tc.acquire_task(e.execution_id, worker)
        event(f"acquire: {'granted' if got else 'nothing'}")
        if grantable and e.state == READY:
            assert got is not None, f"{e.key} was acquirable"
            self._record_grant(inst, e, worker, got)
        else:
            assert got is None, f"{e.key} ({e.state}, workflow {inst.state.value}) was granted"

    def _can_lapse(self) -> bool:
        running = [e for _, e in self._known_execs() if e.state == RUNNING]
        lapsed = sum(e.lapsed_at is not None for e in running)
        # at most one poll's worth lapsed at once, so the model knows which ones a poll reclaims
        return lapsed < len(running) and lapsed < RECLAIM_PER_POLL

    @precondition(lambda self: self._can_lapse())
    @rule(pick=st.integers(0, 1_000))
    def lease_lapses(self, pick: int) -> None:
        """Move one live lease into the past, as if its worker had stalled for longer than the lease."""
        self._tick()
        running = [(i, e) for i, e in self._known_execs() if e.state == RUNNING and e.lapsed_at is None]
        _, e = running[pick % len(running)]
        self.model.lapse(e)
        # distinct instants in the past, in lapse order: reclaim order is lease_expires_at order
        expired = sql.SQL("timestamptz '2000-01-01 00:00:00+00' + make_interval(secs => %s)")
        with self.pool.connection() as conn:
            for table, key in (("task_executions", "execution_id"), ("execution_leases", "lease_key")):
                conn.execute(
                    sql.SQL("UPDATE {}.{} SET {} = {} WHERE {} = %s").format(
                        sql.Identifier(SCHEMA),
                        sql.Identifier(table),
                        sql.Identifier("lease_expires_at" if table == "task_executions" else "expires_at"),
                        expired,
                        sql.Identifier(key),
                    ),
                    (e.lapsed_at, e.execution_id),
                )

    @precondition(lambda self: any(e.state == RUNNING and e.lapsed_at for _, e in self._known_execs()))
    @rule()
    def reclaim_expired_leases(self) -> None:
        self._tick()
        expected = self.model.reclaim(100)
        event(f"reclaim: {min(expected, 2)}{'+' if expected > 2 else ''} leases")
        assert self.tc.reclaim_expired_leases(limit=100) == expected

    def _renew(self, worker: UUID, e: MExec) -> None:
        # a lapsed lease is not renewable, even before it is reclaimed: its worker must drop the result
        held = e.state == RUNNING and e.holder == worker and e.lapsed_at is None
        assert e.execution_id is not None
        event(f"renew: {'renewed' if held else 'refused'}")
        assert self.tc.renew_lease(e.execution_id, worker) is held

    # -- results -------------------------------------------------------------------------------------

    @precondition(lambda self: self._has_claims())
    @rule(
        worker_pick=st.integers(0, 10),
        pick=st.integers(0, 1_000),
        action=st.sampled_from(["complete", "fail", "renew"]),
        current=st.booleans(),
    )
    def use_a_claimed_token(self, worker_pick: int, pick: int, action: str, current: bool) -> None:
        """Complete, fail or renew with a grant the worker really got: current, repeated or stale."""
        self._tick()
        worker, claim, inst, e = self._claim(worker_pick, pick, current=current)
        if action == "renew":
            self._renew(worker, e)
        else:
            self._report(worker, claim, inst, e, action == "complete")

    def _report(self, worker: UUID, claim: Claim, inst: MInstance, e: MExec, ok: bool) -> None:
        assert e.execution_id is not None
        eid = e.execution_id
        outcome = COMPLETED if ok else FAILED
        holds = e.holder == worker and e.token == claim.token
        if ok:
            report: Callable[[], TaskExecution] = lambda: self.tc.complete_task(  # noqa: E731
                eid, worker, claim.token, {"by": worker.int}
            )
        else:
            report = lambda: self.tc.fail_task(eid, worker, claim.token, {"message": "no"})  # noqa: E731
        if e.state == RUNNING and holds:
            event(f"report: accepted {outcome.lower()}")
            result = report()
            assert result.state.value == outcome
            (self.model.complete if ok else self.model.fail)(inst, e)
        elif e.state == outcome and holds:
            event("report: repeated, a no-op")
            before = self._snapshot(inst)
            assert report().state.value == outcome  # a repeated report is a no-op
            assert self._snapshot(inst) == before
        else:
            event(f"report: fenced ({e.state.lower()} execution)")
            self._expect_refusal(inst, FencingError, report)

    @precondition(lambda self: self._has_claims())
    @rule(
        worker_pick=st.integers(0, 10),
        pick=st.integers(0, 1_000),
        how=st.sampled_from(["ahead", "zero", "negative", "other-worker"]),
        ok=st.booleans(),
    )
    def report_with_a_token_never_granted(self, worker_pick: int, pick: int, how: str, ok: bool) -> None:
        self._tick()
        worker, _, inst, e = self._claim(worker_pick, pick)
        assert e.execution_id is not None
        eid = e.execution_id
        token = {"ahead": e.token + 1, "zero": 0, "negative": -1, "other-worker": e.token}[how]
        who = uuid.uuid4() if how == "other-worker" else worker
        method = self.tc.complete_task if ok else self.tc.fail_task
        self._expect_refusal(inst, FencingError, lambda: method(eid, who, token, None))

    # -- operator actions ----------------------------------------------------------------------------

    @precondition(lambda self: bool(self.model.instances))
    @rule(
        pick=st.integers(0, 1_000),
        # one rule for every operator action keeps them from crowding out the work; cancel is rarest
        action=st.sampled_from(["retry", "resume", "pause", "compensate", "retry", "start-again", "cancel"]),
        task_id=st.sampled_from(TASK_IDS),
    )
    def operate(self, pick: int, action: str, task_id: str) -> None:
        self._tick()
        inst = self._instance(pick)
        if action == "retry":
            self._retry_task(inst, task_id)
        elif action == "compensate":
            self._trigger_compensation(inst, task_id)
        elif action == "start-again":
            self._start_again_with_the_same_run_id(inst)
        else:
            self._control(inst, action)

    def _control(self, inst: MInstance, action: str) -> None:
        target = {"pause": W.PAUSED, "resume": W.RUNNING, "cancel": W.CANCELLED}[action]
        legal_from = {"pause": (W.RUNNING,), "resume": (W.PAUSED,), "cancel": (W.RUNNING, W.PAUSED, W.FAILED)}
        call = getattr(self.wc, f"{action}_workflow")
        event(f"{action}: from {inst.state.value}")
        if inst.state is target:
            assert call(inst.instance_id).state is target  # repeating a control call is a no-op
        elif inst.state in legal_from[action]:
            assert call(inst.instance_id).state is target
            inst.state = target
            if target is W.CANCELLED:
                self.model.stop_open_work(inst, None)
        else:
            self._expect_refusal(inst, InvalidStateError, lambda: call(inst.instance_id))

    def _trigger_compensation(self, inst: MInstance, task_id: str) -> None:
        call: Callable[[], WorkflowInstance] = lambda: self.wc.trigger_compensation(  # noqa: E731
            inst.instance_id, task_id
        )
        if task_id not in inst.definition.by_id:
            self._expect_refusal(inst, TaskNotFoundError, call)
        elif (
            inst.state not in (W.RUNNING, W.PAUSED, W.FAILED)
            or inst.pending_compensations
            or any(e.kind == COMPENSATION for e in inst.execs)
        ):
            self._expect_refusal(inst, InvalidStateError, call)
        else:
            event("trigger_compensation: started")
            d = inst.definition
            self.model.start_compensation(inst, {task_id} | d.ancestors(task_id) | d.descendants(task_id))
            assert call().state is inst.state

    def _retry_task(self, inst: MInstance, task_id: str) -> None:
        call: Callable[[], TaskExecution] = lambda: self.tc.retry_task(inst.instance_id, task_id)  # noqa: E731
        if task_id not in inst.definition.by_id:
            self._expect_refusal(inst, TaskNotFoundError, call)
            return
        latest = self.model.latest(inst, task_id)
        assert latest is not None
        compensated = inst.state is W.COMPENSATING or any(e.kind == COMPENSATION for e in inst.execs)
        if (
            latest.state != FAILED
            or inst.state not in (W.FAILED, W.RUNNING, W.PAUSED, W.COMPENSATING)
            # once undo steps exist, redoing forward work would report success for undone tasks
            or (latest.kind == FORWARD and compensated)
        ):
            self._expect_refusal(inst, InvalidStateError, call)
            return
        new = self.model.new_exec(
            inst,
            latest.kind,
            task_id,
            latest.attempt + 1,
            depends_on=latest.depends_on,
            # a manual retry is always allowed one more try
            max_attempts=max(latest.max_attempts, latest.attempt + 1 + latest.lapse_count),
            lapse_count=latest.lapse_count,
        )
        event(f"retry_task: {latest.kind.lower()} in a {inst.state.value} workflow")
        if inst.state is W.FAILED:
            inst.state = W.COMPENSATING if latest.kind == COMPENSATION else W.RUNNING
        got = call()
        assert (got.kind.value, got.task_id, got.attempt_number) == new.key

    # -- what must hold after every step -------------------------------------------------------------

    @invariant()
    def engine_agrees_with_the_model(self) -> None:
        for iid, inst in self.model.instances.items():
            assert self.wc.get_workflow(iid).state is inst.state, f"{inst.definition.name} {iid}"
            engine = {(e.kind.value, e.task_id, e.attempt_number): e for e in self.wc.list_tasks(iid)}
            assert sorted(engine) == sorted(e.key for e in inst.execs), f"executions of {iid}"
            for e in inst.execs:
                actual = engine[e.key]
                if e.execution_id is None:
                    e.execution_id = actual.execution_id
                assert actual.execution_id == e.execution_id
                assert (actual.state.value, actual.lease_holder, actual.fence_token) == (
                    e.state,
                    e.holder,
                    e.token,
                ), f"{iid} {e.key}"

    @invariant()
    def running_workflows_can_still_finish(self) -> None:
        """A RUNNING or PAUSED workflow has no forward task whose latest execution was cancelled."""
        for iid, inst in self.model.instances.items():
            if inst.state not in (W.RUNNING, W.PAUSED):
                continue
            for t in inst.definition.tasks:
                latest = max(
                    (e for e in inst.execs if e.kind == FORWARD and e.task_id == t.task_id),
                    key=lambda e: e.attempt,
                )
                assert latest.state != CANCELLED, (
                    f"{inst.state.value} workflow {iid} can never finish: {t.task_id} was cancelled"
                )


@pytest.fixture
def env(pg_server_dsn: str, template_database: str, fault_log: FaultLog) -> Env:
    return Env(pg_server_dsn, template_database, fault_log)


def test_engine_agrees_with_the_model_under_random_operation_sequences(env: Env) -> None:
    # hypothesis calls the factory once per example; it is typed as a class, but any callable will do
    factory = cast("type[RuleBasedStateMachine]", lambda: EngineMachine(env))
    run_state_machine_as_test(
        factory,
        settings=settings(max_examples=scale(15, 200), stateful_step_count=scale(20, 50), deadline=None),
    )


def test_retrying_the_failed_task_after_a_failed_compensation_leaves_no_cancelled_work(env: Env) -> None:
    """The path behind the model's liveness invariant, spelled out so it fails the same way every run.

    A saga whose compensation failed is FAILED; retrying the forward task that started the
    compensation must not put the workflow back to RUNNING while the tasks downstream of it stay
    CANCELLED (nothing can ever run them, so it would stay RUNNING for ever).
    """
    machine = EngineMachine(env)
    try:
        machine.start_workflow("saga")
        (inst,) = machine.model.instances.values()
        worker = WORKERS[0]

        def work(task_type: str, ok: bool) -> None:
            (e,) = machine.tc.poll_tasks(worker, namespace=NS, task_types=[task_type])
            report = machine.tc.complete_task if ok else machine.tc.fail_task
            report(e.execution_id, worker, e.fence_token, {"ok": ok})

        work("reserve", True)
        work("charge", False)  # one attempt: compensation starts, ship is cancelled
        work("release", False)
        work("release", False)  # two attempts: the compensation fails, so does the workflow
        assert machine.wc.get_workflow(inst.instance_id).state is W.FAILED
        try:
            machine.tc.retry_task(inst.instance_id, "charge")
        except InvalidStateError:
            return  # refusing forward work once compensation has run is a correct answer
        work("charge", True)
        state = machine.wc.get_workflow(inst.instance_id).state
        tasks = {(e.task_id, e.kind.value): e.state.value for e in machine.wc.list_tasks(inst.instance_id)}
        assert state is not W.RUNNING or tasks[("ship", FORWARD)] != CANCELLED, (
            f"the workflow is {state.value} but ship was cancelled and can never run: {tasks}"
        )
    finally:
        machine.teardown()


def test_a_resumed_workflow_queues_behind_work_made_ready_while_it_was_paused(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example the full-size run found, spelled out so it runs the same way every time.

    Pausing parks the workflow's READY task; resuming gives it ready_at = now(), so a task released
    in between, in another workflow, is older and is leased first. The model applies the same rule
    (``Model.unpark_resumed``); before it did, it expected the resumed task first.
    """
    monkeypatch.setattr(sys.modules[__name__], "event", lambda *_args, **_kwargs: None)  # no hypothesis run
    machine = EngineMachine(env)
    try:
        machine.start_some_workflows(["pair", "pair"])
        machine.start_workflow("pair")
        first, second, third = machine.model.instances.values()
        machine.operate(pick=0, action="pause", task_id="a")
        # leases the a of the two running workflows and completes one: its b becomes READY
        machine.work(WORKERS[0], ["complete"], drain=True)
        machine.engine_agrees_with_the_model()
        machine.operate(pick=0, action="resume", task_id="a")
        machine.work(WORKERS[0], ["complete"], drain=False)  # a limit of one: the oldest only
        machine.engine_agrees_with_the_model()
        leased = [(i.instance_id, e.task_id) for i in (first, second, third) for e in i.execs if e.holder]
        assert (first.instance_id, "a") not in leased
        machine.work(WORKERS[0], [], drain=True)
        machine.engine_agrees_with_the_model()
    finally:
        machine.teardown()
