"""Handlers of the `fs` group: each process's sandboxed file system.

A process sees a private root (`state/fs/<identity>`, encoded by
names.path_name: a named agent's files outlive it and kernel restarts; an
unnamed process's are removed when it is reaped, or at the next boot) and
`/shared`, writable only with the `fs.shared` capability. The sandbox
(drivers/sandbox.py) resolves every path inside its root with openat-style
walking and never follows a symlink; file descriptors live in it, so they
die with the process.

The fd numbers are the process's fd table's (kernel/fdtable.py): an fd is an
open file of the sandbox or an end of a pipe (kernel/pipes.py), and fs.read,
fs.write and fs.close take either; a pipe's reads and writes wait on the
event loop (parked, never polled), a file's go to a worker thread.

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

from llmagentos.drivers.sandbox import READ_MAX, Mount, Quota, Sandbox, discard, empty_trash
from llmagentos.syscalls.errno import SyscallError

from . import perms
from .dispatch import Call, handler
from .fdtable import OPENING, SandboxFile
from .names import path_name
from .pipes import PipeEnd
from .proc import INIT_PID, PCB
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
    for obj in pcb.fds.pop_all():
        if isinstance(obj, PipeEnd):
            obj.close()  # wakes the peers: EOF or EPIPE now, not at reap
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


def drop_conn(services: "Services", conn: object) -> None:
    """A connection of init (a shell command) closed: the fds it opened close too."""
    init = services.procs.procs.get(INIT_PID)
    files = []
    for obj in init.fds.pop_owned(conn) if init is not None else []:
        if isinstance(obj, PipeEnd):
            obj.close()
        elif isinstance(obj, SandboxFile):
            files.append(obj.sandbox_fd)
    sandbox, nursery = init.sandbox if init else None, services.procs.nursery
    if files and sandbox is not None and nursery is not None:
        nursery.start_soon(_close_files, sandbox, files)


async def _close_files(sandbox: Sandbox, fds: list[int]) -> None:
    def close() -> None:
        for fd in fds:
            try:
                sandbox.close(fd)
            except SyscallError:
                pass
    await trio.to_thread.run_sync(close, abandon_on_cancel=True)


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


def _owner(call: Call) -> object:
    return call.conn if call.caller.pid == INIT_PID else None


@handler("fs.open", runs="task")
async def open_(call: Call, path: str, mode: str) -> int:
    perms.check_open(call.caller, mode)
    table = call.caller.fds
    fd = table.install(OPENING, owner=_owner(call))  # the number, and EMFILE, first
    try:
        sandbox_fd = await _in_sandbox(call, Sandbox.open, path, mode)
    except BaseException:
        table.discard(fd)
        raise
    if table.get_raw(fd) is not OPENING:  # the process exited meanwhile: its files went
        return fd
    table.replace(fd, SandboxFile(sandbox_fd, path, readable=mode in ("r", "r+"),
                                  writable=mode != "r"))
    return fd


async def _pipe_io(call: Call, op: Any) -> Any:
    pcb = call.caller
    pcb.waiting_calls += 1  # parked on the pipe: WAITING, as for any I/O
    try:
        return await op
    finally:
        pcb.waiting_calls -= 1


@handler("fs.read", runs="task")
async def read(call: Call, fd: int, n: int) -> bytes:
    f = call.caller.fds.get(fd)
    if isinstance(f, PipeEnd):
        if f.feeds_stdin:
            raise SyscallError("EBUSY", f"fd {fd} feeds this process's OS stdin: read that "
                                        "(sys.stdin); closing the fd stops the feed")
        return await _pipe_io(call, f.read(min(n, READ_MAX) if n >= 0 else -1))
    f.check("read", fd)
    return await _in_sandbox(call, Sandbox.read, f.sandbox_fd, n)


@handler("fs.write", runs="task")
async def write(call: Call, fd: int, data: bytes | str) -> int:
    f = call.caller.fds.get(fd)
    if isinstance(f, PipeEnd):
        if isinstance(data, str):
            data = data.encode("utf-8")
        return await _pipe_io(call, f.write(data))
    f.check("write", fd)
    return await _in_sandbox(call, Sandbox.write, f.sandbox_fd, data)


@handler("fs.close", runs="task")
async def close(call: Call, fd: int) -> None:
    f = call.caller.fds.pop(fd)
    if isinstance(f, PipeEnd):
        f.close()
        return
    await _in_sandbox(call, Sandbox.close, f.sandbox_fd)


@handler("fs.seek", runs="task")
async def seek(call: Call, fd: int, offset: int, whence: int) -> int:
    f = call.caller.fds.get(fd)
    if isinstance(f, PipeEnd):
        raise SyscallError("ESPIPE", f"fd {fd} is a pipe: it has no position to seek")
    return await _in_sandbox(call, Sandbox.seek, f.sandbox_fd, offset, whence)


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
