"""POSIX-named error numbers of the syscall ABI.

Numbers follow Linux's <errno.h> so a C or Go client can map them directly;
they are never reused. An error travels as
``{"errno": int, "name": "EACCES", "message": "human text"}``.
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> (number, default message)
ERRNO: dict[str, tuple[int, str]] = {
    "EPERM": (1, "operation not permitted"),
    "ENOENT": (2, "no such file, context or object"),
    "ESRCH": (3, "no such process"),
    "EINTR": (4, "interrupted"),
    "EIO": (5, "input/output error"),
    "E2BIG": (7, "argument list too long"),
    "EBADF": (9, "bad file descriptor"),
    "ECHILD": (10, "no child process"),
    "EAGAIN": (11, "resource temporarily unavailable"),
    "ENOMEM": (12, "out of memory"),
    "EACCES": (13, "permission denied"),
    "EBUSY": (16, "device or resource busy"),
    "EEXIST": (17, "already exists"),
    "EXDEV": (18, "cross-device link"),
    "ENOTDIR": (20, "not a directory"),
    "EISDIR": (21, "is a directory"),
    "EINVAL": (22, "invalid argument"),
    "EMFILE": (24, "too many open files"),
    "EFBIG": (27, "file too large"),
    "ENOSPC": (28, "no space left"),
    "ESPIPE": (29, "illegal seek"),
    "EROFS": (30, "read-only file system"),
    "EPIPE": (32, "broken pipe"),
    "ENAMETOOLONG": (36, "name too long"),
    "ENOSYS": (38, "function not implemented"),
    "ENOTEMPTY": (39, "directory not empty"),
    "ELOOP": (40, "too many levels of symbolic links"),
    "EPROTO": (71, "protocol error"),
    "EMSGSIZE": (90, "message too long"),
    "ECONNRESET": (104, "connection reset"),
    "ENOTCONN": (107, "not connected"),
    "ESHUTDOWN": (108, "kernel is shutting down"),
    "ETIMEDOUT": (110, "timed out"),
    "ECANCELED": (125, "operation canceled"),
    "EDQUOT": (122, "quota exceeded"),
}

NAMES: dict[int, str] = {num: name for name, (num, _) in ERRNO.items()}


@dataclass
class SyscallError(Exception):
    """An errno with a human message: what every failed syscall returns."""

    name: str
    message: str = ""

    def __post_init__(self) -> None:
        if self.name not in ERRNO:
            raise ValueError(f"unknown errno name {self.name!r}")
        if not self.message:
            self.message = ERRNO[self.name][1]
        super().__init__(f"[{self.name}] {self.message}")

    @property
    def errno(self) -> int:
        return ERRNO[self.name][0]

    def to_wire(self) -> dict:
        return {"errno": self.errno, "name": self.name, "message": self.message}

    @classmethod
    def from_wire(cls, obj: object) -> "SyscallError":
        """Rebuild from a wire error; anything malformed becomes EPROTO."""
        if isinstance(obj, dict):
            name = obj.get("name")
            if name not in ERRNO and isinstance(obj.get("errno"), int):
                name = NAMES.get(obj["errno"])
            if name in ERRNO:
                return cls(name, str(obj.get("message") or ""))
        return cls("EPROTO", f"malformed error object: {obj!r:.200}")
