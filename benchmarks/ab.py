#!/usr/bin/env python3
"""Compare a git revision of the engine with this checkout's working tree, starts alternating.

python benchmarks/ab.py BASE [--workload start|bulk] [--rounds N] [--block N] [--dsn DSN]

Both versions run in one process, each under a package name of its own, in schemas of their own;
blocks of starts alternate between them, so a change in the machine's speed moves both. Prints
workflows/s, wall time, client CPU and server CPU per workflow, and B's ratio to A.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script from a checkout: make `benchmarks` and `orchestrator_engine` importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._ab import main

if __name__ == "__main__":
    sys.exit(main())
