"""Syscall errors as Python exceptions, both ways.

Each errno name is a class (`ERRORS["ENOENT"]`, `ENOENTError`); where Python
has a matching builtin the class subclasses it too, so `except
FileNotFoundError` just works. The other way, `exception_to_error` turns any
exception a tool raises into the wire error its caller receives: the same
table read backwards, so what a tool raises is what its caller can catch.
"""

from __future__ import annotations

from llmagentos.syscalls.errno import ERRNO, NAMES, SyscallError


class KernelError(Exception):
    """A failed syscall: `.name` (e.g. "EACCES"), `.errno` (int), `.message`."""

    name: str = "EIO"

    def __init__(self, message: str = "", name: str | None = None):
        name = name or type(self).name
        number, default = ERRNO.get(name, ERRNO["EIO"])
        message = message or default
        super().__init__(f"[{name}] {message}")
        self.name = name
        self.errno = number
        self.message = message
        self.strerror = message

    def __str__(self) -> str:
        return f"[{self.name}] {self.message}"

    def __reduce__(self):
        return (error_for, ({"name": self.name, "message": self.message},))


# errno <-> builtin exception, the one table for both directions. Read forwards,
# ERRORS[name] subclasses the builtin; read backwards, the first row naming a
# class (or its nearest base) gives the errno, so PermissionError is EACCES.
_BUILTIN: tuple[tuple[str, type[BaseException]], ...] = (
    ("ENOENT", FileNotFoundError), ("EEXIST", FileExistsError),
    ("EACCES", PermissionError), ("EPERM", PermissionError),
    ("ESRCH", ProcessLookupError), ("ECHILD", ChildProcessError),
    ("ETIMEDOUT", TimeoutError), ("EINVAL", ValueError), ("ENOSYS", NotImplementedError),
    ("EISDIR", IsADirectoryError), ("ENOTDIR", NotADirectoryError),
    ("EAGAIN", BlockingIOError), ("EINTR", InterruptedError), ("EPIPE", BrokenPipeError),
    ("ECONNRESET", ConnectionResetError), ("ENOTCONN", ConnectionError),
    ("ESHUTDOWN", ConnectionError), ("ENOMEM", MemoryError),
)
_ERRNO_OF: dict[type[BaseException], str] = {}
for _name, _cls in _BUILTIN:
    _ERRNO_OF.setdefault(_cls, _name)
_ERRNO_OF[TypeError] = "EINVAL"  # a wrongly typed argument is an invalid one, too

ERRORS: dict[str, type[KernelError]] = {}
for _name in ERRNO:
    _bases = (KernelError, *(cls for name, cls in _BUILTIN if name == _name))
    ERRORS[_name] = type(f"{_name}Error", _bases, {"name": _name, "__module__": __name__})
    globals()[f"{_name}Error"] = ERRORS[_name]


def error_for(wire_error: object) -> KernelError:
    """The exception for a wire error object, read as `SyscallError.from_wire`
    reads it (by name, else by number; anything malformed is EPROTO)."""
    err = SyscallError.from_wire(wire_error)
    return ERRORS[err.name](err.message)


def exception_to_error(exc: BaseException) -> dict:
    """The wire error `{name, message}` an exception becomes.

    A KernelError (`ERRORS["EINVAL"]("...")`) or SyscallError keeps its errno;
    a builtin with a row above gets that errno (ValueError and TypeError
    EINVAL, FileNotFoundError ENOENT, PermissionError EACCES, ...), another
    OSError the errno it carries; anything else is EIO with the exception's text.
    """
    if isinstance(exc, (KernelError, SyscallError)):
        return {"name": exc.name, "message": exc.message}
    text = str(exc) or type(exc).__name__
    for cls in type(exc).__mro__:
        if cls in _ERRNO_OF:
            return {"name": _ERRNO_OF[cls], "message": text}
    if isinstance(exc, OSError) and exc.errno in NAMES:
        return {"name": NAMES[exc.errno], "message": exc.strerror or text}
    return {"name": "EIO", "message": f"{type(exc).__name__}: {text}"}


def sole_error(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, as
    trio's nurseries wrap them; a group of several is returned as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc

