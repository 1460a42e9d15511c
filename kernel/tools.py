"""The tool table: every tool the kernel can dispatch to, in-kernel or userland.

A tool is `namespace.name`, a description and a JSON schema of its argument
object. In-kernel tools (calc, clock, kv, fs, exec) have a handler run in a
worker thread; userland tools belong to a driver process, a microkernel
server: a call becomes a `drv.request` notification on the driver's
connection and the driver answers with `drv.reply`.

Invariants: a namespace belongs to one driver (or the kernel); when a driver
goes away (unregister, exit, or its connection closes) its tools disappear
and every call still waiting on it fails with EIO.

Schemas cannot freeze the kernel: every regular expression in a schema
(`pattern`, `patternProperties`) is compiled with RE2 at `drv.register` and
matched with it, in time linear in the text; Python's backtracking `re`
took 9-12 s on `^(a+)+$` against 28 characters, doubling per character. A
pattern RE2 cannot compile (backreferences, lookaround) is EINVAL at
register, as is `unevaluatedProperties` beside `patternProperties` (its
evaluation would fall back to `re`). Validation itself runs in a worker
thread, under the call's timeout (kernel/systool.py).
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import re2
import trio

from llmagentos.syscalls.errno import ERRNO, SyscallError

if TYPE_CHECKING:
    from .proc import PCB
    from .server import Connection

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MAX_TOOLS_PER_DRIVER = 256
MAX_PATTERN = 4096  # characters of one regular expression in a schema


def _re2_options() -> Any:
    o = re2.Options()
    o.log_errors = False  # a bad pattern is the caller's EINVAL, not a kernel log line
    o.never_capture = True
    o.max_mem = 1 << 20
    return o


_RE2_OPTIONS = _re2_options()


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """A schema's regular expression as RE2 (linear-time matching)."""
    if len(pattern) > MAX_PATTERN:
        raise SyscallError("EINVAL", f"pattern longer than {MAX_PATTERN} characters")
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) \
            else str(e)
        raise SyscallError("EINVAL", f"pattern {pattern[:80]!r} is not supported "
                                     f"(RE2 syntax, no backreferences or lookaround): {msg}") \
            from None


def _pattern(validator: Any, patrn: str, instance: Any, schema: dict) -> Iterator:
    from jsonschema import ValidationError

    if validator.is_type(instance, "string") and not compile_pattern(patrn).search(instance):
        yield ValidationError(f"{instance[:80]!r} does not match {patrn!r}")


def _pattern_properties(validator: Any, pp: dict, instance: Any, schema: dict) -> Iterator:
    if not validator.is_type(instance, "object"):
        return
    for patrn, subschema in pp.items():
        rx = compile_pattern(patrn)
        for k, v in instance.items():
            if rx.search(k):
                yield from validator.descend(v, subschema, path=k, schema_path=patrn)


def _additional_properties(validator: Any, ap: Any, instance: Any, schema: dict) -> Iterator:
    if not validator.is_type(instance, "object"):
        return
    props = schema.get("properties", {})
    patterns = [compile_pattern(p) for p in schema.get("patternProperties", {})]
    extras = [k for k in instance
              if k not in props and not any(rx.search(k) for rx in patterns)]
    if validator.is_type(ap, "object"):
        for k in extras:
            yield from validator.descend(instance[k], ap, path=k)
    elif not ap and extras:
        from jsonschema import ValidationError

        listed = ", ".join(repr(k) for k in sorted(extras)[:10])
        yield ValidationError(f"Additional properties are not allowed ({listed} "
                              f"{'was' if len(extras) == 1 else 'were'} unexpected)")


@functools.cache
def schema_validator() -> Any:
    """Draft 2020-12 with RE2 for every regular expression. Made on first use:
    jsonschema takes a tenth of a second to import, and a kernel that runs no
    tool should not boot slower for it."""
    import jsonschema

    return jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        {"pattern": _pattern, "patternProperties": _pattern_properties,
         "additionalProperties": _additional_properties})


def check_schema(schema: dict) -> None:
    """A schema a driver registers: valid Draft 2020-12, and every regular
    expression in it compiled by RE2 (EINVAL otherwise)."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SyscallError("EINVAL", f"invalid JSON schema: {e.message[:300]}") from None
    except RecursionError:
        raise SyscallError("EINVAL", "JSON schema nested too deeply") from None
    stack, has_pp, has_unevaluated = [schema], False, False
    while stack:  # iterative: a schema is as deep as the wire allows
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("pattern"), str):
            compile_pattern(node["pattern"])
        pp = node.get("patternProperties")
        if isinstance(pp, dict):
            has_pp = True
            for p in pp:
                compile_pattern(p)
        has_unevaluated = has_unevaluated or "unevaluatedProperties" in node
        stack.extend(node.values())
    if has_pp and has_unevaluated:
        raise SyscallError("EINVAL", "unevaluatedProperties together with patternProperties "
                                     "is not supported")

Handler = Callable[["PCB", dict], Any]  # (caller, checked args) -> result; may raise SyscallError


@dataclass
class Driver:
    pid: int
    namespace: str
    conn: "Connection"
    pending: dict[int, trio.MemorySendChannel] = field(default_factory=dict)


@dataclass
class Tool:
    name: str
    description: str
    schema: dict
    handler: Handler | None = None  # in-kernel tools
    driver: Driver | None = None  # userland tools
    cap: str | None = None  # needed besides tool:<name> (exec needs "exec")
    # The handler takes a third argument, a threading.Event set when the call
    # times out or is cancelled; it must then stop its work (the thread is abandoned).
    cancellable: bool = False
    _validator: Any = None

    @property
    def validator(self) -> Any:
        if self._validator is None:
            self._validator = schema_validator()(self.schema)
        return self._validator

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "schema": self.schema,
                "driver": self.driver.pid if self.driver else None}

    def check(self, args: dict) -> None:
        """EINVAL unless args match the schema. Blocking (CPU): the kernel runs
        it in a worker thread."""
        import jsonschema
        import referencing.exceptions

        try:
            err = jsonschema.exceptions.best_match(self.validator.iter_errors(args))
        except (referencing.exceptions.Unresolvable, RecursionError) as e:
            raise SyscallError("EINVAL", f"{self.name}: its schema cannot be evaluated "
                                         f"({type(e).__name__})") from None
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "arguments"
            raise SyscallError("EINVAL", f"{self.name}: {where}: {err.message}")


class ToolTable:
    nursery: trio.Nursery | None = None  # where notifications to drivers are sent from

    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}
        self.drivers: dict[str, Driver] = {}  # namespace -> driver
        self.kv: Any = None  # the kv.* tools' per-identity store (systool.kernel_tools)
        self._req_ids = itertools.count(1)

    def add(self, tool: Tool) -> None:
        self.tools[tool.name] = tool

    def get(self, name: str) -> Tool:
        try:
            return self.tools[name]
        except KeyError:
            raise SyscallError("ENOENT", f"no tool {name!r}; see tool.list") from None

    def namespaces(self) -> set[str]:
        return {n.split(".", 1)[0] for n in self.tools}

    # --- userland drivers -------------------------------------------------------
    @staticmethod
    def check_tools(tools: list) -> list[tuple[str, str, dict]]:
        """A driver's tool list, checked: (name, description, schema) each.
        Blocking (schemas are compiled): the kernel runs it in a worker thread."""
        if not tools or len(tools) > MAX_TOOLS_PER_DRIVER:
            raise SyscallError("EINVAL", f"a driver serves 1..{MAX_TOOLS_PER_DRIVER} tools")
        out = []
        for t in tools:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise SyscallError("EINVAL", "each tool is a map with a string name")
            if not NAME_RE.match(t["name"]):
                raise SyscallError("EINVAL", f"tool name {t['name']!r:.80} must match "
                                             f"{NAME_RE.pattern}")
            schema = t.get("schema") or {"type": "object"}
            if not isinstance(schema, dict):
                raise SyscallError("EINVAL", f"{t['name']}: schema must be a map")
            try:
                check_schema(schema)
            except SyscallError as e:
                raise SyscallError("EINVAL", f"{t['name']}: {e.message}") from None
            out.append((t["name"], str(t.get("description", "")), schema))
        if len({name for name, _, _ in out}) != len(out):
            raise SyscallError("EINVAL", "duplicate tool names")
        return out

    def check_namespace(self, namespace: str) -> None:
        if not NAME_RE.match(namespace):
            raise SyscallError("EINVAL", f"namespace {namespace!r:.80} must match "
                                         f"{NAME_RE.pattern}")
        if namespace in self.namespaces():
            raise SyscallError("EEXIST", f"namespace {namespace!r} is already served")

    def register(self, pid: int, conn: "Connection", namespace: str,
                 tools: list[tuple[str, str, dict]]) -> list[str]:
        """Serve checked tools (see check_tools) under a namespace."""
        self.check_namespace(namespace)
        drv = Driver(pid, namespace, conn)
        new = [Tool(f"{namespace}.{name}", desc, schema, driver=drv)
               for name, desc, schema in tools]
        self.drivers[namespace] = drv
        for t in new:
            self.add(t)
        return [t.name for t in new]

    def unregister(self, namespace: str, reason: str) -> None:
        drv = self.drivers.pop(namespace, None)
        if drv is None:
            return
        for name in [n for n, t in self.tools.items() if t.driver is drv]:
            del self.tools[name]
        for ch in drv.pending.values():  # every waiting caller gets EIO
            ch.send_nowait(SyscallError("EIO", f"driver {namespace!r} (pid {drv.pid}) {reason}"))
        drv.pending.clear()

    def drop_pid(self, pid: int, reason: str) -> None:
        """The driver's process exited (or was killed while its OS process
        lives on, as an attached driver does): its tools go, and its connection
        hears so, so that the program stops serving."""
        for ns in [ns for ns, d in self.drivers.items() if d.pid == pid]:
            conn = self.drivers[ns].conn
            self.unregister(ns, reason)
            if self.nursery is not None and not conn.closed:
                self.nursery.start_soon(_tell_unregistered, conn, ns, reason)

    def drop_conn(self, conn: "Connection") -> None:
        for ns in [ns for ns, d in self.drivers.items() if d.conn is conn]:
            self.unregister(ns, "closed its connection")

    async def call_driver(self, tool: Tool, caller: "PCB", args: dict, timeout: float) -> Any:
        drv = tool.driver
        req_id = next(self._req_ids)
        send, recv = trio.open_memory_channel(1)
        drv.pending[req_id] = send
        try:
            try:
                await drv.conn.notify("drv.request", [req_id, tool.name, args, caller.pid])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise SyscallError("EIO", f"driver {drv.namespace!r} is unreachable") from None
            with trio.move_on_after(timeout) as scope:
                outcome = await recv.receive()
            if scope.cancelled_caught:
                raise SyscallError("ETIMEDOUT", f"{tool.name} did not answer within {timeout}s")
        finally:
            drv.pending.pop(req_id, None)
        if isinstance(outcome, SyscallError):
            raise outcome
        return outcome

    def reply(self, pid: int, req_id: int, result: Any, error: dict | None) -> None:
        for drv in self.drivers.values():
            if drv.pid == pid and req_id in drv.pending:
                ch = drv.pending.pop(req_id)
                if error is None:
                    ch.send_nowait(result)
                else:
                    name = error.get("name") if isinstance(error, dict) else None
                    msg = str(error.get("message", "")) if isinstance(error, dict) else ""
                    if name not in ERRNO:
                        name, msg = "EIO", f"driver error: {error!r:.300}"
                    ch.send_nowait(SyscallError(name, msg))
                return
        raise SyscallError("ENOENT", f"no pending request {req_id} for pid {pid} "
                                     "(answered already, timed out, or not yours)")


async def _tell_unregistered(conn: "Connection", namespace: str, reason: str) -> None:
    try:
        await conn.notify("drv.unregistered", [namespace, reason])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
