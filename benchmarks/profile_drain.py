#!/usr/bin/env python3
"""Profile a drain: database time per statement (pg_stat_statements), CPU per side, Python stacks.

python benchmarks/profile_drain.py [--tasks N] [--shape single|chain] [--processes P] [--analyze]
    [--py-spy DIR] [--dsn DSN]

Without --dsn it starts an embedded PostgreSQL with pg_stat_statements preloaded (the wheel ships it).
--py-spy needs `pip install py-spy` and permission to attach to the worker processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script from a checkout: make `benchmarks` and `orchestrator_engine` importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._profile import main

if __name__ == "__main__":
    sys.exit(main())
