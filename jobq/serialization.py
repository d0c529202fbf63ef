"""JSON in and out of Redis: compact job specs, and errors that name what failed.

jobq never unpickles or evaluates anything it reads from Redis. Values travel as JSON:
tuples arrive as lists, and a value JSON cannot carry is refused when the job is enqueued.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .exceptions import PayloadTooLarge, SerializationError

_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
_ascii_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dumps(value: Any) -> str:
    """Compact JSON, text kept as UTF-8 rather than ``\\u`` escapes; but a string with a lone
    surrogate (``"\\ud800"``, which UTF-8 cannot carry to Redis) is escaped instead."""
    text = _encoder.encode(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _ascii_encoder.encode(value)
    return text


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


#: Standard JSON only: Python's NaN/Infinity extensions are refused, as ``dumps`` refuses them
#: (data read back must be data jobq can write again).
_decoder = json.JSONDecoder(parse_constant=_not_json)


def loads(text: str | bytes) -> Any:
    if not isinstance(text, str):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    return _decoder.decode(text)


def _describe(value: Any) -> str:
    return type(value).__name__


def _check(value: Any) -> str | None:
    try:
        dumps(value)
    except (TypeError, ValueError) as exc:
        return f"{_describe(value)} is not JSON-serializable ({exc})"
    return None


def encode_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`SerializationError` naming the first argument JSON cannot carry."""
    for i, value in enumerate(args):
        problem = _check(value)
        if problem:
            raise SerializationError(f"argument {i}: {problem}")
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise SerializationError(f"keyword argument names must be strings, got {key!r}")
        problem = _check(value)
        if problem:
            raise SerializationError(f"keyword argument {key!r}: {problem}")


def encode_spec(spec: dict[str, Any], *, max_bytes: int) -> str:
    """Encode a job spec, with a clear error for unserializable values and oversized jobs."""
    try:
        text = dumps(spec)
    except (TypeError, ValueError):
        encode_args(spec.get("a", ()), spec.get("k", {}))
        raise SerializationError(f"job options are not JSON-serializable: {spec!r:.200}") from None
    size = len(text.encode("utf-8")) if not text.isascii() else len(text)
    if size > max_bytes:
        raise PayloadTooLarge(
            f"job for {spec.get('t')!r} is {size} bytes encoded, over the limit of {max_bytes} "
            "(max_payload_bytes): pass a reference (a path, a key) instead of the data"
        )
    return text


def encode_result(value: Any) -> str:
    """Encode a task's return value; a value JSON cannot carry raises SerializationError."""
    try:
        return dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise SerializationError(
            f"the task returned a {_describe(value)}, which JSON cannot carry ({exc}); "
            "return JSON types (dict, list, str, int, float, bool, None)"
        ) from None
