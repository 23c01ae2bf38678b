#!/usr/bin/env python3
"""Run the project's developer commands in a .venv built from nothing: `demo` and `test`.

Usage: python3 dev.py demo [args...] | python3 dev.py test [pytest args...]
Standard library only, so it runs on any Python 3.10+ before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".dev-stamp"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"


def _stamp() -> str:
    """Fingerprint what the venv depends on: pyproject.toml and the interpreter that built it."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def _run(*argv: str | Path) -> int:
    print("+", " ".join(str(a) for a in argv), flush=True)
    return subprocess.run([str(a) for a in argv], cwd=ROOT, check=False).returncode


def ensure_venv() -> None:
    """Create .venv and install the project with the dev extra, unless the stamp says it is current."""
    expected = _stamp()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text().strip() == expected:
        return
    if not PYTHON.exists():
        _check(_run(sys.executable, "-m", "venv", VENV))
        # an old bundled pip may not support editable installs from pyproject.toml (PEP 660)
        _check(_run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip"))
    _check(_run(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[dev]"))
    # written last, so an interrupted install is retried next time
    STAMP.write_text(expected + "\n")


def _check(code: int) -> None:
    if code != 0:
        sys.exit(code)


def demo(args: list[str]) -> int:
    """Run the engine's demo command with any extra arguments."""
    return _run(PYTHON, "-m", "orchestrator_engine", "demo", *args)


def test(args: list[str]) -> int:
    """Run lint, format check, type check and tests; stop at the first failure."""
    steps: list[list[str | Path]] = [
        [PYTHON, "-m", "ruff", "check", "."],
        [PYTHON, "-m", "ruff", "format", "--check", "."],
        [PYTHON, "-m", "mypy"],
        # pytest's exit code 5 ("no tests collected") is non-zero, so it fails here too
        [PYTHON, "-m", "pytest", *args],
    ]
    for step in steps:
        code = _run(*step)
        if code != 0:
            return code
    return 0


COMMANDS = {"demo": demo, "test": test}


def main(argv: list[str]) -> int:
    """Dispatch `argv[0]` to a command, passing the rest through."""
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python3 dev.py {{{'|'.join(COMMANDS)}}} [args...]", file=sys.stderr)
        return 2
    ensure_venv()
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
