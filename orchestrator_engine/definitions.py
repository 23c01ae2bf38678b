"""Workflow definitions: a DAG of tasks, each with a retry policy and an optional compensation."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

from .errors import InvalidDefinitionError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}$")
_MAX_DURATION = timedelta(days=366)
MAX_ATTEMPTS_LIMIT = 1000
MAX_TASKS = 10_000


def check_name(value: object, what: str) -> str:
    """Return ``value`` if it is a valid name (letters, digits, ``_ . : -``, at most 128 chars)."""
    if not isinstance(value, str):
        raise InvalidDefinitionError(f"{what} must be a string, got {type(value).__name__}")
    if not _NAME.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidDefinitionError(
            f"{what} {shown!r} is not a valid name: use 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    return value


def _check_duration(value: object, what: str, *, allow_zero: bool = False) -> timedelta:
    if not isinstance(value, timedelta):
        raise InvalidDefinitionError(f"{what} must be a timedelta, got {type(value).__name__}")
    if value < timedelta(0) or (value == timedelta(0) and not allow_zero):
        raise InvalidDefinitionError(f"{what} must be positive, got {value}")
    if value > _MAX_DURATION:
        raise InvalidDefinitionError(f"{what} must be at most {_MAX_DURATION.days} days, got {value}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How often a task is tried and how long to wait between tries.

    ``initial_interval=timedelta(0)`` retries immediately. ``jitter`` is the fraction (0..1) by which
    each delay is randomly shortened or lengthened, so failed tasks do not retry in lockstep.
    """

    max_attempts: int = 3
    initial_interval: timedelta = timedelta(seconds=1)
    backoff_coefficient: float = 2.0
    max_interval: timedelta = timedelta(minutes=5)
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise InvalidDefinitionError("max_attempts must be an int")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise InvalidDefinitionError(
                f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {self.max_attempts}"
            )
        _check_duration(self.initial_interval, "initial_interval", allow_zero=True)
        _check_duration(self.max_interval, "max_interval")
        if self.max_interval < self.initial_interval:
            raise InvalidDefinitionError("max_interval must not be shorter than initial_interval")
        if not isinstance(self.backoff_coefficient, (int, float)) or isinstance(
            self.backoff_coefficient, bool
        ):
            raise InvalidDefinitionError("backoff_coefficient must be a number")
        if not 1.0 <= self.backoff_coefficient <= 100.0:
            raise InvalidDefinitionError(
                f"backoff_coefficient must be in [1, 100], got {self.backoff_coefficient}"
            )
        if (
            not isinstance(self.jitter, (int, float))
            or isinstance(self.jitter, bool)
            or not 0 <= self.jitter <= 1
        ):
            raise InvalidDefinitionError(f"jitter must be a number in [0, 1], got {self.jitter!r}")

    def delay_after(self, attempt: int, rng: random.Random | None = None) -> timedelta:
        """Return how long to wait before the attempt that follows failed attempt ``attempt``."""
        base = self.initial_interval.total_seconds() * self.backoff_coefficient ** max(attempt - 1, 0)
        base = min(base, self.max_interval.total_seconds())
        if self.jitter and base > 0:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return timedelta(seconds=min(max(base, 0.0), self.max_interval.total_seconds()))

    def to_json(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "initial_interval_ms": _ms(self.initial_interval),
            "backoff_coefficient": float(self.backoff_coefficient),
            "max_interval_ms": _ms(self.max_interval),
            "jitter": float(self.jitter),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RetryPolicy:
        return cls(
            max_attempts=data["max_attempts"],
            initial_interval=timedelta(milliseconds=data["initial_interval_ms"]),
            backoff_coefficient=data["backoff_coefficient"],
            max_interval=timedelta(milliseconds=data["max_interval_ms"]),
            jitter=data["jitter"],
        )


def _ms(value: timedelta) -> int:
    return round(value.total_seconds() * 1000)


@dataclass(frozen=True)
class TaskDefinition:
    """One node of the DAG. ``task_type`` (default: ``task_id``) is what workers subscribe to."""

    task_id: str
    depends_on: tuple[str, ...] = ()
    task_type: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: timedelta | None = None
    compensation: str | None = None

    def __init__(
        self,
        task_id: str,
        *,
        depends_on: Iterable[str] = (),
        task_type: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,
        compensation: str | None = None,
    ) -> None:
        check_name(task_id, "task_id")
        if isinstance(depends_on, str):
            raise InvalidDefinitionError(
                f"depends_on of {task_id!r} must be a list of task ids, not a string"
            )
        deps = tuple(depends_on)
        for dep in deps:
            check_name(dep, f"dependency of {task_id!r}")
        if task_type is not None:
            check_name(task_type, f"task_type of {task_id!r}")
        if compensation is not None:
            check_name(compensation, f"compensation of {task_id!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidDefinitionError(f"retry of {task_id!r} must be a RetryPolicy")
        if timeout is not None:
            _check_duration(timeout, f"timeout of {task_id!r}")
        object.__setattr__(self, "task_id", task_id)
        object.__setattr__(self, "depends_on", deps)
        object.__setattr__(self, "task_type", task_type or task_id)
        object.__setattr__(self, "retry", retry or RetryPolicy())
        object.__setattr__(self, "timeout", timeout)
        object.__setattr__(self, "compensation", compensation)

    @property
    def type(self) -> str:
        """Return the task type workers subscribe to."""
        return self.task_type or self.task_id

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "depends_on": list(self.depends_on),
            "task_type": self.type,
            "retry": self.retry.to_json(),
            "timeout_ms": None if self.timeout is None else _ms(self.timeout),
            "compensation": self.compensation,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskDefinition:
        timeout_ms = data.get("timeout_ms")
        return cls(
            data["task_id"],
            depends_on=data.get("depends_on", ()),
            task_type=data.get("task_type"),
            retry=RetryPolicy.from_json(data["retry"]),
            timeout=None if timeout_ms is None else timedelta(milliseconds=timeout_ms),
            compensation=data.get("compensation"),
        )


@dataclass(frozen=True)
class WorkflowDefinition:
    """A named, versioned DAG of tasks. Construction validates it."""

    namespace: str
    name: str
    tasks: Sequence[TaskDefinition]
    version: int = 1

    def __post_init__(self) -> None:
        check_name(self.namespace, "namespace")
        check_name(self.name, "workflow name")
        if (
            isinstance(self.version, bool)
            or not isinstance(self.version, int)
            or not 1 <= self.version < 2**31
        ):
            raise InvalidDefinitionError(f"version must be a positive int, got {self.version!r}")
        raw: object = self.tasks
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
            raise InvalidDefinitionError("tasks must be a list of TaskDefinition")
        tasks = tuple(raw)
        object.__setattr__(self, "tasks", tasks)
        _validate_dag(self.name, tasks)

    @cached_property
    def by_id(self) -> dict[str, TaskDefinition]:
        return {t.task_id: t for t in self.tasks}

    @cached_property
    def dependents(self) -> dict[str, tuple[str, ...]]:
        """Map each task id to the ids of the tasks that depend on it directly."""
        out: dict[str, list[str]] = {t.task_id: [] for t in self.tasks}
        for t in self.tasks:
            for dep in t.depends_on:
                out[dep].append(t.task_id)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def roots(self) -> tuple[TaskDefinition, ...]:
        return tuple(t for t in self.tasks if not t.depends_on)

    def ancestors(self, task_id: str) -> set[str]:
        """Return every task ``task_id`` depends on, directly or transitively."""
        return _reach(task_id, lambda t: self.by_id[t].depends_on)

    def descendants(self, task_id: str) -> set[str]:
        """Return every task that depends on ``task_id``, directly or transitively."""
        return _reach(task_id, lambda t: self.dependents[t])

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "version": self.version,
            "tasks": [t.to_json() for t in self.tasks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkflowDefinition:
        return cls(
            namespace=data["namespace"],
            name=data["name"],
            version=data["version"],
            tasks=tuple(TaskDefinition.from_json(t) for t in data["tasks"]),
        )

    @cached_property
    def content_hash(self) -> str:
        """Return a stable hash of the definition's body; equal bodies hash equal."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _reach(start: str, step: Any) -> set[str]:
    seen: set[str] = set()
    stack = list(step(start))
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(step(node))
    return seen


_COMPENSATE_PREFIX = "compensate:"


def check_attempt_keys(definition: WorkflowDefinition) -> None:
    """Refuse a task "compensate:x" beside a task x that has a compensation, at registration.

    An attempt's idempotency key is "{instance}:{task_id}:{attempt}", a compensation's
    "{instance}:compensate:{task_id}:{attempt}": such a task and x's compensation would hand their
    handlers one key. Checked when a definition is registered, not when a stored one is read back,
    so the instances of a definition registered before the check keep running.
    """
    for t in definition.tasks:
        undone = t.task_id.removeprefix(_COMPENSATE_PREFIX)
        if undone == t.task_id:
            continue
        other = definition.by_id.get(undone)
        if other is not None and other.compensation is not None:
            raise InvalidDefinitionError(
                f"task id {t.task_id!r} in workflow {definition.name!r} names the compensation of task "
                f"{undone!r}: its attempts' idempotency keys would be the compensation's; rename it"
            )


def _validate_dag(name: str, tasks: tuple[TaskDefinition, ...]) -> None:
    if not tasks:
        raise InvalidDefinitionError(f"workflow {name!r} has no tasks")
    if len(tasks) > MAX_TASKS:
        raise InvalidDefinitionError(
            f"workflow {name!r} has {len(tasks)} tasks; at most {MAX_TASKS} are allowed"
        )
    ids: set[str] = set()
    for t in tasks:
        if not isinstance(t, TaskDefinition):
            raise InvalidDefinitionError(f"tasks of {name!r} must be TaskDefinition, got {type(t).__name__}")
        if t.task_id in ids:
            raise InvalidDefinitionError(f"duplicate task id {t.task_id!r} in workflow {name!r}")
        ids.add(t.task_id)
    for t in tasks:
        if len(set(t.depends_on)) != len(t.depends_on):
            raise InvalidDefinitionError(f"task {t.task_id!r} lists a dependency twice")
        for dep in t.depends_on:
            if dep == t.task_id:
                raise InvalidDefinitionError(f"task {t.task_id!r} depends on itself")
            if dep not in ids:
                raise InvalidDefinitionError(f"task {t.task_id!r} depends on unknown task {dep!r}")
    cycle = _find_cycle(tasks)
    if cycle:
        raise InvalidDefinitionError(f"workflow {name!r} has a cycle: {' -> '.join(cycle)}")


def _find_cycle(tasks: tuple[TaskDefinition, ...]) -> list[str] | None:
    deps = {t.task_id: t.depends_on for t in tasks}
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(deps, white)
    for start in deps:
        if color[start] != white:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0:
                color[node] = grey
                path.append(node)
            children = deps[node]
            if i < len(children):
                stack.append((node, i + 1))
                child = children[i]
                if color[child] == grey:
                    return [*path[path.index(child) :], child]
                if color[child] == white:
                    stack.append((child, 0))
            else:
                color[node] = black
                path.pop()
    return None
