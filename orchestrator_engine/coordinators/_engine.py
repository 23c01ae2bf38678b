"""What both coordinators share: the pool, the repositories, transactions and the definition cache."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool, PoolClosed

from .._payload import encode_payload
from ..config import EngineConfig
from ..definitions import WorkflowDefinition
from ..errors import WorkflowNotFoundError
from ..repositories import Repositories
from ..repositories.base import keep_cursor
from ._unit import InstanceUnit

log = logging.getLogger("orchestrator_engine.engine")
P = TypeVar("P")

#: an announcer sends at most one NOTIFY statement per this many seconds, covering every write since
ANNOUNCE_INTERVAL = 0.005
#: an announcer's thread ends after this long with nothing to send (the next write starts another)
ANNOUNCER_IDLE_EXIT = 5.0
#: the longest pause between two tries of a round that failed
ANNOUNCE_RETRY_MAX = 2.0
#: a start of one workflow tries to lease its task to an idle worker if the last one was longer ago
#: than this, even if that one saw no worker waiting (see Engine.expect_waiting)
DIRECT_RECHECK = 0.05
#: namespaces whose hint an engine keeps at most
MAX_HINTS = 1024


def notify_channel(schema: str) -> str:
    """Return the LISTEN/NOTIFY channel on which the engine announces ready tasks."""
    return f"orchestrator_engine_{schema}"


class Engine:
    """Own transactions for the coordinators; one per (pool, config)."""

    def __init__(self, pool: ConnectionPool[Any], config: EngineConfig) -> None:
        self.pool = pool
        self.config = config
        self.repos = Repositories(config.schema)
        self.channel = notify_channel(config.schema)
        self._definitions: dict[tuple[str, str, int], WorkflowDefinition] = {}
        #: the latest version of each (namespace, name) last seen; may be stale, see latest_definition
        self._latest: dict[tuple[str, str], int] = {}
        #: what a start sends of each cached definition, see start_plan
        self._start_plans: dict[tuple[str, str, int], Any] = {}
        #: per namespace: whether the last start of one workflow saw an idle worker waiting for a
        #: task, and when (see expect_waiting); a hint, shared by this engine's threads
        self._hints: dict[str, tuple[bool, float]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        #: whether a write of this engine that notifies in its own transaction is in flight
        self._notifying = False
        self._announcer = _Announcer(self)

    @contextmanager
    def transaction(self, conn: psycopg.Connection[Any] | None = None) -> Iterator[psycopg.Connection[Any]]:
        """Yield a connection inside a transaction: the caller's (as a savepoint) or a pooled one."""
        if conn is not None:
            # inside the caller's transaction nothing read may be cached: it could still roll back
            depth = getattr(self._local, "host_depth", 0)
            self._local.host_depth = depth + 1
            try:
                with conn.transaction():
                    yield conn
            finally:
                self._local.host_depth = depth
            return
        with self.pool.connection() as pooled, pooled.transaction():
            keep_cursor(pooled)
            yield pooled

    @contextmanager
    def reading(self) -> Iterator[psycopg.Connection[Any]]:
        """Yield a pooled connection for reads that need no transaction of their own."""
        with self.pool.connection() as pooled:
            keep_cursor(pooled)
            yield pooled

    @contextmanager
    def single(self) -> Iterator[psycopg.Connection[Any]]:
        """Yield a pooled connection for one statement that is atomic by itself.

        On an autocommit connection (``create_pool`` makes them) the statement commits alone, saving
        the BEGIN and COMMIT round trips; any other connection gets a transaction around it. The
        connection is taken and given back without ``pool.connection()``, whose ``with conn`` block
        would only ask an idle autocommit connection to commit nothing (half the pool's cost per call).
        """
        pooled = self.pool.getconn()
        try:
            keep_cursor(pooled)
            if pooled.autocommit:
                yield pooled
            else:
                with pooled.transaction():
                    yield pooled
        finally:
            # a connection left in a transaction or broken is rolled back or replaced by the pool
            self.pool.putconn(pooled)

    @contextmanager
    def notifying(self) -> Iterator[bool]:
        """Around a write that wakes idle workers: yield True if it should notify in its transaction.

        PostgreSQL serialises the commits of all transactions that NOTIFY, cluster-wide, holding a lock
        from before the commit record until the WAL flush returns; such commits never share a flush. So
        one write of this engine at a time notifies itself (lowest latency when writes are sparse);
        a write that overlaps it commits without notifying and calls ``announce_later`` once committed.
        """
        with self._lock:
            inline = not self._notifying
            self._notifying = True
        try:
            yield inline
        finally:
            if inline:
                with self._lock:
                    self._notifying = False

    def expect_waiting(self, namespace: str) -> bool:
        """Tell whether a start of one workflow should send the statement that can lease its task.

        Yes if the last such start in ``namespace`` saw an idle worker of it waiting (the start
        statements report it), or if that start was more than DIRECT_RECHECK ago: sparse starts,
        whose latency direct dispatch is for, always try; while starts come faster, they pay for the
        claim only when it can succeed.
        """
        saw, at = self._hints.get(namespace, (True, 0.0))
        return saw or time.monotonic() - at > DIRECT_RECHECK

    def saw_waiting(self, namespace: str, waiting: bool) -> None:
        """Record what a start of one workflow in ``namespace`` found: whether a worker waited."""
        if len(self._hints) >= MAX_HINTS and namespace not in self._hints:
            self._hints.clear()  # many namespaces: forgetting costs each one direct statement
        self._hints[namespace] = (waiting, time.monotonic())

    def announce_later(self, namespaces: Iterable[str]) -> None:
        """Wake idle workers of ``namespaces`` soon, from the announcer: call after the write committed."""
        if self.config.notify:
            self._announcer.submit(namespaces)

    def encode(self, value: Any, what: str) -> str:
        return encode_payload(value, limit=self.config.max_payload_bytes, what=what)

    def definition(
        self, conn: psycopg.Connection[Any], namespace: str, name: str, version: int
    ) -> WorkflowDefinition:
        """Return a stored definition; a committed (namespace, name, version) never changes: cache it."""
        key = (namespace, name, version)
        cached = self._definitions.get(key)
        if cached is not None:
            return cached
        row = self.repos.definitions.definition_get(conn, namespace, name, version)
        if row is None:
            raise WorkflowNotFoundError(f"no workflow {namespace}/{name} version {version}")
        return self._remember(row, latest=False)

    def latest_definition(
        self, conn: psycopg.Connection[Any], namespace: str, name: str, *, cached: bool
    ) -> WorkflowDefinition:
        """Return the latest registered version, from the cache when ``cached`` and it has one.

        Another engine may have registered a newer version since the cache learnt the latest, so a
        cached answer is only safe in a statement that checks it is still the latest (as
        ``workflow_start_many`` does); ``cached=False`` always asks the database.
        """
        version = self._latest.get((namespace, name)) if cached else None
        if version is not None:
            return self.definition(conn, namespace, name, version)
        row = self.repos.definitions.definition_get_latest(conn, namespace, name)
        if row is None:
            raise WorkflowNotFoundError(f"no workflow {namespace}/{name} is registered")
        return self._remember(row, latest=True)

    def _remember(self, row: dict[str, Any], *, latest: bool) -> WorkflowDefinition:
        """Return the definition of a stored row, cached (and, if ``latest``, noted as the latest).

        Inside the caller's transaction nothing is cached: the row could still roll back.
        """
        key = (row["namespace"], row["name"], int(row["version"]))
        definition = self._definitions.get(key) or WorkflowDefinition.from_json(row["definition"])
        if not getattr(self._local, "host_depth", 0):
            with self._lock:
                self._definitions[key] = definition
                if latest:
                    self._latest[key[:2]] = key[2]
        return definition

    def start_plan(self, definition: WorkflowDefinition, make: Callable[[WorkflowDefinition], P]) -> P:
        """Return ``make(definition)``, made once per definition this engine has cached.

        A definition that is not the cached one (read inside the caller's transaction, which could
        still roll back) gets a fresh plan each time.
        """
        key = (definition.namespace, definition.name, definition.version)
        if self._definitions.get(key) is not definition:
            return make(definition)
        plan: P | None = self._start_plans.get(key)
        if plan is None:
            # threads that race here make equal plans; the last one stored wins
            plan = self._start_plans[key] = make(definition)
        return plan

    def forget_latest(self, namespace: str, name: str) -> None:
        """Drop the cached latest version of a workflow, so the next start looks it up."""
        with self._lock:
            self._latest.pop((namespace, name), None)

    def lock(self, conn: psycopg.Connection[Any], instance_id: UUID) -> InstanceUnit:
        """Lock an instance row and return the unit of work that changes it."""
        row = self.repos.instances.workflow_lock(conn, instance_id)
        if row is None:
            raise WorkflowNotFoundError(f"no workflow instance {instance_id}")
        return self.unit(conn, row)

    def unit(self, conn: psycopg.Connection[Any], row: dict[str, Any]) -> InstanceUnit:
        """Return the unit of work for an instance row this transaction has locked."""
        definition = self.definition(conn, row["namespace"], row["workflow_name"], row["workflow_version"])
        return InstanceUnit(self, conn, row, definition)


class _Announcer:
    """Notify idle workers of writes that committed without a NOTIFY, coalesced, on a thread of its own.

    Each round sends one statement for every namespace submitted since the last, then waits
    ANNOUNCE_INTERVAL: under a stream of writes the cluster-wide NOTIFY lock is taken a few hundred
    times a second at most, however many writes there are. The statement's transaction changes no
    data, so it commits with ``synchronous_commit`` off and does not wait for a WAL flush while it
    holds that lock. A submission always follows its write's commit, so the notification it leads to
    is sent after that commit. A round that fails (no connection, the server away) goes back in the
    queue and is retried with a growing pause; only a closed pool drops it. A worker's poll interval
    is the backstop for a notification that never arrives.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._reset()
        _ANNOUNCERS.add(self)

    def _reset(self) -> None:
        """Start empty, with no thread (also in a child process forked while a thread ran)."""
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._thread: threading.Thread | None = None

    def submit(self, namespaces: Iterable[str]) -> None:
        with self._cond:
            self._pending.update(namespaces)
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="orchestrator-announcer", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # at interpreter shutdown, or out of threads: send it from here
                    pass
                else:
                    self._thread = thread
            self._cond.notify()
            if self._thread is not None:
                return
            pending, self._pending = sorted(self._pending), set()
        if not self._send(pending):
            log.warning("could not notify workers of %s; their poll interval will find the work", pending)

    def _run(self) -> None:
        pause = ANNOUNCE_INTERVAL
        while True:
            with self._cond:
                if not self._pending:
                    self._cond.wait(ANNOUNCER_IDLE_EXIT)
                if not self._pending:
                    self._thread = None
                    return
                namespaces, self._pending = sorted(self._pending), set()
            if self._send(namespaces):
                pause = ANNOUNCE_INTERVAL
            else:
                with self._cond:
                    self._pending.update(namespaces)  # retried with the next round
                pause = min(pause * 4, ANNOUNCE_RETRY_MAX)
            time.sleep(pause)

    def _send(self, namespaces: list[str]) -> bool:
        """Send one round; False if it should be retried (a closed pool drops it: True)."""
        engine = self._engine
        try:
            with engine.single() as c:
                engine.repos.instances.announce(c, engine.channel, namespaces)
        except PoolClosed:
            log.debug("pool closed: dropped the notification of %s", namespaces)
        except Exception as exc:  # never let the thread die
            log.info("could not notify workers of %s yet: %s", namespaces, exc)
            return False
        return True


#: every announcer of this process, reset in a child process after fork (threads do not survive it,
#: and the condition's lock may have been held by one of them)
_ANNOUNCERS: weakref.WeakSet[_Announcer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for announcer in list(_ANNOUNCERS):
        announcer._reset()
        announcer._engine._notifying = False  # a start in flight in the parent is not the child's


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
