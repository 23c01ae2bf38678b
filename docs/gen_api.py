"""Write docs/reference/api.md from the signatures and docstrings of the public API.

Run ``python docs/gen_api.py`` after changing a public signature or docstring and commit the result;
``tests/test_docs.py`` fails while the committed file differs from what this script renders.
Standard library only, so the docs need no extra dependency to stay checked.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reference" / "api.md"
sys.path.insert(0, str(ROOT))

import orchestrator_engine  # noqa: E402 - the checkout must be importable first
from orchestrator_engine import worker  # noqa: E402

WIDTH = 100

#: (heading, introduction, names) in page order; names come from ``orchestrator_engine.__all__`` unless
#: qualified with a module (``worker.Worker``). A name exported but not listed lands in "Other".
SECTIONS: list[tuple[str, str, list[str]]] = [
    (
        "Configuration and connections",
        "Build one `EngineConfig`, open one pool with `create_pool`, and pass both to the coordinators. "
        "The fields are described in [Configuration](../configuration.md).",
        ["EngineConfig", "create_pool", "parse_duration"],
    ),
    (
        "Migrations",
        "See [Migrations](../migrations.md) for what `migrate` does step by step.",
        ["migrate", "pending_migrations"],
    ),
    (
        "Definitions",
        "A workflow is a validated, immutable DAG of tasks. Construction raises `InvalidDefinitionError`.",
        ["WorkflowDefinition", "TaskDefinition", "RetryPolicy"],
    ),
    (
        "Coordinators",
        "The coordinators are the engine's API: each method is one transaction, and every write accepts "
        "`conn=` to join the caller's transaction (see [Host transactions](../howto/host-transactions.md)).",
        ["WorkflowCoordinator", "StartWorkflowRequest", "TaskCoordinator"],
    ),
    (
        "Worker",
        "Import these from `orchestrator_engine.worker`; they are not re-exported by the package. "
        "A handler is any callable taking a `TaskContext` and returning a JSON value.",
        ["worker.Worker", "worker.TaskContext", "worker.WorkerStats", "worker.LeaseLostError"],
    ),
    (
        "Records",
        "Frozen dataclasses the coordinators return. JSON columns come back as Python values.",
        ["WorkflowInstance", "TaskExecution", "WorkflowEvent"],
    ),
    (
        "States and kinds",
        "String enums whose values are what the database stores. The legal transitions are drawn in "
        "[State machines](../concepts/state-machines.md).",
        ["WorkflowState", "TaskState", "TaskKind", "EventType"],
    ),
    (
        "Errors",
        "One tree rooted at `OrchestratorError`; [Errors](errors.md) says when each is raised.",
        [
            "OrchestratorError",
            "ConcurrencyConflictError",
            "DatabaseError",
            "DefinitionConflictError",
            "FencingError",
            "InvalidDefinitionError",
            "InvalidStateError",
            "MigrationError",
            "PayloadError",
            "TaskNotFoundError",
            "WorkflowNotFoundError",
        ],
    ),
]

#: attributes set in a constructor have no docstring of their own; say what they hold here
ATTRIBUTE_NOTES: dict[str, str] = {
    "TaskContext.execution": "the leased `TaskExecution`",
    "TaskContext.lease_lost": "a `threading.Event`, set when a renewal or the fence says the lease is gone",
    "TaskContext.output": "the output `transaction()` records; set it inside the block",
    "Worker.pool": "the pool passed in",
    "Worker.config": "the `EngineConfig` passed in, or one built from the pool's conninfo",
    "Worker.handlers": "a copy of the task type -> handler mapping",
    "Worker.namespace": "the namespace polled, or None for all",
    "Worker.concurrency": "how many handlers run at once",
    "Worker.worker_id": "the UUID sent with every lease call",
    "Worker.tasks": "the worker's own `TaskCoordinator`",
    "Worker.stats": "a `WorkerStats` the worker updates as it goes",
}


def _resolve(name: str) -> tuple[str, Any]:
    if name.startswith("worker."):
        short = name.removeprefix("worker.")
        return short, getattr(worker, short)
    return name, getattr(orchestrator_engine, name)


def _value(value: Any) -> str:
    """Render a default value readably and identically on every machine."""
    if value is os.environ:
        return "os.environ"
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, timedelta):
        return repr(value).removeprefix("datetime.")
    if isinstance(value, tuple):
        inner = ", ".join(_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if value is dataclasses.MISSING:
        return "<required>"
    if repr(value) == "<factory>":
        return "<factory>"
    text = repr(value)
    if re.search(r" at 0x[0-9a-f]+>", text):
        raise ValueError(f"default {text} would render differently on every run; teach _value about it")
    return text


def _annotation(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def _parameters(signature: inspect.Signature, *, skip_self: bool) -> list[str]:
    out: list[str] = []
    seen_keyword_only = False
    params = list(signature.parameters.values())
    if skip_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    for p in params:
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not seen_keyword_only:
            out.append("*")
            seen_keyword_only = True
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            seen_keyword_only = True
            text = f"*{p.name}"
        elif p.kind is inspect.Parameter.VAR_KEYWORD:
            text = f"**{p.name}"
        else:
            text = p.name
        annotation = _annotation(p.annotation)
        if annotation:
            text += f": {annotation}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {_value(p.default)}" if annotation else f"={_value(p.default)}"
        out.append(text)
    return out


def _signature(prefix: str, func: Callable[..., Any], *, skip_self: bool) -> str:
    signature = inspect.signature(func)
    params = _parameters(signature, skip_self=skip_self)
    returns = _annotation(signature.return_annotation)
    tail = f" -> {returns}" if returns else ""
    one_line = f"{prefix}({', '.join(params)}){tail}"
    if len(one_line) <= WIDTH or not params:
        return one_line
    body = "".join(f"    {p},\n" for p in params)
    return f"{prefix}(\n{body}){tail}"


def _doc(obj: Any) -> str:
    text = inspect.getdoc(obj) or ""
    # reStructuredText literals (``x``) read as Markdown code (`x`)
    return text.replace("``", "`")


def _code(text: str) -> list[str]:
    return ["```python", text, "```", ""]


def _paragraph(text: str) -> list[str]:
    return [text, ""] if text else []


def _own_members(cls: type) -> Iterator[tuple[str, Any]]:
    """Yield the public methods and properties a class defines itself, in source order."""
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (property, cached_property, classmethod, staticmethod)) or inspect.isfunction(
            member
        ):
            yield name, member


def _constructor_attributes(cls: type) -> list[tuple[str, str]]:
    """Return the public ``self.x`` attributes ``__init__`` assigns, with their annotation if any."""
    init = vars(cls).get("__init__")
    if init is None or not inspect.isfunction(init):
        return []
    tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        annotation = ""
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
            annotation = ast.unparse(node.annotation)
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
                and not target.attr.startswith("_")
            ):
                found.setdefault(target.attr, annotation)
    return list(found.items())


def _member(cls: type, name: str, member: Any) -> list[str]:
    qualified = f"{cls.__name__}.{name}"
    lines = [f"#### `{qualified}`", ""]
    if isinstance(member, (property, cached_property)):
        getter = member.fget if isinstance(member, property) else member.func
        assert getter is not None
        returns = _annotation(inspect.signature(getter).return_annotation)
        kind = "property" if isinstance(member, property) else "cached property"
        lines += _code(f"{qualified}: {returns}  # {kind}" if returns else f"{qualified}  # {kind}")
        lines += _paragraph(_doc(getter))
        return lines
    func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    prefix = f"@classmethod\n{qualified}" if isinstance(member, classmethod) else qualified
    lines += _code(_signature(prefix, func, skip_self=not isinstance(member, staticmethod)))
    lines += _paragraph(_doc(func))
    return lines


def _fields(cls: type) -> list[str]:
    hints = {f.name: f for f in dataclasses.fields(cls)}
    rows = ["| field | type | default |", "|---|---|---|"]
    for name, f in hints.items():
        if f.default is not dataclasses.MISSING:
            default = f"`{_value(f.default)}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{getattr(f.default_factory, '__name__', 'factory')}()`"
        else:
            default = "required"
        type_text = f.type if isinstance(f.type, str) else _annotation(f.type)
        rows.append(f"| `{name}` | `{type_text.replace('|', '&#124;')}` | {default} |")
    return [*rows, ""]


def _enum(cls: type[enum.Enum]) -> list[str]:
    values = ", ".join(f"`{m.name}`" for m in cls)
    return [f"Members: {values}.", ""]


def _exception(cls: type[BaseException]) -> list[str]:
    bases = ", ".join(f"`{b.__name__}`" for b in cls.__bases__)
    lines = [f"Subclass of {bases}.", ""]
    init = vars(cls).get("__init__")
    if init is not None and inspect.isfunction(init):
        lines += _code(_signature(cls.__name__, init, skip_self=True))
    return lines


def _class(name: str, cls: type) -> list[str]:
    lines = [f"### `{name}`", ""]
    if issubclass(cls, BaseException):
        lines += _paragraph(_doc(cls))
        lines += _exception(cls)
        return lines
    if issubclass(cls, enum.Enum):
        lines += _paragraph(_doc(cls))
        lines += _enum(cls)
    else:
        lines += _code(_signature(f"class {name}", cls, skip_self=False))
        lines += _paragraph(_doc(cls))
        if dataclasses.is_dataclass(cls):
            lines += _fields(cls)
    attributes = _constructor_attributes(cls) if not dataclasses.is_dataclass(cls) else []
    if attributes:
        lines += ["| attribute | type | holds |", "|---|---|---|"]
        for attr, annotation in attributes:
            note = ATTRIBUTE_NOTES.get(f"{name}.{attr}", "")
            type_text = f"`{annotation}`" if annotation else ""
            lines.append(f"| `{attr}` | {type_text.replace('|', '&#124;')} | {note} |")
        lines.append("")
    if "__enter__" in vars(cls):
        lines += [f"`{name}` is a context manager: `with {name}(...)` calls `start()` and `stop()`.", ""]
    for member_name, member in _own_members(cls):
        lines += _member(cls, member_name, member)
    return lines


def _function(name: str, func: Callable[..., Any]) -> list[str]:
    return [f"### `{name}`", "", *_code(_signature(name, func, skip_self=False)), *_paragraph(_doc(func))]


def _entry(name: str, obj: Any) -> list[str]:
    if inspect.isclass(obj):
        return _class(name, obj)
    if callable(obj):
        return _function(name, obj)
    return [f"### `{name}`", "", f"A `{type(obj).__name__}`: the installed package version.", ""]


def render() -> str:
    """Return the Markdown of the API reference."""
    lines = [
        "# API reference",
        "",
        "<!-- Generated by docs/gen_api.py from signatures and docstrings. Do not edit by hand: run",
        "     `python docs/gen_api.py` and commit the result; tests/test_docs.py checks it is current. -->",
        "",
        "Every name on this page is importable from `orchestrator_engine` (its `__all__`), except the",
        "[Worker](#worker) section, which lives in `orchestrator_engine.worker`. Arguments typed",
        "`UUID | str` accept a `uuid.UUID` or its string form; a malformed string raises `ValueError` and",
        "another type `TypeError`.",
        "",
    ]
    placed: set[str] = set()
    for heading, intro, names in SECTIONS:
        lines += [f"## {heading}", "", intro, ""]
        for qualified in names:
            short, obj = _resolve(qualified)
            placed.add(qualified)
            lines += _entry(short, obj)
    other = [n for n in orchestrator_engine.__all__ if n not in placed]
    if other:
        lines += ["## Other", ""]
        for name in other:
            lines += _entry(name, getattr(orchestrator_engine, name))
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main() -> int:
    """Write the reference, or with ``--check`` only report whether the committed one is current."""
    text = render()
    if "--check" in sys.argv[1:]:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
