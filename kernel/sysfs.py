"""Handlers of the `fs` group: each process's sandboxed file system.

A process sees a private root (`state/fs/<identity>`, encoded by
names.path_name: a named agent's files outlive it and kernel restarts; an
unnamed process's are removed when it is reaped, or at the next boot) and
`/shared`, writable only with the `fs.shared` capability. The sandbox
(drivers/sandbox.py) resolves every path inside its root with openat-style
walking and never follows a symlink; file descriptors live in it, so they
die with the process.

No sandbox work runs on the event loop: every handler's I/O goes to a worker
thread within the caller's share of them, and a process's release (closing
its fds, removing an unnamed process's tree, whatever its size or depth) is a
background task of the kernel that logs errors and never raises.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import trio

from llmagentos.drivers.sandbox import Mount, Quota, Sandbox, discard, empty_trash
from llmagentos.syscalls.errno import SyscallError

from . import perms
from .dispatch import Call, handler
from .names import path_name
from .proc import PCB
from .sysctx import identity

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("llmagentos.kernel")

_OPENING = threading.Lock()  # two threads of one process must not make two sandboxes


def root_name(pcb: PCB) -> str:
    # one directory per identity, never shared: an injective encoding
    return path_name(identity(pcb))


def sandbox_of(services: "Services", pcb: PCB) -> Sandbox:
    """The process's sandbox, opened at first use. Blocking (it counts the
    root's usage): call it from a worker thread."""
    with _OPENING:
        if pcb.exited:
            raise SyscallError("ESRCH", f"pid {pcb.pid} has exited")
        if pcb.sandbox is None:
            state = services.config.state_dir
            root = state / "fs" / root_name(pcb)
            root.mkdir(parents=True, exist_ok=True)
            (state / "shared").mkdir(exist_ok=True)
            quota = Quota(**{k: int(pcb.limits[lim]) for k, lim in
                             (("max_bytes", "fs_bytes"), ("max_files", "fs_files"))
                             if lim in pcb.limits})
            mounts = {"/shared": Mount(state / "shared", perms.shared_writable(pcb))}
            pcb.sandbox = Sandbox(root, mounts, quota=quota)
        return pcb.sandbox


def release(services: "Services", pcb: PCB) -> None:
    """The process is gone: close its fds; an unnamed process's files go too.
    Called on the event loop (ProcessTable.on_exit): the work is a task."""
    sandbox, pcb.sandbox = pcb.sandbox, None
    state = services.config.state_dir
    root = None if pcb.agent else state / "fs" / root_name(pcb)
    if sandbox is None and root is None:
        return
    nursery = services.procs.nursery
    if nursery is not None:
        nursery.start_soon(_release, services.fs_trash_lock, state, sandbox, root)
    else:  # shutting down: what is left in the trash goes at the next release
        _release_files(state, sandbox, root, empty=False)


async def _release(lock: trio.Lock, state: Path, sandbox: Sandbox | None, root) -> None:
    async with lock:  # one thread empties the trash at a time
        await trio.to_thread.run_sync(_release_files, state, sandbox, root,
                                      abandon_on_cancel=True)


def _release_files(state: Path, sandbox: Sandbox | None, root, empty: bool = True) -> None:
    try:
        if sandbox is not None:
            sandbox.close_all()
        trash = state / "trash"
        if root is not None:
            discard(root, trash)
        if empty:
            empty_trash(trash)
    except Exception:  # never into the kernel: a leftover tree is a log line
        log.exception("releasing files of %s failed", root)


async def _in_sandbox(call: Call, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(sandbox, *args) in a worker thread of the caller's share."""
    sv, pcb = call.sys, call.caller
    return await call.in_thread(lambda: fn(sandbox_of(sv, pcb), *args))


@handler("fs.open", runs="task")
async def open_(call: Call, path: str, mode: str) -> int:
    perms.check_open(call.caller, mode)
    return await _in_sandbox(call, Sandbox.open, path, mode)


@handler("fs.read", runs="task")
async def read(call: Call, fd: int, n: int) -> bytes:
    return await _in_sandbox(call, Sandbox.read, fd, n)


@handler("fs.write", runs="task")
async def write(call: Call, fd: int, data: bytes | str) -> int:
    return await _in_sandbox(call, Sandbox.write, fd, data)


@handler("fs.close", runs="task")
async def close(call: Call, fd: int) -> None:
    await _in_sandbox(call, Sandbox.close, fd)


@handler("fs.seek", runs="task")
async def seek(call: Call, fd: int, offset: int, whence: int) -> int:
    return await _in_sandbox(call, Sandbox.seek, fd, offset, whence)


@handler("fs.stat", runs="task")
async def stat(call: Call, path: str) -> dict:
    return await _in_sandbox(call, Sandbox.stat, path)


@handler("fs.listdir", runs="task")
async def listdir(call: Call, path: str) -> list:
    return await _in_sandbox(call, Sandbox.listdir, path)


@handler("fs.mkdir", runs="task")
async def mkdir(call: Call, path: str, parents: bool) -> None:
    await _in_sandbox(call, Sandbox.mkdir, path, parents)


@handler("fs.unlink", runs="task")
async def unlink(call: Call, path: str) -> None:
    await _in_sandbox(call, Sandbox.unlink, path)


@handler("fs.rmdir", runs="task")
async def rmdir(call: Call, path: str) -> None:
    await _in_sandbox(call, Sandbox.rmdir, path)


@handler("fs.rename", runs="task")
async def rename(call: Call, src: str, dst: str) -> None:
    await _in_sandbox(call, Sandbox.rename, src, dst)


@handler("fs.read_file", runs="task")
async def read_file(call: Call, path: str) -> bytes:
    return await _in_sandbox(call, Sandbox.read_file, path)


@handler("fs.write_file", runs="task")
async def write_file(call: Call, path: str, data: bytes | str, append: bool) -> int:
    return await _in_sandbox(call, lambda sb: sb.write_file(path, data, append=append))


@handler("fs.usage", runs="task")
async def usage(call: Call) -> dict:
    return await _in_sandbox(call, Sandbox.usage)
