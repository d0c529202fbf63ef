"""JSON in and out of Redis: compact text, and errors that name what JSON cannot carry.

jobq never unpickles or evaluates anything it reads from Redis. Values travel as JSON:
tuples arrive as lists, and a value JSON cannot carry is refused when the job is enqueued.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .exceptions import SerializationError

_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
_ascii_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


#: The JSON text of the scalars most tasks return, without the encoder's machinery (which
#: costs more than a short job's own work).
_SCALARS: dict[Any, str] = {None: "null", True: "true", False: "false"}


def dumps(value: Any) -> str:
    """Compact JSON, text kept as UTF-8 rather than ``\\u`` escapes; but a string with a lone
    surrogate (``"\\ud800"``, which UTF-8 cannot carry to Redis) is escaped instead."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if value is None or kind is bool:
        return _SCALARS[value]
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


#: The decoder's own scanner (C; set by its __init__): one value from an index. A worker
#: decodes every job it runs; this skips ``decode``'s whitespace matching for compact JSON.
_scan: Callable[[str, int], tuple[Any, int]] = vars(_decoder)["scan_once"]


def loads(text: str | bytes) -> Any:
    if not isinstance(text, str):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    try:
        value, end = _scan(text, 0)
        if end == len(text):
            return value
    except (StopIteration, ValueError):
        pass
    return _decoder.decode(text)  # leading or trailing space, or an error to describe


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


def encode_result(value: Any) -> str:
    """Encode a task's return value; a value JSON cannot carry raises SerializationError."""
    try:
        return dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise SerializationError(
            f"the task returned a {_describe(value)}, which JSON cannot carry ({exc}); "
            "return JSON types (dict, list, str, int, float, bool, None)"
        ) from None
