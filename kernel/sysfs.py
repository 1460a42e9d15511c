"""Handlers of the `fs` group: each process's sandboxed file system.

A process sees a private root (`state/fs/<identity>`, encoded by
names.path_name: a named agent's files outlive it and kernel restarts; an
unnamed process's are removed when it is reaped, or at the next boot) and
`/shared`, writable only with the `fs.shared` capability. The sandbox
(drivers/sandbox.py) resolves every path inside its root with openat-style
walking and never follows a symlink; file descriptors live in it, so they
die with the process.
"""

from __future__ import annotations

import shutil

from llmagentos.drivers.sandbox import Mount, Quota, Sandbox
from llmagentos.syscalls import caps as capmod
from llmagentos.syscalls.errno import SyscallError

from .dispatch import Call, handler
from .names import path_name
from .proc import PCB
from .sysctx import identity

WRITE_MODES = ("w", "a", "x", "r+", "w+", "a+")


def root_name(pcb: PCB) -> str:
    # one directory per identity, never shared: an injective encoding
    return path_name(identity(pcb))


def sandbox_of(kernel, pcb: PCB) -> Sandbox:
    if pcb.sandbox is None:
        state = kernel.config.state_dir
        root = state / "fs" / root_name(pcb)
        root.mkdir(parents=True, exist_ok=True)
        (state / "shared").mkdir(exist_ok=True)
        quota = Quota(**{k: int(pcb.limits[lim]) for k, lim in
                         (("max_bytes", "fs_bytes"), ("max_files", "fs_files"))
                         if lim in pcb.limits})
        mounts = {"/shared": Mount(state / "shared", capmod.covers(pcb.caps, "fs.shared"))}
        pcb.sandbox = Sandbox(root, mounts, quota=quota)
    return pcb.sandbox


def release(kernel, pcb: PCB) -> None:
    """The process is gone: close its fds; an unnamed process's files go too."""
    if pcb.sandbox is not None:
        pcb.sandbox.close_all()
        pcb.sandbox = None
    if not pcb.agent:
        shutil.rmtree(kernel.config.state_dir / "fs" / root_name(pcb), ignore_errors=True)


def _sb(call: Call) -> Sandbox:
    return sandbox_of(call.kernel, call.caller)


@handler("fs.open")
async def open_(call: Call, path: str, mode: str) -> int:
    if any(m in mode for m in ("w", "a", "x", "+")) and \
            not capmod.covers(call.caller.caps, "fs.write"):
        raise SyscallError("EACCES", f"opening for {mode!r} needs capability fs.write")
    return _sb(call).open(path, mode)


@handler("fs.read")
async def read(call: Call, fd: int, n: int) -> bytes:
    return _sb(call).read(fd, n)


@handler("fs.write")
async def write(call: Call, fd: int, data: bytes | str) -> int:
    return _sb(call).write(fd, data)


@handler("fs.close")
async def close(call: Call, fd: int) -> None:
    _sb(call).close(fd)


@handler("fs.seek")
async def seek(call: Call, fd: int, offset: int, whence: int) -> int:
    return _sb(call).seek(fd, offset, whence)


@handler("fs.stat")
async def stat(call: Call, path: str) -> dict:
    return _sb(call).stat(path)


@handler("fs.listdir")
async def listdir(call: Call, path: str) -> list:
    return _sb(call).listdir(path)


@handler("fs.mkdir")
async def mkdir(call: Call, path: str, parents: bool) -> None:
    _sb(call).mkdir(path, parents)


@handler("fs.unlink")
async def unlink(call: Call, path: str) -> None:
    _sb(call).unlink(path)


@handler("fs.rmdir")
async def rmdir(call: Call, path: str) -> None:
    _sb(call).rmdir(path)


@handler("fs.rename")
async def rename(call: Call, src: str, dst: str) -> None:
    _sb(call).rename(src, dst)


@handler("fs.read_file")
async def read_file(call: Call, path: str) -> bytes:
    return _sb(call).read_file(path)


@handler("fs.write_file")
async def write_file(call: Call, path: str, data: bytes | str, append: bool) -> int:
    return _sb(call).write_file(path, data, append=append)


@handler("fs.usage")
async def usage(call: Call) -> dict:
    return _sb(call).usage()
