"""Who may do what to whom: every permission rule of the kernel, in one place.

Handlers and the process table ask here and raise what these raise; no rule
is written twice. Capabilities themselves (what a set covers, what a child
inherits) are the ABI's: syscalls/caps.py. The rules:

- **signals, renice, limits, logs**: a process acts on itself and its
  descendants; `proc.kill_any` on anyone but init. Lowering a nice value
  needs `proc.renice`; raising a limit needs `proc.kill_any`. A reaped
  process's log stays readable by those who were its ancestors at exit.
- **children**: capabilities within the parent's bounding set; limits no
  higher than the parent's (unless `proc.kill_any`); nice no lower (unless
  `proc.renice`); no more live children than `max_children` (EAGAIN).
- **names**: kernel/names.py (`NameTable.claim`): a name is taken up by its
  owner, init, or a holder of `agent.adopt`; never while held.
- **contexts and long-term memory**: a process's own identity; `shared:*`
  namespaces with `mem.shared`; init everything.
- **shared blocks**: reading block NAME needs `ctx.block.read:NAME` or
  `ctx.block.write:NAME`; writing, creating and deleting it the latter (NAME
  may be a glob in the held capability: `ctx.block.write:team-*`).
- **services**: `svc.admin` starts, stops and restarts them; a service's
  capabilities are within its starter's bounding set.
- **files**: opening for writing needs `fs.write`; `/shared` is writable
  with `fs.shared`.
- **tools and drivers**: calling (and seeing) a tool needs `tool:<name>`
  and the tool's own capability; a driver's namespace is unregistered by
  the process serving it, or by init.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmagentos.syscalls import caps as capmod
from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.table import check_limit

if TYPE_CHECKING:
    from .proc import PCB, ProcessTable

INIT_PID = 1


def holds(pcb: "PCB", cap: str) -> bool:
    return capmod.covers(pcb.caps, cap)


# --- processes ----------------------------------------------------------------------------
def may_signal(procs: "ProcessTable", caller: "PCB", target: "PCB") -> bool:
    return holds(caller, "proc.kill_any") or procs.is_descendant(target.pid, caller.pid)


def check_signal(procs: "ProcessTable", caller: "PCB", target: "PCB") -> None:
    if target.pid == INIT_PID:
        raise SyscallError("EPERM", "init cannot be signalled")
    if not may_signal(procs, caller, target):
        raise SyscallError("EPERM", f"pid {caller.pid} may not signal pid {target.pid} "
                                    "(not a descendant; needs proc.kill_any)")


def check_renice(procs: "ProcessTable", caller: "PCB", target: "PCB", value: int) -> None:
    if target.pid == INIT_PID or not may_signal(procs, caller, target):
        raise SyscallError("EPERM", f"pid {caller.pid} may not renice pid {target.pid}")
    if value < target.nice and not holds(caller, "proc.renice"):
        raise SyscallError("EACCES", "lowering nice needs proc.renice")


def check_setlimit(procs: "ProcessTable", caller: "PCB", target: "PCB", name: str,
                   value: float | None) -> None:
    if target.pid == INIT_PID or not may_signal(procs, caller, target):
        raise SyscallError("EPERM", f"pid {caller.pid} may not change limits of pid "
                                    f"{target.pid}")
    old = target.limits.get(name)
    raising = old is not None and (value is None or value > old)
    if raising and not holds(caller, "proc.kill_any"):
        raise SyscallError("EACCES", "raising a limit needs proc.kill_any")


def check_logs(procs: "ProcessTable", caller: "PCB", pid: int,
               readers_at_exit: frozenset[int]) -> None:
    """As for signals: the process itself, its ancestors, or proc.kill_any."""
    if holds(caller, "proc.kill_any"):
        return
    target = procs.procs.get(pid)
    ok = may_signal(procs, caller, target) if target is not None else \
        caller.pid in readers_at_exit
    if not ok:
        raise SyscallError("EPERM", f"pid {caller.pid} may not read the output of pid {pid} "
                                    "(not itself or a descendant; needs proc.kill_any)")


def child_rights(parent: "PCB", caps: list | None, limits: dict | None, nice: int,
                 live_children: int) -> tuple[list[str], dict[str, Any]]:
    """What a new child may hold: caps within the parent's bounding set,
    limits no higher than the parent's, nice no lower; EAGAIN past
    max_children."""
    if caps is None:
        caps = capmod.default_child(parent.caps)
    if not all(isinstance(c, str) for c in caps):
        raise SyscallError("EINVAL", "caps must be a list of strings")
    excess = capmod.bounded(parent.caps, caps)
    if excess:
        raise SyscallError("EACCES", f"capabilities not held by the parent: {excess}")
    lim = dict(parent.limits)
    lim.pop("wall_time", None)  # a deadline is the parent's own, not inherited
    for k, v in (limits or {}).items():
        v = check_limit(k, v)
        if k in parent.limits and v > parent.limits[k] and not holds(parent, "proc.kill_any"):
            raise SyscallError("EACCES", f"limit {k!r} above the parent's ({parent.limits[k]})")
        lim[k] = v
    if not -20 <= nice <= 19:
        raise SyscallError("EINVAL", "nice must be in -20..19")
    if nice < parent.nice and not holds(parent, "proc.renice"):
        raise SyscallError("EACCES", "a lower nice than the parent's needs proc.renice")
    maxc = parent.limits.get("max_children")
    if maxc is not None and live_children >= maxc:
        raise SyscallError("EAGAIN", f"pid {parent.pid} has {live_children} live children "
                                     f"(limit max_children={int(maxc)})")
    return list(caps), lim


# --- memory -------------------------------------------------------------------------------
def mem_namespace(pcb: "PCB", own: str, ns: str | None) -> str:
    """The long-term memory namespace a call acts on: its own identity by
    default; `shared:*` with mem.shared; another's only for init."""
    if ns is None or ns == own:
        return own
    if ns.startswith("shared:"):
        if not holds(pcb, "mem.shared"):
            raise SyscallError("EACCES", f"namespace {ns!r} needs capability mem.shared")
        return ns
    if pcb.pid == INIT_PID:
        return ns
    raise SyscallError("EACCES", f"namespace {ns!r} is private to another process or agent")


# --- shared blocks ------------------------------------------------------------------------
def check_block(pcb: "PCB", name: str, write: bool) -> None:
    need = (capmod.BLOCK_WRITE if write else capmod.BLOCK_READ) + name
    if not holds(pcb, need):  # a write right covers reading (syscalls/caps.py)
        raise SyscallError("EACCES", f"{'writing' if write else 'reading'} block {name!r} "
                                     f"needs capability {need!r}")


def may_read_block(pcb: "PCB", name: str) -> bool:
    return holds(pcb, capmod.BLOCK_READ + name)


# --- files --------------------------------------------------------------------------------
WRITE_MODE_CHARS = ("w", "a", "x", "+")


def check_open(pcb: "PCB", mode: str) -> None:
    if any(m in mode for m in WRITE_MODE_CHARS) and not holds(pcb, "fs.write"):
        raise SyscallError("EACCES", f"opening for {mode!r} needs capability fs.write")


def shared_writable(pcb: "PCB") -> bool:
    return holds(pcb, "fs.shared")


# --- tools and drivers --------------------------------------------------------------------
def may_use_tool(pcb: "PCB", name: str, tool_cap: str | None) -> bool:
    return holds(pcb, f"tool:{name}") and (tool_cap is None or holds(pcb, tool_cap))


def check_tool(pcb: "PCB", name: str, tool_cap: str | None) -> None:
    if not holds(pcb, f"tool:{name}"):
        raise SyscallError("EACCES", f"calling {name} needs capability tool:{name}")
    if tool_cap is not None and not holds(pcb, tool_cap):
        raise SyscallError("EACCES", f"{name} needs capability {tool_cap!r}")


def check_unregister(pcb: "PCB", namespace: str, server_pid: int) -> None:
    if server_pid != pcb.pid and pcb.pid != INIT_PID:
        raise SyscallError("EPERM", f"namespace {namespace!r} is served by pid {server_pid}")
