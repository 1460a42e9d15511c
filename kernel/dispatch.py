"""Syscall dispatch: one table from the ABI, one handler per call.

Handlers are registered by name with `@handler("group.call", runs=...)`; at
boot every name in the ABI table must have exactly one. Argument checking
(types, ranges and choices from the table), capability checks, audit and
errno conversion happen here, once (as xv6's `syscall()` and `argint()`),
never inside a handler.

Where a handler runs is declared with it, never left to chance:

- ``inline``: answered in the connection's own loop, in order; it must not
  wait on anything (no worker thread, device, disk or other process).
  `Call.in_thread` refuses to run from such a handler.
- ``task``: its own task in the connection's nursery, so the connection goes
  on serving while it waits; its blocking work goes to a worker thread through
  `Call.in_thread`, within the caller's fair share of threads
  (kernel/threads.py).

An inline handler that finds it must wait after all hands the rest of its
work to a task with `Call.defer`; or it leaves the call to be answered by
another step with `Call.answer_nowait` (ipc: a receiver with nothing to take
waits with no task at all, and the sender's step answers it). Either way it
returns `LATER`: nothing goes back to the caller from this return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from llmagentos.syscalls import caps as capmod
from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.table import TABLE, Syscall

if TYPE_CHECKING:
    from .proc import PCB
    from .server import Connection
    from .services import Services


class _Later:
    def __repr__(self) -> str:
        return "LATER"


LATER = _Later()  # what a handler returns for a call that is answered elsewhere


@dataclass
class Call:
    """What a handler gets besides its checked arguments: the kernel's
    services (``sys``), never the Kernel itself."""

    sys: "Services"
    caller: "PCB | None"  # None only for sys.hello
    conn: "Connection"
    syscall: Syscall
    msgid: int
    size: int = 0  # the request's bytes on the wire; 0: it came some other way
    deferred: bool = False  # an inline call that goes on in a task (defer)

    async def notify(self, method: str, args: list) -> None:
        """Send a notification to the calling connection."""
        await self.conn.notify(method, args)

    def notify_nowait(self, method: str, args: list) -> None:
        """Queue a notification to the calling connection without waiting for the
        socket (streamed tokens: the device loop calls this)."""
        self.conn.notify_nowait(method, args)

    def answer_nowait(self, result: Any = None, error: SyscallError | None = None) -> bool:
        """Answer this call now, from whichever step holds its result (a sender
        handing a message to a waiting ipc.recv) or its errno; False if the
        caller is gone. Only for calls that change nothing: those are answered
        after their audit row."""
        if self.syscall.mutates:
            raise RuntimeError(f"{self.syscall.name} is audited: it cannot be answered early")
        return self.conn.answer_nowait(self.msgid, result, error)

    def defer(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """From an inline handler: finish in a task of the connection, whose
        result (or errno) is the answer. The handler returns what this returns."""
        if self.syscall.mutates:
            raise RuntimeError(f"{self.syscall.name} is audited: declare it runs='task'")
        self.deferred = True
        self.conn.nursery.start_soon(self.conn.finish, self, fn, args)
        return LATER

    async def in_thread(self, fn: Callable[..., Any], *args: Any,
                        abandon_on_cancel: bool = False) -> Any:
        """Run blocking work in a worker thread, within the caller's fair share
        of them (kernel/threads.py): the event loop only routes."""
        # An inline call waiting on a thread would hold up its connection.
        if HANDLERS[self.syscall.name].runs == "inline" and not self.deferred:
            raise RuntimeError(f"{self.syscall.name} runs inline but waits on a worker "
                               "thread: declare it runs='task'")
        return await self.sys.threads.run_sync(self.caller.pid, fn, *args,
                                               abandon_on_cancel=abandon_on_cancel)


Handler = Callable[..., Awaitable[Any]]


RUNS = ("inline", "task")


@dataclass(frozen=True)
class Entry:
    fn: Handler
    runs: str  # "inline" or "task" (see the module docstring)


HANDLERS: dict[str, Entry] = {}


def handler(name: str, *, runs: str = "inline") -> Callable[[Handler], Handler]:
    if name not in TABLE:
        raise ValueError(f"handler for {name!r}, which is not in the call table")
    if runs not in RUNS:
        raise ValueError(f"{name}: runs must be one of {RUNS}, not {runs!r}")

    def register(fn: Handler) -> Handler:
        if name in HANDLERS:
            raise ValueError(f"two handlers for {name!r}")
        HANDLERS[name] = Entry(fn, runs)
        return fn

    return register


def missing() -> list[str]:
    """Calls in the ABI that this kernel does not implement (they answer ENOSYS);
    tests/test_table.py keeps this empty."""
    return [sc.name for sc in TABLE if sc.name not in HANDLERS]


_ROUTES: dict[str, tuple[Syscall, Entry]] = {}  # every call's table row and handler, once


def lookup(method: str) -> tuple[Syscall, Entry]:
    route = _ROUTES.get(method)
    if route is not None:
        return route
    sc = TABLE[method]  # ENOSYS for unknown names
    entry = HANDLERS.get(method)
    if entry is None:
        raise SyscallError("ENOSYS", f"{method} is in the ABI but not in this kernel")
    _ROUTES[method] = sc, entry
    return sc, entry


async def invoke(call: Call, entry: Entry, args: list, kwargs: dict) -> Any:
    """Check arity, types and capability, then run the handler; a call that
    changes state is written to the audit log, failed or not, and answered
    once its row is committed."""
    sc = call.syscall
    caller = call.caller
    if caller is None:  # only sys.hello gets here unauthenticated
        return await entry.fn(call, **sc.bind(args, kwargs))
    if not sc.mutates:
        return await _checked(call, entry, sc, caller, _bind(sc, args, kwargs))
    errno: str | None = None
    answered = True  # a result or an errno goes back: only once its row is committed
    bound: Any = args  # what the caller sent, for the digest, if it does not bind
    try:
        bound = _bind(sc, args, kwargs)
        return await _checked(call, entry, sc, caller, bound)
    except SyscallError as e:
        errno = e.name
        raise
    except Exception:
        errno = "EIO"
        raise
    except BaseException:  # cancelled: no answer goes back
        errno, answered = "EIO", False
        raise
    finally:
        detail = bound.get("name") if isinstance(bound, dict) else None
        batch = call.sys.audit.record(caller.pid, sc.name, bound, errno,
                                      detail if isinstance(detail, str) else "")
        if answered:
            await call.sys.audit.committed(batch)


def _bind(sc: Syscall, args: list, kwargs: dict) -> dict[str, Any]:
    return sc.bind(args, kwargs) if (args or kwargs or sc.params) else {}


async def _checked(call: Call, entry: Entry, sc: Syscall, caller: Any,
                   bound: dict[str, Any]) -> Any:
    if sc.cap is not None and not capmod.covers(caller.caps, sc.cap):
        raise SyscallError("EACCES", f"{sc.name} needs capability {sc.cap!r}")
    caller.usage.syscalls += 1
    caller.running_calls += 1
    try:
        return await entry.fn(call, **bound)
    finally:
        caller.running_calls -= 1
