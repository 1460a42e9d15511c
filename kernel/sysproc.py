"""Handlers of the `proc` group: the process table as syscalls."""

from __future__ import annotations

from typing import Any

from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.table import check_limit, check_limit_name

from . import perms
from .dispatch import Call, handler
from .proc import INIT_PID, check_payload, parse_signal
from .syspipe import end_for


@handler("proc.spawn", runs="task")
async def spawn(call: Call, argv: list, name: str | None, env: dict | None, cwd: str | None,
                caps: list | None, limits: dict | None, nice: int, placement: str,
                model: str | None, stdin: int | None, stdout: int | None) -> int:
    model = call.sys.table.check(model) or call.caller.model  # ENOENT naming the known ones
    # The child's ends are taken now, before anything waits: the caller may close
    # its own fds while the child starts.
    ends = [end_for(call, stdin, "read", "stdin"), end_for(call, stdout, "write", "stdout")]
    child_in, child_out = [e.dup() if e else None for e in ends]
    try:
        pcb = await call.sys.procs.spawn(call.caller, argv, name, env, cwd, caps, limits, nice,
                                         placement, model, stdin=child_in, stdout=child_out)
    except BaseException:
        for end in (child_in, child_out):
            if end is not None:
                end.close()
        raise
    return pcb.pid


@handler("proc.attach")
async def attach(call: Call, name: str | None, caps: list | None, limits: dict | None,
                 nice: int, model: str | None) -> dict:
    model = call.sys.table.check(model) or call.caller.model
    os_pid = call.conn.peer_pid() or call.caller.os_pid
    pcb = call.sys.procs.attach(call.caller, name, caps, limits, nice, os_pid, model)
    return {"pid": pcb.pid, "token": pcb.token}


@handler("proc.getpid")
async def getpid(call: Call) -> int:
    return call.caller.pid


@handler("proc.ps")
async def ps(call: Call) -> list:
    return [p.row() for p in sorted(call.sys.procs.procs.values(), key=lambda p: p.pid)]


@handler("proc.stat")
async def stat(call: Call, pid: int | None) -> dict:
    procs = call.sys.procs
    return procs.stat(procs.get(call.caller.pid if pid is None else pid))


@handler("proc.wait", runs="task")
async def wait(call: Call, pid: int, timeout: float | None) -> dict:
    if timeout is not None and timeout < 0:
        raise SyscallError("EINVAL", "timeout must be >= 0")
    return await call.sys.procs.wait(call.caller, pid, timeout)


@handler("proc.kill")
async def kill(call: Call, pid: int, signal: int | str, payload: Any) -> None:
    sig = parse_signal(signal)
    if payload is not None:
        check_payload(sig, payload)
    call.sys.procs.kill(call.caller, pid, sig, payload)


@handler("proc.nice")
async def nice(call: Call, pid: int, value: int) -> int:
    return call.sys.procs.renice(call.caller, pid, value)


@handler("proc.setlimit")
async def setlimit(call: Call, pid: int, name: str, value: float | None) -> dict:
    procs = call.sys.procs
    target = procs.get(pid)
    check_limit_name(name)
    if value is not None:
        value = check_limit(name, value)
    perms.check_setlimit(procs, call.caller, target, name, value)
    if value is None:
        target.limits.pop(name, None)
    else:
        target.limits[name] = value
    return dict(target.limits)


@handler("proc.exit")
async def exit_(call: Call, status: int) -> None:
    if not 0 <= status <= 255:
        raise SyscallError("EINVAL", "exit status must be in 0..255")
    if call.caller.pid == INIT_PID:
        raise SyscallError("EPERM", "init does not exit; use sys.shutdown")
    call.caller.exit_reason = f"proc.exit({status})"


@handler("proc.logs")
async def logs(call: Call, pid: int, offset: int, limit: int) -> dict:
    procs = call.sys.procs
    path = procs.log_paths.get(pid)
    if path is None:
        raise SyscallError("ESRCH", f"no process with pid {pid} in this boot")
    if offset < 0 or not 0 < limit <= 4 * 1024 * 1024:
        raise SyscallError("EINVAL", "offset must be >= 0 and limit in 1..4 MiB")
    perms.check_logs(procs, call.caller, pid, procs.log_readers.get(pid, frozenset()))
    target = procs.procs.get(pid)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        data = b""
    return {"data": data, "offset": offset + len(data),
            "state": target.state if target else "REAPED"}
