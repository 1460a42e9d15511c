"""A process's fd table: the numbers fs.read/fs.write/fs.close take.

One table per process (PCB.fds). An entry is an open file of the process's
sandbox (`SandboxFile`, the sandbox's own number behind it) or an end of a
pipe (kernel/pipes.py). Numbers are handed out lowest first from 3; 0 and 1
are a spawned child's stdin and stdout when it was given pipe ends for them.

Init's fds are opened by shell commands, each its own connection, and init
never exits: an fd init opens belongs to the connection that opened it and
closes with it, so an interrupted `llmos` leaves no pipe end behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmagentos.syscalls.errno import SyscallError

FIRST_FD = 3
MAX_FDS = 64


@dataclass
class SandboxFile:
    """An open file of the process's sandbox, by the sandbox's own fd number."""

    sandbox_fd: int
    path: str
    readable: bool
    writable: bool

    def check(self, op: str, fd: int) -> None:
        if not (self.readable if op == "read" else self.writable):
            what = "reading" if op == "read" else "writing"
            raise SyscallError("EBADF", f"fd {fd} ({self.path}) is not open for {what}")

    def describe(self) -> dict:
        return {"kind": "file", "path": self.path, "readable": self.readable,
                "writable": self.writable}


class _Opening:
    """A number held while the file behind it is being opened in a worker thread."""

    def describe(self) -> dict:
        return {"kind": "opening"}


OPENING = _Opening()


@dataclass
class _Entry:
    obj: Any
    owner: Any = None  # the connection the fd dies with (init's fds); None: the process


class FdTable:
    def __init__(self) -> None:
        self._open: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._open)

    def install(self, obj: Any, fd: int | None = None, owner: Any = None) -> int:
        """Put obj at the lowest free number (or at fd); EMFILE when full."""
        if len(self._open) >= MAX_FDS:
            raise SyscallError("EMFILE", f"at most {MAX_FDS} fds may be open at once")
        if fd is None:
            fd = FIRST_FD
            while fd in self._open:
                fd += 1
        elif fd in self._open:
            raise SyscallError("EBADF", f"fd {fd} is already open")
        self._open[fd] = _Entry(obj, owner)
        return fd

    def replace(self, fd: int, obj: Any) -> None:
        self._open[fd].obj = obj

    def get_raw(self, fd: int) -> Any:
        entry = self._open.get(fd)
        return None if entry is None else entry.obj

    def get(self, fd: int) -> Any:
        entry = self._open.get(fd)
        if entry is None or entry.obj is OPENING:
            raise SyscallError("EBADF", f"{fd} is not an open file descriptor")
        return entry.obj

    def pop(self, fd: int) -> Any:
        obj = self.get(fd)
        del self._open[fd]
        return obj

    def discard(self, fd: int) -> None:
        self._open.pop(fd, None)

    def pop_owned(self, owner: Any) -> list[Any]:
        """Remove and return the fds that die with owner."""
        fds = [fd for fd, e in self._open.items() if e.owner is owner and owner is not None]
        return [self._open.pop(fd).obj for fd in fds]

    def pop_all(self) -> list[Any]:
        objs = [e.obj for e in self._open.values()]
        self._open.clear()
        return objs

    def describe(self) -> list[dict]:
        return [{"fd": fd, **e.obj.describe()} for fd, e in sorted(self._open.items())]
