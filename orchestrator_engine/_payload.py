"""Check and encode JSON payloads before anything is written."""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import PayloadError

MAX_DEPTH = 64
#: one encoder for every payload: json.dumps given these options builds a new encoder on each call,
#: which cost about a third of encoding a small input. Its options never change, so threads share it.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode_payload(value: Any, *, limit: int, what: str) -> str:
    """Return ``value`` as JSON text that jsonb accepts, or raise PayloadError.

    Refuse non-JSON types (only dict with str keys, list, str, int, float, bool and None pass),
    NaN/Infinity, strings with NUL (jsonb cannot store ``\\u0000``) or lone surrogates, nesting
    deeper than MAX_DEPTH, and texts over ``limit`` bytes.
    """
    _check(value, what, 0)
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - _check catches these first
        raise PayloadError(f"{what} is not a JSON value: {exc}") from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise PayloadError(f"{what} is {size} bytes, over the limit of {limit} bytes")
    return text


def _check(value: Any, what: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise PayloadError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(f"{what} contains {value!r}, which JSON cannot represent")
        return
    if isinstance(value, str):
        _check_str(value, what)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(f"{what} has a non-string object key of type {type(key).__name__}")
            _check_str(key, what)
            _check(item, what, depth + 1)
        return
    if isinstance(value, list):
        for item in value:
            _check(item, what, depth + 1)
        return
    raise PayloadError(f"{what} contains a {type(value).__name__}, which is not a JSON value")


def _check_str(value: str, what: str) -> None:
    if "\x00" in value:
        raise PayloadError(f"{what} contains a NUL character, which PostgreSQL jsonb cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{what} contains a lone surrogate, which is not valid Unicode") from None
