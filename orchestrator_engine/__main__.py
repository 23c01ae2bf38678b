"""Run the command line: ``python -m orchestrator_engine``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
