"""Handlers of the `tool` and `drv` groups, and the kernel's own tools.

`tool.call(name, args)` checks, in order: the tool exists (ENOENT), the caller
holds `tool:<name>` (EACCES) and any extra capability the tool needs, its
tool-call quota (EDQUOT), the arguments against the tool's JSON schema
(EINVAL with the validator's message). Then it runs the in-kernel handler in
a worker thread, or asks the userland driver that serves it. At the call's
timeout it answers ETIMEDOUT then and there: a cancellable handler (exec.run)
is told to stop and kills its work, any other thread is abandoned.

exec.run: each process's runs live in one group (kernel/cgroups.py,
`x<pid>`) whose memory and pids caps bound all of them together, one subgroup
per run; the group dies with the process. The code runs as the process's own
uid (`pcb.uid` when set, else `exec_uid(pid)`), and its scratch dir's writes
count against the process's sandbox quota while it runs.
"""

from __future__ import annotations

import errno
import functools
import itertools
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from llmagentos.drivers import builtin_tools
from llmagentos.drivers.execbox import DiskQuota, ExecLimits, exec_uid, run_code
from llmagentos.syscalls.errno import SyscallError

from . import perms
from .dispatch import Call, handler
from .proc import PCB
from .sysctx import identity
from .sysfs import sandbox_of
from .tools import Tool, ToolTable

if TYPE_CHECKING:
    from .services import Services

MAX_TOOL_TIMEOUT = 600.0


def kernel_tools(services: "Services", state_dir: Path) -> ToolTable:
    """calc, clock and kv from drivers/builtin_tools.py, plus files.* and exec.run
    over the caller's sandbox."""
    table = ToolTable()
    kv = table.kv = builtin_tools.open_kv(str(state_dir / "kv.db"))
    for t in builtin_tools.builtin_tools(kv).values():
        table.add(Tool(t.name, t.description, t.schema,
                       handler=lambda pcb, args, h=t.handler: h(identity(pcb), args)))
    obj = {"$schema": builtin_tools.SCHEMA_DIALECT, "type": "object",
           "additionalProperties": False}
    path = {"type": "string", "minLength": 1, "maxLength": 4096}

    def files_read(pcb: PCB, args: dict) -> dict:
        data = sandbox_of(services, pcb).read_file(args["path"])
        return {"text": data.decode("utf-8", "replace"), "bytes": len(data)}

    def files_write(pcb: PCB, args: dict) -> dict:
        sb = sandbox_of(services, pcb)
        parent = args["path"].rstrip("/").rpartition("/")[0]
        if parent:  # a model should not have to mkdir first
            sb.mkdir(parent, parents=True)
        return {"bytes": sb.write_file(args["path"], args["text"],
                                       append=args.get("append", False))}

    def files_list(pcb: PCB, args: dict) -> dict:
        return {"entries": sandbox_of(services, pcb).listdir(args.get("path", "/"))}

    run_ids = itertools.count(1)
    first_run = threading.Lock()

    def exec_group(pcb: PCB) -> Any:
        """The group of all the process's exec runs, made at its first run."""
        c = services.containment
        if c is None:
            return None
        with first_run:
            if pcb.exec_group is None:
                mem = min(services.config.exec_memory, pcb.limits.get("exec_memory", math.inf))
                try:
                    pcb.exec_group = c.create(f"x{pcb.pid}", memory_bytes=int(mem),
                                              pids_max=services.config.exec_pids)
                except OSError as e:
                    raise SyscallError("EAGAIN", f"no exec group: {e.strerror}") from None
        if pcb.exited:  # it exited meanwhile: its runs die with it
            pcb.exec_group.remove()
            raise SyscallError("ESRCH", f"pid {pcb.pid} has exited")
        return pcb.exec_group

    def exec_run(pcb: PCB, args: dict, cancel: threading.Event) -> dict:
        sb = sandbox_of(services, pcb)
        limits = ExecLimits(wall_s=float(args.get("timeout", 10)),
                            cpu_s=float(args.get("timeout", 10)))
        box = exec_group(pcb)
        try:
            run = box.child(f"r{next(run_ids)}") if box is not None else None
        except OSError as e:
            if pcb.exited or box.removed:
                raise SyscallError("ESRCH", f"pid {pcb.pid} has exited") from None
            if e.errno == errno.ENOMEM:  # a memory cap too small to hold even a cgroup
                raise SyscallError("ENOMEM", "the process's exec memory cap is too small "
                                             "to start a run") from None
            raise SyscallError("EAGAIN", f"no group for the run: {e.strerror}") from None
        uid = getattr(pcb, "uid", None)
        try:
            res = run_code(args["lang"], args["code"], sb.root, limits,
                           uid=exec_uid(pcb.pid) if uid is None else uid, group=run,
                           cancel=cancel, disk=DiskQuota(sb.quota.max_bytes, sb.quota.max_files))
        finally:
            if run is not None:
                run.remove()
        sb.rescan()  # what the code wrote counts against the quota
        return {"exit_code": res.exit_code, "signal": res.signal, "stdout": res.stdout,
                "stderr": res.stderr, "truncated": res.truncated, "timed_out": res.timed_out,
                "wall_s": res.wall_s, "isolation": res.isolation, "errno": res.errno}

    table.add(Tool("files.read", "Read a text file from your sandbox.",
                   {**obj, "properties": {"path": path}, "required": ["path"]},
                   handler=files_read, cap="fs.read"))
    table.add(Tool("files.write", "Write (or append) a text file in your sandbox.",
                   {**obj, "properties": {"path": path, "text": {"type": "string"},
                                          "append": {"type": "boolean"}},
                    "required": ["path", "text"]}, handler=files_write, cap="fs.write"))
    table.add(Tool("files.list", "List a directory of your sandbox.",
                   {**obj, "properties": {"path": path}}, handler=files_list, cap="fs.read"))
    table.add(Tool("exec.run", "Run Python or shell code in your sandbox directory, with "
                               "CPU, memory, process and time limits; returns its output.",
                   {**obj, "properties": {"lang": {"enum": ["python", "sh"]},
                                          "code": {"type": "string", "maxLength": 100_000},
                                          "timeout": {"type": "number", "exclusiveMinimum": 0,
                                                      "maximum": 60}},
                    "required": ["lang", "code"]}, handler=exec_run, cap="exec",
                   cancellable=True))
    return table


def _visible(pcb: PCB, tool: Tool) -> bool:
    return perms.may_use_tool(pcb, tool.name, tool.cap)


@handler("tool.list")
async def tool_list(call: Call, namespace: str | None) -> list:
    tools = call.sys.tools.tools.values()
    return [t.describe() for t in sorted(tools, key=lambda t: t.name)
            if _visible(call.caller, t)
            and (namespace is None or t.name.startswith(namespace + "."))]


@handler("tool.describe")
async def tool_describe(call: Call, name: str) -> dict:
    return call.sys.tools.get(name).describe()


@handler("tool.call", runs="task")
async def tool_call(call: Call, name: str, args: dict | None, timeout: float) -> Any:
    table, pcb = call.sys.tools, call.caller
    tool = table.get(name)
    perms.check_tool(pcb, name, tool.cap)
    limit = pcb.limits.get("tool_calls")
    if limit is not None and pcb.usage.tool_calls >= limit:
        raise SyscallError("EDQUOT", f"tool-call limit {int(limit)} reached")
    if not 0 < timeout <= MAX_TOOL_TIMEOUT:
        raise SyscallError("EINVAL", f"timeout must be in (0, {MAX_TOOL_TIMEOUT}]")
    args = args or {}
    deadline = trio.current_time() + timeout
    # The timeout holds from here: validating (a worker thread; an abandoned one
    # still counts against the caller's share of them) and running.
    with trio.move_on_at(deadline) as checking:
        await call.in_thread(tool.check, args, abandon_on_cancel=True)
    if checking.cancelled_caught:
        raise SyscallError("ETIMEDOUT", f"{name}: checking its arguments took over {timeout}s")
    if limit is not None and pcb.usage.tool_calls >= limit:  # again: others ran meanwhile
        raise SyscallError("EDQUOT", f"tool-call limit {int(limit)} reached")
    pcb.usage.tool_calls += 1
    if tool.driver is not None:
        pcb.waiting_calls += 1
        try:
            return await table.call_driver(tool, pcb, args, deadline - trio.current_time())
        finally:
            pcb.waiting_calls -= 1
    cancel = threading.Event()
    work = functools.partial(tool.handler, pcb, args, *([cancel] if tool.cancellable else []))
    try:
        with trio.move_on_at(deadline):
            return await call.in_thread(work, abandon_on_cancel=True)
    finally:
        cancel.set()  # timed out or cancelled: a cancellable handler kills its work
    raise SyscallError("ETIMEDOUT", f"{name} did not finish within {timeout}s")


@handler("drv.register", runs="task")
async def drv_register(call: Call, namespace: str, tools: list) -> list:
    table = call.sys.tools
    table.check_namespace(namespace)
    checked = await call.in_thread(table.check_tools, tools)  # compiles every schema
    return table.register(call.caller.pid, call.conn, namespace, checked)


@handler("drv.reply")
async def drv_reply(call: Call, req_id: int, result: Any, error: dict | None) -> None:
    call.sys.tools.reply(call.caller.pid, req_id, result, error)


@handler("drv.unregister")
async def drv_unregister(call: Call, namespace: str) -> None:
    drv = call.sys.tools.drivers.get(namespace)
    if drv is None:
        raise SyscallError("ENOENT", f"no driver serves {namespace!r}")
    perms.check_unregister(call.caller, namespace, drv.pid)
    call.sys.tools.unregister(namespace, "unregistered")
