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

The schema comes from the type hints and the docstring (`schema`). Requests
are served concurrently: async tools as trio tasks, sync tools in worker
threads. Arguments are converted to the hinted types and results to
msgpack-safe values (`convert`); exceptions become errnos
(`errors.exception_to_error`). Loading a driver file and the program a driver
process runs (`python -m llmagentos.driver FILE`) are in `driver_cli`.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from llmagentos.syscalls.wire import DEFAULT_MAX_FRAME

from .aclient import AsyncClient, aconnect
from .convert import from_wire, to_wire
from .driver_cli import cli_run, load_driver_class, main
from .errors import ERRORS, KernelError, exception_to_error, sole_error
from .schema import SCHEMA_DIALECT, param_hints, parse_docstring, schema_for, schema_for_type

log = logging.getLogger("llmagentos.driver")

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


# --- serving: what a driver and the MCP bridge share ----------------------------------------

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

async def reply(client: AsyncClient, req_id: int, name: str, result: Any = None,
                error: dict | None = None) -> None:
    """Answer the drv.request `req_id` for the tool `name`: with `error`, else
    with `result` made wire-safe. A result that cannot go out is answered as an
    error for the server: unconvertible EIO, over the frame limit EMSGSIZE (sent,
    it would make the kernel close this connection and unregister every tool)."""
    if error is None:
        result, error = _wire_result(name, result)
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


def _wire_result(name: str, raw: Any) -> tuple[Any, dict | None]:
    """(result, None) ready for drv.reply, or (None, error) when it cannot be sent."""
    try:
        result = to_wire(raw)
        size = len(msgpack.packb(result))
    except Exception as e:  # the server's bug, not the caller's arguments
        return None, {"name": "EIO", "message": f"{name} returned a bad result: {e}"}
    if size > MAX_RESULT_BYTES:
        return None, {"name": "EMSGSIZE", "message": f"{name}'s result is {size} bytes; "
                                                     f"the limit is {MAX_RESULT_BYTES}"}
    return result, None


# --- the Driver base class -----------------------------------------------------------------

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
            result = await self.call_tool(name, args or {}, caller)
        except Exception as e:  # every failure is answered: the caller must not hang
            error = exception_to_error(e)
            if error["name"] == "EIO":
                log.error("tool %s failed:\n%s", name, traceback.format_exc())
        await reply(client, req_id, name, result, error)

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


# The SDK's names, all importable from here (the schema, value, error and loading
# helpers live in their own modules).
__all__ = ["Driver", "tool", "ToolSpec", "caller_pid", "schema_for", "schema_for_type",
           "parse_docstring", "param_hints", "SCHEMA_DIALECT", "to_wire", "from_wire",
           "exception_to_error", "sole_error", "load_driver_class", "cli_run", "main"]


if __name__ == "__main__":
    # main() loads the driver file against the package's copy of this module:
    # the file subclasses llmagentos.driver.Driver, not this __main__ one's.
    sys.exit(main())
