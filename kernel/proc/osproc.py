"""A process's OS side: starting it through the launcher, and signalling its
OS process tree."""

from __future__ import annotations

import os
import subprocess

import psutil
import trio

from llmagentos.syscalls.errno import SyscallError

from ..isolation import Isolation
from .pcb import PCB


async def launch(isolation: Isolation, exe: str, argv: list[str], env: dict[str, str],
                 pcb: PCB, procs_files: list[str], stdin: int | None = None,
                 stdout: int | None = None) -> trio.Process:
    """Start the launcher (kernel/confine.py) for pcb and return once it has
    exec'd the program; EIO with the launcher's reason if it could not.
    stdin/stdout: OS fds for the child's (pipes the kernel pumps); without
    them stdin is /dev/null and stdout goes to the log with stderr."""
    ready_r, ready_w = os.pipe()
    cfg = isolation.config(exe, argv, env, pcb.token, procs_files)
    cfg["ready_fd"] = ready_w
    cfg_fd = isolation.config_fd(cfg)
    try:
        with open(pcb.log_path, "wb") as log:
            proc = await trio.lowlevel.open_process(
                isolation.command(cfg_fd),
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=log if stdout is None else stdout,
                stderr=subprocess.STDOUT if stdout is None else log,
                cwd=pcb.cwd, start_new_session=True,
                pass_fds=[cfg_fd, ready_w])
    except OSError as e:
        os.close(ready_r)
        raise SyscallError("EIO", f"spawn failed: {e}") from None
    finally:
        os.close(cfg_fd)
        os.close(ready_w)
    failure = await _exec_outcome(ready_r)
    if failure is not None:  # the launcher could not confine or exec: nothing runs
        with trio.move_on_after(5):
            await proc.wait()
        raise SyscallError("EIO", f"spawn failed: {failure}")
    return proc


async def _exec_outcome(ready_fd: int, timeout: float = 30.0) -> str | None:
    """None once the launcher has exec'd the program (its end of the pipe
    closed on exec), else what it reported."""
    stream = trio.lowlevel.FdStream(ready_fd)
    data = b""
    try:
        with trio.move_on_after(timeout) as scope:
            while chunk := await stream.receive_some(4096):
                data += chunk
        if scope.cancelled_caught:
            return f"the launcher did not exec within {timeout}s"
    finally:
        await stream.aclose()
    return data.decode(errors="replace") or None


def _os_tree(os_pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(os_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def signal_tree(os_pid: int, sig: int) -> None:
    """Send sig to the OS process group (every child was started in its own
    session) and to descendants that left the group."""
    tree = _os_tree(os_pid)
    try:
        os.killpg(os_pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in tree[1:]:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
