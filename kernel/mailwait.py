"""Calls waiting for mail with no task of their own (kernel/mailbox.py).

Each is a `Waiter` in its mailbox's list, answered by whichever step has its
answer: the sender of a message it matches, the timer at its deadline (one
task and a heap of deadlines for every wait), or the exit of its process. A
wait whose connection closes is dropped unanswered.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from llmagentos.syscalls.errno import SyscallError

from .dispatch import LATER

if TYPE_CHECKING:
    from .dispatch import Call
    from .mailbox import Mailbox


@dataclass(eq=False, slots=True)
class Waiter:
    """An ipc.recv with nothing to take: the next message it matches is its
    answer (or ETIMEDOUT at the deadline, ESRCH at exit)."""

    box: "Mailbox"
    call: "Call"
    match: dict | None
    deadline: float
    timeout: float | None
    done: bool = False


def deadline_of(timeout: float | None, now: float | None = None) -> float:
    return (trio.current_time() if now is None else now) + (
        float("inf") if timeout is None else timeout)


def timed_out(match: dict | None, timeout: float | None) -> SyscallError:
    return SyscallError("ETIMEDOUT", f"no message{' matching' if match else ''} within "
                                     f"{timeout}s")


class Waits:
    """Every wait of the kernel's mailboxes that has a deadline, and its timer."""

    def __init__(self) -> None:
        self._timeouts: list[tuple[float, int, Waiter]] = []  # a heap; done ones left in it
        self._timed = 0  # waiters in it not yet done
        self._order = itertools.count()  # ties on a deadline: oldest first
        self._wake = trio.Event()

    def park(self, call: "Call", box: "Mailbox", match: dict | None, deadline: float,
             timeout: float | None) -> Any:
        """Nothing to take: the call waits in the box (the process shown WAITING)."""
        w = Waiter(box, call, match, deadline, timeout)
        box.waiters.append(w)
        call.caller.waiting_calls += 1
        if deadline != float("inf"):
            if not self._timeouts or deadline < self._timeouts[0][0]:
                self._wake.set()  # an earlier deadline than the timer sleeps to
            heapq.heappush(self._timeouts, (deadline, next(self._order), w))
            self._timed += 1
        return LATER

    def unwait(self, w: Waiter) -> None:
        w.done = True
        w.box.waiters.remove(w)
        w.call.caller.waiting_calls -= 1
        if w.deadline != float("inf"):
            self._timed -= 1
            if len(self._timeouts) > 2 * self._timed + 64:  # mostly answered: rebuild
                self._timeouts = [x for x in self._timeouts if not x[2].done]
                heapq.heapify(self._timeouts)

    def answer(self, w: Waiter, result: Any = None, error: SyscallError | None = None) -> bool:
        """End a wait with its answer; False if its caller has hung up. The answer
        is written first: the bookkeeping is off the path of a message's receiver."""
        try:
            return w.call.answer_nowait(result, error)
        finally:
            self.unwait(w)

    def hang_up(self, box: "Mailbox", conn: Any) -> None:
        """A connection closed: its calls waiting in the box wait no more."""
        for w in list(box.waiters):
            if w.call.conn is conn:
                self.unwait(w)

    async def timer(self) -> None:
        """The kernel's mail timer task: ETIMEDOUT for each wait whose time is up."""
        while True:
            now = trio.current_time()
            while self._timeouts and self._timeouts[0][0] <= now:
                w = heapq.heappop(self._timeouts)[2]
                if not w.done:
                    self.answer(w, error=timed_out(w.match, w.timeout))
            with trio.move_on_at(self._timeouts[0][0] if self._timeouts else float("inf")):
                await self._wake.wait()
            self._wake = trio.Event()
