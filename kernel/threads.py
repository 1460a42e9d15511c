"""Worker threads: each process's fair share of the kernel's thread pool.

Blocking work (sandbox file I/O, exec, tools, SQLite searches, environments)
runs in trio's worker threads, which one global CapacityLimiter bounds. Alone,
that lets one process take every thread: forty parked `exec.run` calls and
any other process's `calc.eval` waits behind them. So each process holds at
most `PER_PROCESS` threads at once; its further calls queue on its own share,
in front of the global limiter, and never on anyone else's.

A thread abandoned by a cancelled call (a tool call past its timeout) keeps
its tokens until it really ends: trio releases a limiter only then, and the
share is that limiter, so a process cannot escape its share by timing out.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

PER_PROCESS = 4


class _Share:
    """One process's limiter chained in front of the global one (the limiter
    protocol `trio.to_thread.run_sync` takes)."""

    def __init__(self, shares: "ThreadShares", key: int, own: trio.CapacityLimiter):
        self.shares, self.key, self.own = shares, key, own

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.own.acquire_on_behalf_of(borrower)
        try:
            await trio.to_thread.current_default_thread_limiter().acquire_on_behalf_of(borrower)
        except BaseException:
            self.release_own(borrower)
            raise

    def release_on_behalf_of(self, borrower: object) -> None:
        trio.to_thread.current_default_thread_limiter().release_on_behalf_of(borrower)
        self.release_own(borrower)

    def release_own(self, borrower: object) -> None:
        self.own.release_on_behalf_of(borrower)
        st = self.own.statistics()
        if not st.borrowed_tokens and not st.tasks_waiting:
            self.shares.forget(self)  # idle: a process that is gone leaves nothing behind


class ThreadShares:
    """Per-process shares of the worker threads, made on first use and
    dropped when idle."""

    def __init__(self, per_process: int = PER_PROCESS):
        self.per_process = per_process
        self._shares: dict[int, _Share] = {}

    def share(self, pid: int) -> _Share:
        s = self._shares.get(pid)
        if s is None:
            s = self._shares[pid] = _Share(self, pid, trio.CapacityLimiter(self.per_process))
        return s

    def forget(self, share: _Share) -> None:
        if self._shares.get(share.key) is share:
            del self._shares[share.key]

    def busy(self, pid: int) -> int:
        """Threads the process holds right now."""
        s = self._shares.get(pid)
        return s.own.borrowed_tokens if s is not None else 0

    async def run_sync(self, pid: int, fn: Callable[..., Any], *args: Any,
                       abandon_on_cancel: bool = False) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.share(pid),
                                             abandon_on_cancel=abandon_on_cancel)
