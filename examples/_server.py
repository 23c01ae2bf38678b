"""Give the examples a database: the DSN on the command line, else an embedded PostgreSQL."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def database() -> Iterator[str]:
    if len(sys.argv) > 1:
        yield sys.argv[1]
        return
    from orchestrator_engine.embedded import EmbeddedPostgres

    with EmbeddedPostgres() as server:
        yield server.dsn()
