"""Translate driver errors into the engine's exception tree at exactly one boundary."""

from __future__ import annotations

import psycopg
from psycopg import errors as pgerr

from .errors import ConcurrencyConflictError, DatabaseError, OrchestratorError, PayloadError

_CONSTRAINT_ERRORS: dict[str, type[OrchestratorError]] = {
    "uk_events_sequence": ConcurrencyConflictError,
}


def translate(exc: psycopg.Error) -> Exception:
    """Return the engine error for ``exc``; connection problems pass through unchanged."""
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        # The connection is gone or the server is shutting down: callers (the worker) retry these.
        return exc
    if isinstance(exc, (pgerr.SerializationFailure, pgerr.DeadlockDetected, pgerr.LockNotAvailable)):
        return ConcurrencyConflictError(f"concurrent update conflict: {exc.sqlstate}")
    if isinstance(
        exc, (pgerr.UntranslatableCharacter, pgerr.InvalidTextRepresentation, pgerr.CharacterNotInRepertoire)
    ):
        return PayloadError(f"the database refused a value: {exc.diag.message_primary}")
    if is_stale_prepared_statement(exc):
        return DatabaseError(
            "a migration changed the type of a column this connection's prepared statement returns; "
            "the engine replaces such a connection: call again"
        )
    constraint = exc.diag.constraint_name
    if constraint and constraint in _CONSTRAINT_ERRORS:
        return _CONSTRAINT_ERRORS[constraint](f"constraint {constraint} refused the change")
    if exc.sqlstate is None:
        # refused by the driver before reaching the server (e.g. a NUL in a string parameter)
        return DatabaseError(f"the driver refused the statement: {exc}")
    return DatabaseError(f"database error {exc.sqlstate}: {exc.diag.message_primary}")


def is_stale_prepared_statement(exc: psycopg.Error) -> bool:
    """Say whether the server refused a prepared statement whose result's types a migration changed.

    The server refuses it on that connection for as long as the connection lives (migration 0010
    made columns domains); psycopg forgets its prepared statements only after a ROLLBACK or a DROP
    it sees on the connection.
    """
    return isinstance(exc, pgerr.FeatureNotSupported) and "cached plan must not change result type" in (
        exc.diag.message_primary or ""
    )
