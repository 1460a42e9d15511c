"""The driver SDK: a class with type-hinted methods becomes a userland driver.

    from typing import Literal
    from llmagentos import Driver, tool

    class WeatherDriver(Driver):          # namespace "weather"
        @tool
        def forecast(self, city: str, days: int = 1,
                     unit: Literal["C", "F"] = "C") -> dict:
            '''The forecast for a city.

            Args:
                city: the city's name
                days: how many days ahead (1-7)
            '''
            ...

    WeatherDriver().run()                 # or: llmos driver run weather.py

A driver is a process that `drv.register`s a namespace with one JSON Schema
per tool, then serves the `[req_id, tool, args, caller_pid]` `drv.request`
notifications the kernel sends it, each answered by `drv.reply` — a
microkernel server. The kernel has already checked the arguments against the
schema and the caller's `tool:<ns>.<name>` capability when a request arrives.

The schema comes from the type hints (int, float, str, bool, list[X],
tuple[...], dict[str, X], Literal[...], Enum, X | None, dataclasses,
TypedDict; Annotated[X, "doc", {"minimum": 1}] adds a description and JSON
Schema keywords); the description from the docstring's first
paragraph and a Google-style ``Args:`` section. Requests are served
concurrently: async tools as trio tasks, sync tools in worker threads.
Exceptions become errnos (`exception_to_error`); results are converted to
msgpack-safe values (`to_wire`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as _dt
import enum
import importlib.util
import inspect
import logging
import re
import sys
import time
import traceback
import types
import typing
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import msgpack
import trio

from llmagentos.syscalls import caps as _caps
from llmagentos.syscalls.errno import NAMES, SyscallError
from llmagentos.syscalls.wire import DEFAULT_MAX_FRAME

from .client import AsyncClient, aconnect
from .errors import ERRORS, KernelError

log = logging.getLogger("llmagentos.driver")

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_MARK = "__llmos_tool__"
# A reply must fit in one frame of the kernel's default limit, with room for the envelope.
MAX_RESULT_BYTES = DEFAULT_MAX_FRAME - 64 * 1024

# The pid of the process whose tool call is being served (inside a tool).
_caller: contextvars.ContextVar[int | None] = contextvars.ContextVar("llmos_caller", default=None)


def caller_pid() -> int | None:
    """Inside a tool: the pid of the process that called it (None outside a call)."""
    return _caller.get()


# --- the @tool decorator ------------------------------------------------------------

@dataclass(frozen=True)
class _Mark:
    name: str | None
    description: str | None


def tool(fn: Callable | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Mark a `Driver` method as a tool: `@tool`, or `@tool(name=..., description=...)`.

    The tool's name defaults to the method's, its description to the
    docstring's first paragraph.
    """
    def mark(f: Callable) -> Callable:
        setattr(f, _MARK, _Mark(name, description))
        return f
    return mark(fn) if fn is not None else mark


@dataclass(frozen=True)
class ToolSpec:
    """One tool of a driver class: what is registered and how to call it."""

    name: str            # within the namespace: "forecast"
    description: str
    schema: dict         # JSON Schema (2020-12) of the arguments object
    method: str          # attribute name on the driver class
    is_async: bool
    hints: dict[str, Any]  # parameter -> type hint, to convert wire values back

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "schema": self.schema}


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
_NONE = type(None)


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
    if hint is None or hint is _NONE:
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
        values = list(args)
        kinds = {_SCALARS.get(type(v)) for v in values}
        schema: dict = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            schema = {"type": kinds.pop(), "enum": values}
        return schema
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not _NONE]
        inner = (schema_for_type(rest[0]) if len(rest) == 1
                 else {"anyOf": [schema_for_type(a) for a in rest]})
        return _nullable(inner) if len(rest) < len(args) else inner
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [m.value for m in hint]
        kinds = {_SCALARS.get(type(v)) for v in values}
        schema = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            schema = {"type": kinds.pop(), "enum": values}
        return schema
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


# --- wire values <-> Python values ---------------------------------------------------------

def from_wire(value: Any, hint: Any) -> Any:
    """A checked argument back to the Python type its hint names (dataclass,
    Enum, tuple, set, float); other values pass through unchanged."""
    if value is None or hint is inspect.Parameter.empty or hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return from_wire(value, args[0])
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not _NONE]
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


# --- exceptions -> errno -------------------------------------------------------------------

# Most specific first: FileNotFoundError is an OSError, KernelError ENOENT a FileNotFoundError.
_BY_CLASS: tuple[tuple[type[BaseException], str], ...] = (
    (FileNotFoundError, "ENOENT"), (FileExistsError, "EEXIST"), (PermissionError, "EACCES"),
    (IsADirectoryError, "EISDIR"), (NotADirectoryError, "ENOTDIR"),
    (TimeoutError, "ETIMEDOUT"), (NotImplementedError, "ENOSYS"),
    (ValueError, "EINVAL"), (TypeError, "EINVAL"),
)


def exception_to_error(exc: BaseException) -> dict:
    """The wire error `{name, message}` a tool's exception becomes.

    A KernelError (`llmagentos.ERRORS["EINVAL"]("...")`) keeps its errno;
    ValueError/TypeError are EINVAL, FileNotFoundError ENOENT,
    PermissionError EACCES (and a few more builtins by class or OSError.errno);
    anything else is EIO with the exception's text.
    """
    if isinstance(exc, KernelError):
        return {"name": exc.name, "message": exc.message}
    if isinstance(exc, SyscallError):
        return {"name": exc.name, "message": exc.message}
    text = str(exc) or type(exc).__name__
    for cls, name in _BY_CLASS:
        if isinstance(exc, cls):
            return {"name": name, "message": text}
    if isinstance(exc, OSError) and exc.errno in NAMES:
        return {"name": NAMES[exc.errno], "message": exc.strerror or text}
    return {"name": "EIO", "message": f"{type(exc).__name__}: {text}"}


def sole_error(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, as
    trio's nurseries wrap them; a group of several is returned as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# --- the Driver base class -----------------------------------------------------------------

async def requests(client: Any) -> AsyncIterator[tuple[int, str, Any, int]]:
    """The calls the kernel routes to this driver: each drv.request notification
    on the connection as (req_id, tool, args, caller_pid); ends when it closes."""
    async for note in client.notifications():
        if note.method == "drv.unregistered":  # killed, or its process ended: stop serving
            log.info("the kernel unregistered %s: %s", *(note.args or ["?", "?"])[:2])
            return
        if note.method != "drv.request":
            continue
        try:
            req_id, name, args, caller = note.args
        except (TypeError, ValueError):
            log.warning("malformed drv.request %r", note.args)
            continue
        yield req_id, name, args, caller


@asynccontextmanager
async def own_process(name: str) -> AsyncIterator[AsyncClient]:
    """A connection for a server (a driver, an MCP bridge). Started from the
    shell it would speak as init (pid 1): invisible in `ps`, unkillable. So it
    attaches a process of its own first, named `name`: `llmos kill` of that pid
    unregisters its tools and ends the serve loop."""
    async with aconnect() as c:
        if c.pid != 1:  # spawned by the kernel: already a process of its own
            yield c
            return
        me = await c.proc.attach(name)
        async with aconnect(token=me["token"]) as own:
            yield own


class Driver:
    """Base class of a userland driver: subclass it, decorate methods with `@tool`.

    `namespace` defaults to the class name lowercased, less a trailing
    "driver" (`WeatherDriver` -> "weather"). Inside a tool, `self.client` is
    the driver's AsyncClient (for its own syscalls) and `caller_pid()` the
    calling process.
    """

    namespace: str = ""
    tools: dict[str, ToolSpec] = {}  # filled per subclass, by __init_subclass__
    client: AsyncClient | None = None  # set by serve()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "namespace" not in cls.__dict__:
            ns = cls.__name__.lower()
            if ns.endswith("driver") and len(ns) > len("driver"):
                ns = ns[: -len("driver")]
            cls.namespace = ns
        found: dict[str, ToolSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr, fn in vars(klass).items():
                mark = getattr(fn, _MARK, None)
                if isinstance(mark, _Mark):
                    spec = _spec(attr, fn, mark)
                    found = {k: v for k, v in found.items() if v.method != attr}
                    found[spec.name] = spec
        clash = sorted(t.method for t in found.values() if t.method in _RESERVED)
        if clash:
            raise TypeError(f"{cls.__name__}: methods {clash} shadow Driver attributes; "
                            "rename them and keep the tool name with @tool(name=...)")
        cls.tools = found

    def describe(self) -> list[dict]:
        """The `tools` argument of `drv.register`."""
        return [spec.describe() for spec in self.tools.values()]

    # --- serving ------------------------------------------------------------------
    def run(self) -> None:
        """Connect (zero configuration inside a spawned process), register, serve
        until the kernel closes the connection. Blocks."""
        try:
            trio.run(self.serve)
        except BaseExceptionGroup as group:
            raise sole_error(group) from None

    async def serve(self, client: AsyncClient | None = None, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Register the namespace and serve requests until the connection closes.

        With `client=None` it opens its own connection. `task_status.started()`
        is called once registered, so `await nursery.start(d.serve, c)` returns
        when the tools are callable.
        """
        if client is None:
            async with own_process(f"driver:{self.namespace}") as c:
                await self.serve(c, task_status=task_status)
            return
        if not self.tools:
            raise TypeError(f"{type(self).__name__} has no @tool methods")
        await client.drv.register(self.namespace, self.describe())
        self.client = client
        log.info("serving %d tools under %r", len(self.tools), self.namespace)
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for req_id, name, args, caller in requests(client):
                nursery.start_soon(self._serve_one, client, req_id, name, args, caller)
        log.info("the kernel closed the connection; %r is no longer served", self.namespace)

    async def _serve_one(self, client: AsyncClient, req_id: int, name: str, args: Any,
                         caller: int) -> None:
        result, error = None, None
        try:
            raw = await self.call_tool(name, args or {}, caller)
        except Exception as e:  # every failure is answered: the caller must not hang
            error = exception_to_error(e)
            if error["name"] == "EIO":
                log.error("tool %s failed:\n%s", name, traceback.format_exc())
        else:
            try:
                result = to_wire(raw)
                size = len(msgpack.packb(result))
            except Exception as e:  # the driver's bug, not the caller's arguments
                result, error = None, {"name": "EIO",
                                       "message": f"{name} returned a bad result: {e}"}
            else:
                # An oversized frame would make the kernel close this connection.
                if size > MAX_RESULT_BYTES:
                    result, error = None, {
                        "name": "EMSGSIZE",
                        "message": f"{name}'s result is {size} bytes; the limit is "
                                   f"{MAX_RESULT_BYTES}"}
        await _reply(client, req_id, result, error)

    async def call_tool(self, name: str, args: dict, caller: int | None = None) -> Any:
        """Run one tool with wire arguments (full "ns.tool" or bare name) and
        return its raw result. Exceptions propagate."""
        short = name[len(self.namespace) + 1:] if name.startswith(self.namespace + ".") else name
        spec = self.tools.get(short)
        if spec is None:
            raise ERRORS["ENOENT"](f"no tool {name!r} in driver {self.namespace!r}")
        if not isinstance(args, dict):
            raise ERRORS["EINVAL"](f"arguments of {name} must be an object")
        unknown = set(args) - set(spec.hints)
        if unknown:
            raise ERRORS["EINVAL"](f"{name}: unknown arguments {sorted(unknown)}")
        kwargs = {k: from_wire(v, spec.hints[k]) for k, v in args.items()}
        method = getattr(self, spec.method)
        token = _caller.set(caller)
        try:
            if spec.is_async:
                return await method(**kwargs)
            # to_thread copies the context, so caller_pid() works in the thread too
            return await trio.to_thread.run_sync(lambda: method(**kwargs))
        finally:
            _caller.reset(token)


async def _reply(client: AsyncClient, req_id: int, result: Any, error: dict | None) -> None:
    try:
        await client.drv.reply(req_id, result, error)
    except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the connection is gone; the kernel fails the caller with EIO
    except (KernelError, TypeError, ValueError, OverflowError) as e:  # refused or unencodable
        if isinstance(e, KernelError) and e.name == "ENOENT":
            log.info("drv.reply(%d): the caller is no longer waiting (%s)", req_id, e.message)
            return
        if error is not None:
            log.warning("drv.reply(%d) refused: %s", req_id, e)
            return
        # The kernel refused the result: tell the caller why, instead of
        # letting it wait for its timeout.
        log.warning("drv.reply(%d) refused the result: %s", req_id, e)
        try:
            await client.drv.reply(req_id, None, {"name": "EIO",
                                                  "message": f"the driver's result: {e}"})
        except (KernelError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


_RESERVED = frozenset({"run", "serve", "describe", "call_tool", "tools", "namespace", "client"})


def _spec(attr: str, fn: Callable, mark: _Mark) -> ToolSpec:
    summary, arg_docs = parse_docstring(inspect.getdoc(fn))
    hints = param_hints(fn)
    params = list(inspect.signature(fn).parameters)[1:]
    return ToolSpec(
        name=mark.name or attr,
        description=mark.description or summary or attr.replace("_", " "),
        schema=schema_for(fn, arg_docs),
        method=attr,
        is_async=inspect.iscoroutinefunction(fn),
        hints={p: hints.get(p, Any) for p in params},
    )


# --- loading and launching -----------------------------------------------------------------

def load_driver_class(path: str | Path, name: str | None = None) -> type[Driver]:
    """Import a Python file and return its Driver subclass (the one named
    `name`, else the only one defined in the file)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no driver file {path}")
    modname = "llmos_driver_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module  # dataclasses and pickling look modules up by name
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the driver's own helper modules
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: say where and why, not a raw traceback
        raise ImportError(_load_failure(path, e)) from None
    if name is not None:
        cls = getattr(module, name, None)
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            raise LookupError(f"{path} has no Driver subclass named {name!r}")
        return cls
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, Driver) and c is not Driver
             and c.__module__ == modname and c.tools]
    if not found:
        raise LookupError(f"{path} defines no Driver subclass with @tool methods")
    if len(found) > 1:
        names = ", ".join(c.__name__ for c in found)
        raise LookupError(f"{path} defines several drivers ({names}): name one")
    return found[0]


def _load_failure(path: Path, exc: Exception) -> str:
    line = next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__))
                 if f.filename == str(path)), None)
    where = f"{path}:{line}" if line else str(path)
    msg = f"{where}: {type(exc).__name__}: {exc}"
    if isinstance(exc, TypeError) and "not subscriptable" in str(exc):
        msg += ("\n(a method named like a builtin, e.g. `def list`, hides it from the "
                "annotations below it in the class body: name the method otherwise and keep "
                "the tool's name with @tool(name=\"list\"))")
    return msg


def cli_run(client: Any, path: str, name: str | None, caps: list[str] | None,
            timeout: float = 30.0) -> int:
    """`llmos driver run FILE [--class NAME] [--cap ...]`: spawn the driver as a
    process of the caller and wait until its namespace is served; its pid.

    The file is imported here first, to learn the namespace and to fail early
    on an error in it. With an explicit capability list, drv.register is added.
    """
    path = str(Path(path).resolve())
    cls = load_driver_class(path, name)
    ns = cls.namespace
    argv = [sys.executable, "-m", "llmagentos.driver", path] + ([cls.__name__] if name else [])
    served = [t for t in client.tool.list(ns) if t["name"].startswith(ns + ".")]
    if served:
        raise ERRORS["EEXIST"](f"namespace {ns!r} is already served"
                               f" (by pid {served[0].get('driver')})")
    if caps is not None and not _caps.covers(caps, "drv.register"):
        caps = [*caps, "drv.register"]
    pid = client.proc.spawn(argv, name=f"driver:{ns}", caps=caps)
    deadline = time.monotonic() + timeout
    while True:
        if any(t["name"].startswith(ns + ".") for t in client.tool.list(ns)):
            return pid
        state = client.proc.stat(pid)["state"]
        if state == "ZOMBIE":
            try:
                st = client.proc.wait(pid, 1.0)
                how = (f"was killed by {st['signal_name']}" if st.get("signal_name")
                       else f"exited with status {st.get('exit_code')}")
            except KernelError:
                how = "exited"
            raise ERRORS["EIO"](f"driver {cls.__name__} (pid {pid}) {how} before serving "
                                f"{ns!r}:\n{_log_tail(client, pid)}")
        if time.monotonic() > deadline:
            client.proc.kill(pid, "SIGKILL")
            raise ERRORS["ETIMEDOUT"](f"driver {cls.__name__} (pid {pid}) did not register "
                                      f"{ns!r} within {timeout:g}s; killed it:\n"
                                      f"{_log_tail(client, pid)}")
        time.sleep(0.05)


def _log_tail(client: Any, pid: int, chars: int = 2000) -> str:
    data, offset = b"", 0
    try:
        while True:
            chunk = client.proc.logs(pid, offset, 1 << 20)
            data = (data + chunk["data"])[-4 * chars:]
            if chunk["offset"] == offset:
                break
            offset = chunk["offset"]
    except KernelError as e:
        return f"(no log: {e})"
    text = data.decode("utf-8", "replace")[-chars:]
    return text or "(the log is empty)"


def main(argv: list[str] | None = None) -> int:
    """`python -m llmagentos.driver FILE [CLASS]`: the program a driver process runs."""
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m llmagentos.driver FILE [CLASS]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s driver %(levelname)s %(message)s")
    try:
        cls = load_driver_class(argv[0], argv[1] if len(argv) > 1 else None)
    except (OSError, ImportError, LookupError, SyntaxError, TypeError) as e:
        print(f"llmagentos.driver: {e}", file=sys.stderr)
        return 1
    try:
        cls().run()
    except KernelError as e:
        print(f"llmagentos.driver: {cls.__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["Driver", "tool", "ToolSpec", "caller_pid", "schema_for", "schema_for_type",
           "parse_docstring", "to_wire", "from_wire", "exception_to_error",
           "sole_error", "load_driver_class", "cli_run", "main"]


if __name__ == "__main__":
    # Run the package's copy of this module: the driver file subclasses
    # llmagentos.driver.Driver, not this __main__ module's Driver.
    from llmagentos.driver import main as _main
    sys.exit(_main())
