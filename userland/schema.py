"""A tool's JSON Schema (2020-12) from its signature: type hints give the
types, a Google-style docstring the descriptions.

Hints: int, float, str, bool, list[X], tuple[...], set[X], dict[str, X],
Literal[...], Enum, X | None, dataclasses, TypedDict, and Annotated[X, "doc",
{"minimum": 1}], whose text describes and whose maps add JSON Schema keywords.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .convert import NONE, to_wire

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# --- docstrings -----------------------------------------------------------------------

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|"
                      r"Notes?|Attributes|See Also|Warnings?):\s*$")
_ARG_LINE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(first paragraph, {param: description}) from a Google-style docstring."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()):
            break
        summary.append(line.strip())
    params: dict[str, str] = {}
    in_args, current, indent = False, None, None
    for line in lines:
        stripped = line.strip()
        if _SECTION.match(stripped) and len(line) == len(line.lstrip()):
            in_args = stripped.rstrip(":") in ("Args", "Arguments", "Parameters", "Params")
            current, indent = None, None
            continue
        if not in_args or not stripped:
            continue
        level = len(line) - len(line.lstrip())
        if indent is None:
            indent = level
        m = _ARG_LINE.match(stripped)
        if level <= indent and m:
            current = m.group(1)
            params[current] = m.group(2).strip()
        elif level > indent and current is not None:  # a continuation line
            params[current] = f"{params[current]} {stripped}".strip()
        elif level < indent:
            in_args = False
    return " ".join(summary), params


# --- type hints -> JSON Schema ----------------------------------------------------------

_SCALARS: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _nullable(schema: dict) -> dict:
    t = schema.get("type")
    if isinstance(t, str) and set(schema) <= {"type", "items", "additionalProperties",
                                              "properties", "required", "description",
                                              "prefixItems", "minItems", "maxItems"}:
        return {**schema, "type": [t, "null"]}
    if "enum" in schema:
        out = {**schema, "enum": [*schema["enum"], None]}
        if isinstance(t, str):
            out["type"] = [t, "null"]
        return out
    return {"anyOf": [schema, {"type": "null"}]}


def schema_for_type(hint: Any) -> dict:
    """The JSON Schema of one type hint. Raises TypeError for a type with none."""
    if hint is inspect.Parameter.empty or hint is Any or hint is object:
        return {}
    if hint is None or hint is NONE:
        return {"type": "null"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        # Annotated[int, "a description", {"minimum": 1}]: text describes, maps add keywords
        schema = schema_for_type(args[0])
        for extra in args[1:]:
            if isinstance(extra, str):
                schema = {**schema, "description": extra}
            elif isinstance(extra, Mapping):
                schema = {**schema, **extra}
        return schema
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if origin is typing.Literal:
        return _enum(list(args))
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not NONE]
        inner = (schema_for_type(rest[0]) if len(rest) == 1
                 else {"anyOf": [schema_for_type(a) for a in rest]})
        return _nullable(inner) if len(rest) < len(args) else inner
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum([m.value for m in hint])
    if hint in (list, set, frozenset, Sequence) or origin in (list, set, frozenset, Sequence):
        schema = {"type": "array"}
        if args:
            schema["items"] = schema_for_type(args[0])
        if hint in (set, frozenset) or origin in (set, frozenset):
            schema["uniqueItems"] = True
        return schema
    if hint is tuple or origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": schema_for_type(args[0])}
        return {"type": "array", "prefixItems": [schema_for_type(a) for a in args],
                "minItems": len(args), "maxItems": len(args)}
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        schema = {"type": "object"}
        if args:
            if args[0] is not str:
                raise TypeError(f"{hint!r}: JSON object keys are strings; use dict[str, ...]")
            schema["additionalProperties"] = schema_for_type(args[1])
        return schema
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint, include_extras=True)
        props, required = {}, []
        for f in dataclasses.fields(hint):
            props[f.name] = schema_for_type(hints.get(f.name, Any))
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        return _object(props, required)
    if typing.is_typeddict(hint):
        hints = typing.get_type_hints(hint, include_extras=True)
        props = {k: schema_for_type(v) for k, v in hints.items()}
        return _object(props, sorted(hint.__required_keys__))
    raise TypeError(f"no JSON Schema for the type {hint!r}: use int, float, str, bool, "
                    "list[X], dict[str, X], Literal[...], an Enum, a dataclass or X | None")


def _enum(values: list) -> dict:
    """One of `values`, typed when they share one scalar type."""
    kinds = {_SCALARS.get(type(v)) for v in values}
    if len(kinds) == 1 and None not in kinds:
        return {"type": kinds.pop(), "enum": values}
    return {"enum": values}


def _object(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def _json_default(value: Any) -> tuple[bool, Any]:
    """(ok, value) for a parameter default that can be shown in a schema."""
    try:
        wire = to_wire(value)
    except TypeError:
        return False, None
    if isinstance(wire, bytes):
        return False, None
    return True, wire


def param_hints(fn: Callable) -> dict[str, Any]:
    """A function's parameter type hints, resolved in its module. The return
    annotation is left out: a tool may return a class defined further down."""
    ann = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k != "return"}
    holder = types.SimpleNamespace(__annotations__=ann, __globals__=getattr(fn, "__globals__", {}))
    try:
        return typing.get_type_hints(holder, include_extras=True)
    except NameError as e:
        raise TypeError(f"{fn.__qualname__}: cannot resolve a parameter's type ({e}); "
                        "define it before the driver class") from None


def schema_for(fn: Callable, descriptions: Mapping[str, str] | None = None) -> dict:
    """The JSON Schema of a function's arguments object, from its signature.

    Parameters with defaults are optional; `self`/`cls` is skipped; no other
    properties are allowed. Raises TypeError for *args, **kwargs, positional-only
    parameters or a hint with no JSON Schema.
    """
    descriptions = descriptions or {}
    sig = inspect.signature(fn)
    hints = param_hints(fn)
    props: dict[str, dict] = {}
    required: list[str] = []
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"{fn.__qualname__}: parameter {p.name!r} must be a named parameter "
                            "(tools are called with a JSON object of arguments)")
        try:
            prop = schema_for_type(hints.get(p.name, inspect.Parameter.empty))
        except TypeError as e:
            raise TypeError(f"{fn.__qualname__}({p.name}): {e}") from None
        if p.name in descriptions and "description" not in prop:
            prop = {**prop, "description": descriptions[p.name]}
        if p.default is p.empty:
            required.append(p.name)
        else:
            ok, default = _json_default(p.default)
            if ok:
                prop = {**prop, "default": default}
        props[p.name] = prop
    return {"$schema": SCHEMA_DIALECT, **_object(props, required)}


__all__ = ["SCHEMA_DIALECT", "param_hints", "parse_docstring", "schema_for", "schema_for_type"]
