#!/usr/bin/env python3
"""Write the plans of the engine's hot statements, on a populated schema, to benchmarks/plans/.

python benchmarks/plans.py [--dsn DSN] [--out-dir DIR] [--finished N] [--ready N]

Without --dsn it starts an embedded PostgreSQL. Each statement is run under EXPLAIN (ANALYZE, BUFFERS)
in a transaction that is rolled back, and explained once more as a generic plan.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script from a checkout: make `benchmarks` and `orchestrator_engine` importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._plans import main

if __name__ == "__main__":
    sys.exit(main())
