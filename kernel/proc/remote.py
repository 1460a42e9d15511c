"""Processes placed on cluster nodes (placement="ray" or "node:ID"): they call
back over the kernel's TLS listener (its loopback TCP one where there is no
TLS listener: the kernel's own machine only); exit status and output come back
from the node."""

from __future__ import annotations

import signal as _signal
import string
from typing import TYPE_CHECKING

import trio

from llmagentos.syscalls import paths
from llmagentos.syscalls.errno import SyscallError

from .pcb import PCB

if TYPE_CHECKING:
    from .table import ProcessTable

# What a remote program must not take from its spawner's env or its Ray worker's:
# the kernel says where it is, and whose token it holds.
KERNEL_ENV = (paths.ENV_ADDRESS, paths.ENV_SOCKET, paths.ENV_CA, paths.ENV_TOKEN,
              paths.ENV_TOKEN_FD, paths.ENV_PID)
NODE_PREFIX = "node:"
NODE_ID_LEN = 56  # hex digits of a Ray node id


def parse_placement(placement: str) -> str | None:
    """The node id (or a prefix of one) that ``placement`` names; None for
    "local" and "ray" (any node)."""
    if placement in ("local", "ray"):
        return None
    if not placement.startswith(NODE_PREFIX):
        raise SyscallError("EINVAL", f"placement must be 'local', 'ray' or 'node:ID', "
                                     f"not {placement!r:.80}")
    node = placement[len(NODE_PREFIX):].lower()
    if not node or len(node) > NODE_ID_LEN or not set(node) <= set(string.hexdigits.lower()):
        raise SyscallError("EINVAL", f"placement 'node:ID' wants a Ray node id (hex, as "
                                     f"`llmos status` shows), not {placement!r:.80}")
    return node


async def spawn_remote(table: "ProcessTable", pcb: PCB, argv: list, env: dict,
                       node: str | None = None) -> PCB:
    """Start the program on a cluster node (``node``: that one, else any)."""
    address = table.remote_address
    remote_env = {k: v for k, v in env.items() if k not in KERNEL_ENV}
    remote_env.update({paths.ENV_SOCKET: address, paths.ENV_PID: str(pcb.pid)})
    ca_pem = b""
    if address.startswith("tls://") and table.tls_ca:
        try:
            with open(table.tls_ca, "rb") as f:
                ca_pem = f.read()
        except OSError as e:
            table._forget(pcb)
            raise SyscallError("EIO", f"cannot read the TLS CA {table.tls_ca}: "
                                      f"{e.strerror}") from None
    try:
        remote = await table.cluster.spawn(list(argv), remote_env, pcb.token, ca_pem,
                                           node=node, pid=pcb.pid)
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
    elif pcb.remote.lost:
        pcb.exit_reason = pcb.remote.lost
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
