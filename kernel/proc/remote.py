"""Processes placed on a cluster node (placement="ray"): they call back over
the kernel's TCP listener; exit status and output come back from the node."""

from __future__ import annotations

import signal as _signal
from typing import TYPE_CHECKING

import trio

from llmagentos.syscalls.errno import SyscallError

from .pcb import PCB

if TYPE_CHECKING:
    from .table import ProcessTable


async def spawn_remote(table: "ProcessTable", pcb: PCB, argv: list, env: dict) -> PCB:
    """Start the program on a cluster node; it calls back over the TCP listener."""
    remote_env = {**env, "LLMAGENTOS_SOCKET": table.tcp_address,
                  "LLMAGENTOS_TOKEN": pcb.token, "LLMAGENTOS_PID": str(pcb.pid)}
    try:
        remote = await table.cluster.spawn(list(argv), remote_env, None)
    except SyscallError:
        table._forget(pcb)
        raise
    pcb.remote = remote
    pcb.node = remote.node
    pcb.os_pid = remote.pid  # a pid on that node, not here
    table.nursery.start_soon(watch_remote, table, pcb)
    return pcb


async def watch_remote(table: "ProcessTable", pcb: PCB) -> None:
    """The remote twin of _watch: exit status and output come back from the node."""
    with trio.CancelScope() as scope:
        if "wall_time" in pcb.limits:
            scope.deadline = trio.current_time() + pcb.limits["wall_time"]
        rc, output = await pcb.remote.wait()
    if scope.cancelled_caught:  # the wall-time deadline
        pcb.exit_reason = f"wall time limit of {pcb.limits['wall_time']}s"
        pcb.remote.signal(_signal.SIGKILL)
        pcb.remote.close()
        rc, output = -int(_signal.SIGKILL), b""
    try:
        with open(pcb.log_path, "ab") as f:
            f.write(output)
    except OSError:
        pass
    if rc < 0:
        pcb.term_signal = -rc
    else:
        pcb.exit_code = rc
    table._exited(pcb)
