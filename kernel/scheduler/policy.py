"""Scheduling policies: the order of the run queue and who yields a slot.

A policy is an object the scheduler asks four things: the queue order key
of a request, which running request gives its slot to a waiting one (when
none is free), how device seconds advance an owner's virtual time, and
whether costly samplers are held back. A running request yields only after
``quantum`` output tokens in its turn (and a stopped one at once, whatever
the policy; see placement.py):

* ``fifo``: arrival order, never preempts.
* ``rr``: arrival order; a preempted request goes to the back.
* ``priority``: weighted fair queueing on device time, weight 1024/1.25**nice
  (the CFS table: each nice step is ~10% of device share; nice -10 gets ~87x
  the share of nice 10 under contention).
* ``fair``: least device time first (unweighted).

For ``priority`` and ``fair`` a process that becomes runnable again starts at
no less than the least virtual time among runnable processes (with none, the
least there was when some last ran: a newcomer to an idle device starts level
with whoever used it, as under CFS's min_vruntime), so a long nap does not buy
a long monopoly. With no contention (a free slot for everyone) every running
request advances every tick whatever the policy: batching a sequence more is
nearly free, so holding one back would only waste the device.

What is not nearly free is a request's own sampling (a grammar checks
candidates against its parse stacks; penalties scan the vocabulary): it runs
inside the tick, so everyone in the batch waits for it. Under ``fair`` and
``priority`` (``throttles``) a *costly sampler* (one whose sampling takes
longer than the shared decode) sits out a tick while its owner's virtual time
is ahead of another running owner's, and may lose its slot before its
quantum: it gets its share of the device, and the others keep theirs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from llmagentos.syscalls.errno import SyscallError

if TYPE_CHECKING:
    from .requests import EmbedRequest, Owner, Request

NICE_MIN, NICE_MAX = -20, 19


def nice_weight(nice: int) -> float:
    return 1024.0 / (1.25 ** nice)


class Policy:
    """Arrival order, and nobody yields a slot: the base every policy refines."""

    name: ClassVar[str]
    throttles: ClassVar[bool] = False  # costly samplers sit out ticks and yield early

    def key(self, req: Request | EmbedRequest) -> tuple:
        """Queue order: least first."""
        return (req.seq,)

    def charge(self, owner: Owner, seconds: float) -> None:
        """Advance the owner's virtual time by device seconds it used."""
        owner.vtime += seconds

    def victim(self, req: Request, spent: list[tuple[int, Request]]) -> int | None:
        """The slot that one of the running requests whose turn is spent (``spent``:
        (slot, request)) yields to the waiting ``req``; None: ``req`` waits."""
        return None


class Fifo(Policy):
    name = "fifo"


class RoundRobin(Policy):
    name = "rr"

    def victim(self, req: Request, spent: list[tuple[int, Request]]) -> int | None:
        if not spent:
            return None
        return max(spent, key=lambda sr: (sr[1].turn_tokens, -sr[1].seq))[0]


class Fair(Policy):
    name = "fair"
    throttles = True

    def key(self, req: Request | EmbedRequest) -> tuple:
        return (req.owner.vtime, req.seq)

    def victim(self, req: Request, spent: list[tuple[int, Request]]) -> int | None:
        # Ties go to the waiting request: equal shares take turns, as under rr.
        mine = req.owner.vtime
        worse = [(s, r) for s, r in spent if r.owner.vtime >= mine]
        if not worse:
            return None
        return max(worse, key=lambda sr: (sr[1].owner.vtime, sr[1].turn_tokens))[0]


class Priority(Fair):
    name = "priority"

    def key(self, req: Request | EmbedRequest) -> tuple:
        return (req.owner.vtime, req.owner.nice, req.seq)

    def charge(self, owner: Owner, seconds: float) -> None:
        owner.vtime += seconds * 1024.0 / nice_weight(owner.nice)


_CLASSES = (Fifo, RoundRobin, Priority, Fair)
POLICIES = tuple(cls.name for cls in _CLASSES)


def policy_named(name: str) -> Policy:
    for cls in _CLASSES:
        if cls.name == name:
            return cls()
    raise SyscallError("EINVAL", f"unknown policy {name!r}; one of {', '.join(POLICIES)}")
