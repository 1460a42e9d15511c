"""Handler of `ipc.pipe`: a pipe's two ends as fds of the caller (kernel/pipes.py).

Reading, writing and closing them are fs.read/fs.write/fs.close (kernel/sysfs.py);
proc.spawn(stdin=, stdout=) hands them to a child (kernel/proc/table.py).
"""

from __future__ import annotations

from llmagentos.syscalls.errno import SyscallError

from .dispatch import Call, handler
from .fdtable import MAX_FDS
from .pipes import PipeEnd, make_pipe
from .proc import INIT_PID


@handler("ipc.pipe")
async def pipe(call: Call) -> dict:
    table = call.caller.fds
    if len(table) + 2 > MAX_FDS:
        raise SyscallError("EMFILE", f"at most {MAX_FDS} fds may be open at once")
    owner = call.conn if call.caller.pid == INIT_PID else None  # see kernel/fdtable.py
    r, w = make_pipe()
    return {"read": table.install(r, owner=owner), "write": table.install(w, owner=owner)}


def end_for(call: Call, fd: int | None, side: str, what: str) -> PipeEnd | None:
    """The caller's pipe end at fd for a child's stdin ("read") or stdout ("write")."""
    if fd is None:
        return None
    end = call.caller.fds.get(fd)
    if not isinstance(end, PipeEnd) or end.side != side:
        raise SyscallError("EINVAL", f"{what}: fd {fd} is not the {side} end of a pipe")
    return end
