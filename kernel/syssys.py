"""Handlers of the `sys` group: hello, uname, stats, shutdown, null, calls, audit,
metrics."""

from __future__ import annotations

import trio

from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.table import TABLE

from .dispatch import Call, handler


@handler("sys.hello")
async def hello(call: Call, token: str) -> dict:
    conn = call.conn
    procs = call.sys.procs
    keyed = call.sys.keys.authenticate(token)  # an API key says hello as its process
    pcb = keyed or procs.authenticate(token)
    if not procs.may_present(pcb, conn.peer_pid()):
        raise SyscallError("EACCES", "bad or expired token")  # the same answer: no oracle
    if conn.pcb is not None and conn.pcb.pid != pcb.pid:
        raise SyscallError("EPERM", f"connection is already pid {conn.pcb.pid}")
    if conn.pcb is None and pcb.attached and keyed is None:
        pcb.conns += 1  # an attached process lives as long as a connection of it does
        conn.holds_pcb = True  # (a key's lives as long as its key)
    conn.pcb = pcb
    return {"pid": pcb.pid, "name": pcb.name, "kernel": call.sys.uname()["release"]}


@handler("sys.uname")
async def uname(call: Call) -> dict:
    return call.sys.uname()


@handler("sys.stats", runs="task")
async def stats(call: Call) -> dict:
    sv = call.sys
    states: dict[str, int] = {}
    for p in sv.procs.procs.values():
        states[p.state] = states.get(p.state, 0) + 1
    out = {**sv.uname(), "counters": dict(sv.stats), "processes": len(sv.procs.procs),
           "states": states, "device": None}
    out["devices"] = {}
    for name, entry in list(sv.table.loaded.items()):  # every loaded model's run queue
        dev = entry.queue.stats()
        dev.pop("owners", None)  # per-process rows are in proc.ps
        out["devices"][name] = dev
    out["device"] = out["devices"].get(sv.table.default)  # the default model's
    if sv.cluster is not None:  # nodes alive and dead, device actors (asks Ray's GCS)
        out["cluster"] = await trio.to_thread.run_sync(sv.cluster.status, abandon_on_cancel=True)
    return out


@handler("sys.shutdown")
async def shutdown(call: Call, grace: float) -> None:
    if grace < 0:
        raise SyscallError("EINVAL", "grace must be >= 0")
    call.sys.request_shutdown(grace)


@handler("sys.null")
async def null(call: Call) -> None:
    return None


@handler("sys.calls")
async def calls(call: Call) -> list:
    return [sc.describe() for sc in TABLE]


@handler("sys.audit")
async def audit(call: Call, pid: int | None, syscall: str | None, errno: str | None,
                since: float | None, limit: int) -> list:
    if not 1 <= limit <= 10_000:
        raise SyscallError("EINVAL", "limit must be in 1..10000")
    return call.sys.audit.query(pid, syscall, errno, since, limit)


@handler("sys.metrics")
async def metrics_text(call: Call) -> str:
    # The same numbers proc.ps and sys.stats show any process: no capability needed.
    from . import metrics  # prometheus-client: imported at the first scrape
    return metrics.render(call.sys)[0].decode()
