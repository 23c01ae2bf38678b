#!/usr/bin/env python3
"""Measure orchestrator-engine on this machine and write benchmarks/RESULTS.md.

python benchmarks/run.py [--dsn DSN] [--size smoke|full] [--out benchmarks/RESULTS.md]

Without --dsn it starts an embedded PostgreSQL with durable settings (fsync and synchronous_commit
on). With --dsn it works in that database, one ``bench_*`` schema per workload, dropped afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script from a checkout: make `benchmarks` and `orchestrator_engine` importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._run import main

if __name__ == "__main__":
    sys.exit(main())
