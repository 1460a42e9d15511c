"""The scheduler's records: requests, their owners, what a caller gets back (and
how: the mailbox), and the window of recent steps behind the rates in ``stats()``."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import outcome
import trio

from llmagentos.syscalls.errno import SyscallError

from .policy import NICE_MAX, NICE_MIN


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str
    usage: dict[str, Any]


@dataclass
class EmbedResult:
    vectors: list[list[float]]
    usage: dict[str, Any]


@dataclass
class OwnerUsage:
    tokens_in: int = 0        # prompt tokens actually decoded
    tokens_out: int = 0       # output tokens
    cached_tokens: int = 0    # prompt tokens reused (resident, copied or restored)
    device_time: float = 0.0  # seconds of device steps attributed (by tokens in the batch)
    queue_wait: float = 0.0   # seconds runnable but without a slot
    requests: int = 0


@dataclass(eq=False)
class Owner:
    """A process, as the scheduler sees it."""
    pid: int
    nice: int = 0
    stopped: bool = False
    vtime: float = 0.0        # virtual time: device seconds as the policy counts them
    usage: OwnerUsage = field(default_factory=OwnerUsage)



class Owners(dict[int, Owner]):
    """pid -> Owner: the processes one run queue has seen (the Scheduler's, a
    RemoteQueue's), with the one rule of where a returning owner's virtual time
    starts: no earlier than the least among the runnable owners (``floor``), so
    time spent stopped or away is not a credit to spend later.

    ``runnable`` gives the owners with something queued or running, stopped ones
    included (they are left out here)."""

    def __init__(self, runnable: Callable[[], Iterable[Owner]]) -> None:
        super().__init__()
        self._runnable = runnable
        self.floor = 0.0  # least virtual time among runnable owners when some last ran

    def of(self, pid: int) -> Owner:
        acct = self.get(pid)
        if acct is None:
            acct = self[pid] = Owner(pid)
        return acct

    def note_floor(self) -> None:
        """Remember the least virtual time among runnable owners (it only grows).

        Called just before an owner joins or may leave the runnable owners: in
        between, virtual times only grow, so the least is greatest then."""
        times = [o.vtime for o in self._runnable() if not o.stopped]
        if times:
            self.floor = max(self.floor, min(times))

    def activate(self, acct: Owner) -> None:
        """Coming back to the run queue: start no earlier than the runnable minimum."""
        self.note_floor()
        acct.vtime = max(acct.vtime, self.floor)

    def set_nice(self, pid: int, nice: int) -> None:
        if not isinstance(nice, int) or isinstance(nice, bool) or not NICE_MIN <= nice <= NICE_MAX:
            raise SyscallError("EINVAL", f"nice must be an integer in {NICE_MIN}..{NICE_MAX}")
        self.of(pid).nice = nice

    def usage(self, pid: int) -> dict[str, Any]:
        acct = self.get(pid)
        if acct is None:
            raise SyscallError("ESRCH", f"no usage recorded for process {pid}")
        return dict(vars(acct.usage))

    def rows(self) -> dict[int, dict[str, Any]]:
        """Each owner's usage, nice value and stopped flag: the run queue's stats."""
        return {pid: dict(vars(o.usage), nice=o.nice, stopped=o.stopped)
                for pid, o in self.items()}


class Mailbox:
    """What the device loop hands the task waiting on a request: the pieces of text
    it streams (only when the caller streams them itself) and, last, the outcome.
    The waiting task is woken when something is there for it, once however much
    piled up: a request nobody streams wakes its caller once, at the end."""

    __slots__ = ("pieces", "outcome", "_bell")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.outcome: outcome.Outcome | None = None
        self._bell: trio.Event | None = None

    def put(self, piece: str) -> None:
        self.pieces.append(piece)
        if self._bell is not None:
            self._bell.set()

    def close(self, result: outcome.Outcome) -> None:
        """The last item (a result or an error); later ones are dropped."""
        if self.outcome is None:
            self.outcome = result
            if self._bell is not None:
                self._bell.set()

    async def wait(self) -> None:
        """Until there are pieces or the outcome."""
        if not self.pieces and self.outcome is None:
            self._bell = bell = trio.Event()
            try:
                await bell.wait()
            finally:
                self._bell = None


@dataclass(eq=False)
class Request:
    id: int
    owner: Owner
    gen: Any                         # the device's decoding state of the request
    box: Mailbox
    submitted: float
    # Streaming: called by the device loop with each piece of text (must not block);
    # None when the caller streams from its own task (box.pieces) or not at all.
    on_piece: Callable[[str], Any] | None = None
    keep_pieces: bool = False        # put the pieces in box (an async on_token)
    seq: int = 0                     # queue position key (fifo/rr), set when queued
    state: str = "queued"            # queued | running | done
    slot: int | None = None
    admitted_once: bool = False
    turn_tokens: int = 0
    cached_tokens: int = 0
    device_time: float = 0.0
    queue_wait: float = 0.0
    wait_since: float | None = None  # runnable and waiting since
    no_admit_round: int = -1         # preempted in this planning round: not re-admitted in it
    sample_cost: float = 0.0         # seconds of its own sampling per token (average)
    decoding: bool = False           # its prompt is fed: the device takes a token a step

    @property
    def done(self) -> bool:
        return self.state == "done"


@dataclass(eq=False)
class EmbedRequest:
    id: int
    owner: Owner
    job: Any                         # the device's Embedding
    box: Mailbox
    seq: int
    submitted: float
    state: str = "queued"            # queued | done
    device_time: float = 0.0
    started: float | None = None     # its first chunk

    @property
    def done(self) -> bool:
        return self.state == "done"


class StatsWindow:
    """The device's recent work, for the rates in ``stats()``: (time, tokens out,
    busy seconds, batch rows) of each step or embed chunk in the last ``span`` s."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._items: deque[tuple[float, int, float, int]] = deque()

    def add(self, t: float, tokens: int, busy: float, rows: int) -> None:
        self._items.append((t, tokens, busy, rows))

    def totals(self, now: float) -> tuple[int, float, int, int]:
        """(tokens, busy seconds, rows, entries) within the window ending ``now``."""
        items = self._items
        while items and items[0][0] < now - self.span:
            items.popleft()
        return (sum(x[1] for x in items), sum(x[2] for x in items),
                sum(x[3] for x in items), len(items))
