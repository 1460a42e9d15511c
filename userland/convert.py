"""Tool values on the wire: a result to a msgpack- and JSON-safe value
(`to_wire`), a checked argument back to the Python type its hint names
(`from_wire`)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

NONE = type(None)


def from_wire(value: Any, hint: Any) -> Any:
    """A checked argument back to the Python type its hint names (dataclass,
    Enum, tuple, set, float); other values pass through unchanged."""
    if value is None or hint is inspect.Parameter.empty or hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return from_wire(value, args[0])
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not NONE]
        return from_wire(value, rest[0]) if len(rest) == 1 else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type) and isinstance(value, dict):
        hints = typing.get_type_hints(hint)
        return hint(**{k: from_wire(v, hints.get(k, Any)) for k, v in value.items()})
    if isinstance(value, list):
        if origin is tuple or hint is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(from_wire(v, args[0]) for v in value)
            if args:
                return tuple(from_wire(v, h) for v, h in zip(value, args))
            return tuple(value)
        item = args[0] if args else Any
        if origin in (set, frozenset) or hint in (set, frozenset):
            return (origin or hint)(from_wire(v, item) for v in value)
        if origin in (list, Sequence):
            return [from_wire(v, item) for v in value]
    if isinstance(value, dict) and origin in (dict, Mapping) and len(args) == 2:
        return {k: from_wire(v, args[1]) for k, v in value.items()}
    return value


def to_wire(value: Any) -> Any:
    """A tool's result as a msgpack- and JSON-safe value: dataclasses and
    pydantic models become maps, tuples and sets lists, Enums their value,
    dates ISO text, paths strings. Raises TypeError for anything else."""
    if value is None or isinstance(value, (bool, float, str, bytes)):
        if isinstance(value, enum.Enum):
            return to_wire(value.value)
        return value
    if isinstance(value, int) and not isinstance(value, enum.Enum):
        if not -(2 ** 63) <= value < 2 ** 64:  # msgpack integers are 64-bit
            raise TypeError(f"the integer {value} does not fit in 64 bits; return it as text")
        return int(value)
    if isinstance(value, enum.Enum):
        return to_wire(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {(k if isinstance(k, str) else str(to_wire(k))): to_wire(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [to_wire(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "model_dump"):  # pydantic v2
        return to_wire(value.model_dump(mode="json"))
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return to_wire(value.tolist())
    raise TypeError(f"a {type(value).__name__} cannot be sent as a tool result")


__all__ = ["from_wire", "to_wire"]
