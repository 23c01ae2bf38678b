"""The documentation tells the truth: links resolve, code runs, diagrams and the API page match the code.

Conventions the pages follow so that this module can check them:

- Every ```python block of docs/quickstart.md runs, in page order, as one script against an empty
  database whose DSN is in ``ORCHESTRATOR_DSN``; its stdout must equal the ```text block that follows
  the ``<!-- expected-output -->`` marker.
- In docs/howto/*.md a ```python block preceded by a ``<!-- runnable -->`` line runs on its own, the
  same way. Every other ```python block in docs/ must at least compile.
- docs/concepts/state-machines.md draws each transition table in a ``stateDiagram-v2`` block that names
  the table in a ``%%`` comment.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pytest

from orchestrator_engine.models import TASK_TRANSITIONS, WORKFLOW_TRANSITIONS, TaskState, WorkflowState

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
RUN_TIMEOUT_S = 90

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M
)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
EDGE = re.compile(r"^\s*(?P<src>\[\*\]|\w+)\s*-->\s*(?P<dst>\[\*\]|\w+)\s*(?::.*)?$")
RUNNABLE = "<!-- runnable -->"
EXPECTED_OUTPUT = "<!-- expected-output -->"


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    page: Path
    line: int
    info: str
    body: str
    marker: str  # the non-blank line just above the fence

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = [line for line in text[: match.start()].splitlines() if line.strip()]
        found.append(
            Block(
                page=page,
                line=text.count("\n", 0, match.start()) + 1,
                info=match["info"].strip(),
                body=textwrap.dedent(match["body"]),
                marker=before[-1].strip() if before else "",
            )
        )
    return found


def _python_blocks(pages: list[Path]) -> list[Block]:
    return [b for page in pages for b in _blocks(page) if b.info == "python"]


def _run_script(code: str, dsn: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    script = workdir / "doc_block.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "ORCHESTRATOR_DSN": dsn, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


# -- links -----------------------------------------------------------------------------------------


def _prose(text: str) -> str:
    """Return the text without fenced blocks and inline code, where link syntax is only an example."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file(page: Path) -> None:
    broken = []
    for match in LINK.finditer(_prose(page.read_text(encoding="utf-8"))):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URLs and same-page anchors
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_every_page_is_in_the_mkdocs_nav_and_every_nav_entry_exists() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", config, re.M))
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert pages - nav == set(), "pages missing from the nav of mkdocs.yml"
    assert nav - pages == set(), "nav entries without a page"


# -- code ------------------------------------------------------------------------------------------


#: api.md shows signatures, not statements; test_api_reference_is_what_gen_api_renders_now covers it
COMPILED_PAGES = [p for p in PAGES if p != DOCS / "reference" / "api.md"]


@pytest.mark.parametrize("block", _python_blocks(COMPILED_PAGES), ids=lambda b: b.where)
def test_every_python_block_compiles(block: Block) -> None:
    compile(block.body, block.where, "exec")


def test_quickstart_runs_on_an_empty_database_and_prints_what_the_page_shows(
    fresh_database: Callable[..., str], tmp_path: Path
) -> None:
    page = DOCS / "quickstart.md"
    blocks = _blocks(page)
    script = "\n\n".join(b.body for b in blocks if b.info == "python")
    [expected] = [b.body for b in blocks if b.marker == EXPECTED_OUTPUT]
    result = _run_script(script, fresh_database(template=False), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == expected


HOWTO_RUNNABLE = [b for b in _python_blocks(sorted((DOCS / "howto").glob("*.md"))) if b.marker == RUNNABLE]


def test_the_howto_guides_have_runnable_examples() -> None:
    assert len(HOWTO_RUNNABLE) >= 3


@pytest.mark.parametrize("block", HOWTO_RUNNABLE, ids=lambda b: b.where)
def test_runnable_howto_block_runs_on_an_empty_database(
    block: Block, fresh_database: Callable[..., str], tmp_path: Path
) -> None:
    result = _run_script(block.body, fresh_database(template=False), tmp_path)
    assert result.returncode == 0, f"{block.where}\n{result.stdout}{result.stderr}"


# -- state machines --------------------------------------------------------------------------------


def _diagram(table_name: str) -> tuple[set[tuple[str, str]], set[str], set[str]]:
    """Return (edges, initial states, final states) of the diagram that names ``table_name``."""
    page = DOCS / "concepts" / "state-machines.md"
    found = [b for b in _blocks(page) if b.info == "mermaid" and f"%% models.{table_name}" in b.body]
    assert len(found) == 1, f"expected one Mermaid diagram marked %% models.{table_name}"
    edges: set[tuple[str, str]] = set()
    starts: set[str] = set()
    ends: set[str] = set()
    for line in found[0].body.splitlines():
        match = EDGE.match(line)
        if match is None:
            continue
        src, dst = match["src"], match["dst"]
        if src == "[*]":
            starts.add(dst)
        elif dst == "[*]":
            ends.add(src)
        else:
            edges.add((src, dst))
    return edges, starts, ends


@pytest.mark.parametrize(
    ("table_name", "table", "states", "initial"),
    [
        ("WORKFLOW_TRANSITIONS", WORKFLOW_TRANSITIONS, WorkflowState, {"RUNNING"}),
        ("TASK_TRANSITIONS", TASK_TRANSITIONS, TaskState, {"PENDING", "READY"}),
    ],
)
def test_state_diagram_draws_exactly_the_transition_table(
    table_name: str,
    table: frozenset[tuple[WorkflowState, WorkflowState]] | frozenset[tuple[TaskState, TaskState]],
    states: type[WorkflowState] | type[TaskState],
    initial: set[str],
) -> None:
    edges, starts, ends = _diagram(table_name)
    expected = {(src.value, dst.value) for src, dst in table}
    assert edges - expected == set(), "edges drawn that the table does not allow"
    assert expected - edges == set(), "edges of the table missing from the drawing"
    assert starts == initial
    members: list[Enum] = list(states)
    assert ends == {s.value for s in members if getattr(s, "is_terminal", False)}


# -- API reference ---------------------------------------------------------------------------------


def test_api_reference_is_what_gen_api_renders_now() -> None:
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    assert spec is not None
    assert spec.loader is not None
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    rendered: str = gen_api.render()
    committed = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    assert committed == rendered, "docs/reference/api.md is stale: run python docs/gen_api.py"
