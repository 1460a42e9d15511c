"""Syscall errors as Python exceptions: each errno name is a class, and
where Python has a matching builtin (ENOENT -> FileNotFoundError, ...) the
class is a subclass of it too, so `except FileNotFoundError` just works."""

from __future__ import annotations

from llmagentos.syscalls.errno import ERRNO


class KernelError(Exception):
    """A failed syscall: `.name` (e.g. "EACCES"), `.errno` (int), `.message`."""

    name: str = "EIO"

    def __init__(self, message: str = "", name: str | None = None):
        name = name or type(self).name
        super().__init__(f"[{name}] {message}")
        self.name = name
        self.errno = ERRNO.get(name, (5, ""))[0]
        self.message = message
        self.strerror = message

    def __str__(self) -> str:
        return f"[{self.name}] {self.message}"

    def __reduce__(self):
        return (error_for, ({"name": self.name, "message": self.message},))


_BUILTIN: dict[str, type[BaseException]] = {
    "ENOENT": FileNotFoundError, "EEXIST": FileExistsError, "EPERM": PermissionError,
    "EACCES": PermissionError, "ESRCH": ProcessLookupError, "ECHILD": ChildProcessError,
    "ETIMEDOUT": TimeoutError, "EINVAL": ValueError, "ENOSYS": NotImplementedError,
    "EISDIR": IsADirectoryError, "ENOTDIR": NotADirectoryError, "EAGAIN": BlockingIOError,
    "EINTR": InterruptedError, "EPIPE": BrokenPipeError, "ECONNRESET": ConnectionResetError,
    "ENOTCONN": ConnectionError, "ESHUTDOWN": ConnectionError, "ENOMEM": MemoryError,
}

ERRORS: dict[str, type[KernelError]] = {}
for _name in ERRNO:
    _bases: tuple[type, ...] = (KernelError,)
    if _name in _BUILTIN:
        _bases = (KernelError, _BUILTIN[_name])
    ERRORS[_name] = type(f"{_name}Error", _bases, {"name": _name, "__module__": __name__})
    globals()[f"{_name}Error"] = ERRORS[_name]


def error_for(wire_error: object) -> KernelError:
    """Build the exception for a wire error object."""
    if isinstance(wire_error, dict):
        name = wire_error.get("name")
        msg = str(wire_error.get("message") or "")
        if name in ERRORS:
            return ERRORS[name](msg)
    return ERRORS["EPROTO"](f"malformed error from kernel: {wire_error!r:.200}")
