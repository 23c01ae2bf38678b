"""Check the ids callers pass in before they reach SQL."""

from __future__ import annotations

from uuid import UUID


def as_uuid(value: object, what: str) -> UUID:
    """Return ``value`` as a UUID; a malformed string is a ValueError, another type a TypeError."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            raise ValueError(f"{what} {value[:40]!r} is not a UUID") from None
    raise TypeError(f"{what} must be a UUID or a UUID string, got {type(value).__name__}")
