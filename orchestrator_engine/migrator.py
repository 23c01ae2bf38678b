"""Apply the engine's SQL migrations to a schema, serialised by a PostgreSQL advisory lock."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg import conninfo, sql

from orchestrator_engine.config import SCHEMA_PATTERN, EngineConfig, redact_dsn
from orchestrator_engine.errors import MigrationError

logger = logging.getLogger(__name__)

_LOCK_NAMESPACE = b"orchestrator_engine.migrate:"
_APPLICATION_NAME = "orchestrator-engine-migrate"


def migrate(
    target: str | EngineConfig,
    *,
    schema: str = "orchestrator",
    lock_timeout: timedelta = timedelta(minutes=5),
) -> list[str]:
    """Bring `schema` up to date and return the ids of the migrations applied (`[]` if none).

    Safe to call from many processes at once: callers queue on an advisory lock and all but
    the first find nothing to do. Pass an EngineConfig to use its dsn and schema.
    """
    dsn, schema = _resolve(target, schema)
    with _migration_lock(dsn, schema, lock_timeout) as lock_conn:
        with _translate_errors(dsn):
            lock_conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        return _apply(dsn, schema)


def pending_migrations(
    target: str | EngineConfig,
    *,
    schema: str = "orchestrator",
    lock_timeout: timedelta = timedelta(minutes=5),
) -> list[str]:
    """Return the ids of the migrations `migrate` would apply, without applying them."""
    dsn, schema = _resolve(target, schema)
    with _migration_lock(dsn, schema, lock_timeout) as lock_conn:
        with _translate_errors(dsn):
            exists = lock_conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (schema,)
            ).fetchone()
        if not (exists and exists[0]):
            # answer without creating anything: yoyo would otherwise add its tables
            return [m.id for m in _read_migrations()]
        with _translate_errors(dsn), _open_backend(dsn, schema) as backend:
            return [m.id for m in backend.to_apply(_read_migrations())]


def migration_lock_key(schema: str) -> int:
    """Return the advisory-lock key (a signed 64-bit int) that serialises migrations of `schema`."""
    digest = hashlib.blake2b(_LOCK_NAMESPACE + schema.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def migrations_dir() -> Path:
    """Return the directory holding the migration .sql files (inside the wheel, else the checkout)."""
    packaged = Path(__file__).parent / "migrations"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if checkout.is_dir():
        return checkout
    raise MigrationError(f"no migrations directory at {packaged} or {checkout}")


def yoyo_url(dsn: str, schema: str) -> str:
    """Convert a libpq DSN (key=value or URL) into the `postgresql+psycopg://` URL yoyo wants.

    Every libpq parameter travels in the query string, which yoyo hands to psycopg.connect as
    keyword arguments: that keeps unix-socket hosts, multi-host lists and passwords with
    special characters intact, where the URL's netloc could not.
    """
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise MigrationError(f"invalid connection string: {redact_dsn(dsn)}") from None
    query = {key: str(value) for key, value in params.items() if value is not None}
    query.pop("schema", None)
    # yoyo turns this into SET search_path, so its bookkeeping tables live in our schema too
    query["schema"] = schema
    return "postgresql+psycopg://?" + urlencode(query)


def _resolve(target: str | EngineConfig, schema: str) -> tuple[str, str]:
    if isinstance(target, EngineConfig):
        return target.dsn, target.schema
    if not SCHEMA_PATTERN.fullmatch(schema):
        # the name reaches yoyo's SET search_path unquoted, so only plain identifiers are allowed
        raise ValueError(f"schema {schema!r} must match {SCHEMA_PATTERN.pattern}")
    return target, schema


def _read_migrations() -> Any:
    from yoyo import read_migrations

    return read_migrations(str(migrations_dir()))


@contextmanager
def _migration_lock(dsn: str, schema: str, lock_timeout: timedelta) -> Iterator[psycopg.Connection[Any]]:
    """Hold a session advisory lock for `schema` on a dedicated connection.

    Unlike yoyo's lock row, a session lock dies with its connection, so a migrator killed
    mid-run cannot wedge the next one.
    """
    with _translate_errors(dsn):
        conn = psycopg.connect(dsn, autocommit=True, application_name=_APPLICATION_NAME)
    try:
        with _translate_errors(dsn):
            conn.execute(
                sql.SQL("SET lock_timeout = {}").format(
                    sql.Literal(f"{int(lock_timeout.total_seconds() * 1000)}ms")
                )
            )
            conn.execute("SELECT pg_advisory_lock(%s)", (migration_lock_key(schema),))
        yield conn
    finally:
        # closing ends the session, which releases the lock even if unlocking would fail
        conn.close()


@contextmanager
def _open_backend(dsn: str, schema: str) -> Iterator[Any]:
    from yoyo import get_backend

    backend = get_backend(yoyo_url(dsn, schema))
    try:
        # Under our advisory lock nobody else is migrating this schema, so a yoyo_lock row can
        # only be left by a migrator killed inside yoyo's own locked section; clear it.
        backend.break_lock()
        yield backend
    finally:
        backend.connection.close()


def _apply(dsn: str, schema: str) -> list[str]:
    migrations = _read_migrations()
    with _translate_errors(dsn), _open_backend(dsn, schema) as backend:
        todo = backend.to_apply(migrations)
        ids = [m.id for m in todo]
        if ids:
            logger.info("applying migrations %s to schema %s of %s", ids, schema, redact_dsn(dsn))
            # apply without backend.lock(): our advisory lock already serialises migrators
            backend.apply_migrations(todo)
        return ids


@contextmanager
def _translate_errors(dsn: str) -> Iterator[None]:
    try:
        yield
    except MigrationError:
        raise
    except Exception as exc:
        if not _is_driver_error(exc):
            raise
        message = str(exc)
        password = _password(dsn)
        if password:
            message = message.replace(password, "***")
        raise MigrationError(
            f"migration failed on {redact_dsn(dsn)}: {type(exc).__name__}: {message}"
        ) from exc


def _is_driver_error(exc: Exception) -> bool:
    if isinstance(exc, psycopg.Error):
        return True
    from yoyo import exceptions as yoyo_exceptions
    from yoyo.connections import BadConnectionURI

    return isinstance(exc, (yoyo_exceptions.LockTimeout, yoyo_exceptions.BadMigration, BadConnectionURI))


def _password(dsn: str) -> str | None:
    try:
        value = conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        return None
    return None if value is None else str(value)


__all__ = ["migrate", "migration_lock_key", "migrations_dir", "pending_migrations", "yoyo_url"]
