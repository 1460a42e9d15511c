"""Handlers of the `svc` group: the supervised services (kernel/supervisor.py)."""

from __future__ import annotations

from llmagentos.syscalls import caps as capmod
from llmagentos.syscalls.errno import SyscallError

from .dispatch import Call, handler
from .supervisor import ServiceSpec


@handler("svc.add", runs="task")
async def add(call: Call, name: str, argv: list, restart: str, caps: list | None,
              env: dict | None, cwd: str | None, backoff: float, backoff_max: float,
              stable: float) -> dict:
    # A service is a process of init, but its rights are its starter's to give:
    # within the caller's bounding set, by default what a child of the caller gets.
    holder = call.caller.caps
    if caps is None:
        caps = capmod.default_child(holder)
    elif not all(isinstance(c, str) for c in caps):
        raise SyscallError("EINVAL", "caps must be a list of strings")
    excess = capmod.bounded(holder, caps)
    if excess:
        raise SyscallError("EACCES", f"capabilities not held by the caller: {excess}")
    spec = ServiceSpec(name=name, argv=tuple(argv), restart=restart, caps=tuple(caps), env=env,
                       cwd=cwd, backoff=backoff, backoff_max=backoff_max, stable=stable)
    return await call.sys.supervisor.add(spec)


@handler("svc.list")
async def list_(call: Call) -> list:
    return call.sys.supervisor.rows()


@handler("svc.stop", runs="task")
async def stop(call: Call, name: str, grace: float) -> dict:
    return await call.sys.supervisor.stop(name, grace)


@handler("svc.restart", runs="task")
async def restart(call: Call, name: str, grace: float) -> dict:
    return await call.sys.supervisor.restart(name, grace)


@handler("svc.remove", runs="task")
async def remove(call: Call, name: str, grace: float) -> None:
    await call.sys.supervisor.remove(name, grace)
