"""The tool table: every tool the kernel can dispatch to, in-kernel or userland.

A tool is `namespace.name`, a description and a JSON schema of its argument
object. In-kernel tools (calc, clock, kv, fs, exec) have a handler run in a
worker thread; userland tools belong to a driver process, a microkernel
server: a call becomes a `drv.request` notification on the driver's
connection and the driver answers with `drv.reply`.

Invariants: a namespace belongs to one driver (or the kernel); when a driver
goes away (unregister, exit, or its connection closes) its tools disappear
and every call still waiting on it fails with EIO.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import jsonschema
import trio

from llmagentos.syscalls.errno import ERRNO, SyscallError

if TYPE_CHECKING:
    from .proc import PCB
    from .server import Connection

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MAX_TOOLS_PER_DRIVER = 256

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
    validator: Any = None

    def __post_init__(self) -> None:
        self.validator = jsonschema.Draft202012Validator(self.schema)

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "schema": self.schema,
                "driver": self.driver.pid if self.driver else None}

    def check(self, args: dict) -> None:
        err = jsonschema.exceptions.best_match(self.validator.iter_errors(args))
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
    def register(self, pid: int, conn: "Connection", namespace: str, tools: list) -> list[str]:
        if not NAME_RE.match(namespace):
            raise SyscallError("EINVAL", f"namespace {namespace!r} must match {NAME_RE.pattern}")
        if namespace in self.namespaces():
            raise SyscallError("EEXIST", f"namespace {namespace!r} is already served")
        if not tools or len(tools) > MAX_TOOLS_PER_DRIVER:
            raise SyscallError("EINVAL", f"a driver serves 1..{MAX_TOOLS_PER_DRIVER} tools")
        drv = Driver(pid, namespace, conn)
        new: list[Tool] = []
        for t in tools:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise SyscallError("EINVAL", "each tool is a map with a string name")
            if not NAME_RE.match(t["name"]):
                raise SyscallError("EINVAL", f"tool name {t['name']!r} must match "
                                             f"{NAME_RE.pattern}")
            schema = t.get("schema") or {"type": "object"}
            if not isinstance(schema, dict):
                raise SyscallError("EINVAL", f"{t['name']}: schema must be a map")
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise SyscallError("EINVAL", f"{t['name']}: invalid JSON schema: {e.message}") \
                    from None
            new.append(Tool(f"{namespace}.{t['name']}", str(t.get("description", "")), schema,
                            driver=drv))
        if len({t.name for t in new}) != len(new):
            raise SyscallError("EINVAL", "duplicate tool names")
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
