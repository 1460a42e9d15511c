"""Admission and preemption: the run queue, the slots, and the device
operations that moving a request onto a slot takes.

A request is in exactly one place: the queue (``queue``), a slot
(``slot_req``), or done. A slot's *resident owner* (``slot_owner``) is
whoever's tokens are in its KV cache, running or not: that is the prefix
cache a multi-turn process comes back to.

Placement (per request): the process's own idle slot, else an empty one, else
the least recently used idle slot (whose tokens are first saved to the
snapshot store). With none idle, a slot is taken from a parked request, else
from the running request the policy names (policy.py); its state is saved,
pinned, and it goes back to the queue. Then the best source of a prefix is
used: a saved snapshot (restore), or any other slot sharing a prefix
(``Copy``: a common system prompt is decoded once), else the slot's own
prefix is kept.

Everything here runs on the trio thread while the device is idle; it only
writes down operations (drivers/device.py) for the next tick to run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from llmagentos.drivers.device import (
    Attach,
    Copy,
    Detach,
    Op,
    Prepare,
    Release,
    Restore,
    Save,
    common_prefix,
)
from llmagentos.kernel.kvstore import SnapshotStore

from .policy import Policy
from .requests import Owner, Request

MIN_COPY = 8        # shortest shared prefix worth a copy_prefix
MIN_RESTORE = 16    # shortest snapshot prefix worth a restore
MIN_IDLE_SAVE = 32  # shortest idle conversation worth saving on eviction


class Placement:
    """The run queue and the slots of one device (see the module doc)."""

    def __init__(self, n_slots: int, policy: Policy, quantum: int, snapshots: SnapshotStore,
                 owners: dict[int, Owner], clock: Callable[[], float],
                 costly: Callable[[Request], bool]) -> None:
        self.n_slots = n_slots
        self.policy = policy
        self.quantum = quantum
        self.snapshots = snapshots
        self.owners = owners    # the live processes: only theirs is worth saving
        self.clock = clock
        self.costly = costly    # does a request's own sampling cost more than the decode?
        self.queue: list[Request] = []
        self.slot_req: list[Request | None] = [None] * n_slots
        self.slot_owner: list[int | None] = [None] * n_slots
        self.slot_used: list[float] = [0.0] * n_slots
        self.preemptions = 0
        self._seqs = itertools.count()
        self._round = 0

    def enqueue(self, req: Request) -> None:
        """To the back of the queue (the policy's key may still put it ahead)."""
        req.seq = next(self._seqs)
        self.queue.append(req)

    def running(self) -> list[tuple[int, Request]]:
        """(slot, request) of every slot with a request, parked or not."""
        return [(s, r) for s, r in enumerate(self.slot_req) if r is not None]

    def has_request(self, req_id: int) -> bool:
        """Is the request queued? (A preempted one's saved state is worth keeping.)"""
        return any(r.id == req_id for r in self.queue)

    def holds(self, pid: int) -> bool:
        """Has process ``pid`` anything here: a request, a resident slot or saved state?"""
        return (any(r.owner.pid == pid for r in self.queue)
                or any(r is not None and r.owner.pid == pid for r in self.slot_req)
                or pid in self.slot_owner or ("owner", pid) in self.snapshots)

    def slot_state(self, slot: int) -> str:
        req = self.slot_req[slot]
        if req is None:
            return "empty" if self.slot_owner[slot] is None else "idle"
        return "parked" if req.owner.stopped else "running"

    # -- admission -------------------------------------------------------------------------

    def admit_waiting(self, waiting: list[Request], ops: list[Op],
                      view: list[list[int]]) -> None:
        """Put ``waiting`` (in policy order) on slots while there are slots to have.

        ``view`` is each slot's tokens as they will be once ``ops`` have run; it is
        kept so as the admissions add operations."""
        self._round += 1
        for req in waiting:
            if req.no_admit_round == self._round:
                continue
            slot = self._idle_slot(req, view)
            if slot is None:
                slot = self._victim(req)
                if slot is None:
                    break  # the queue is in policy order: nobody behind can do better
                self._preempt(slot, ops)
            self._admit(req, slot, ops, view)

    def _idle_slot(self, req: Request, view: list[list[int]]) -> int | None:
        idle = [s for s in range(self.n_slots) if self.slot_req[s] is None]
        if not idle:
            return None
        ctx = req.gen.context
        own = [s for s in idle if self.slot_owner[s] == req.owner.pid]
        if own:
            return max(own, key=lambda s: (common_prefix(view[s], ctx), self.slot_used[s]))
        empty = [s for s in idle if not view[s] and self.slot_owner[s] is None]
        if empty:
            return empty[0]
        return min(idle, key=lambda s: self.slot_used[s])

    def _victim(self, req: Request) -> int | None:
        """A slot to take from someone for ``req``: a parked request's, else per policy."""
        held = self.running()
        parked = [(s, r) for s, r in held if r.owner.stopped]
        if parked:
            return min(parked, key=lambda sr: self.slot_used[sr[0]])[0]
        spent = [(s, r) for s, r in held if r.turn_tokens >= self.quantum or (
            self.policy.throttles and self.costly(r))]  # (it may sit out long)
        return self.policy.victim(req, spent)

    def _preempt(self, slot: int, ops: list[Op]) -> None:
        """Take the slot's request off the device: save its state, send it back to the queue."""
        req = self.slot_req[slot]
        assert req is not None
        ops.append(Save(slot, ("req", req.id), pinned=True))
        ops.append(Detach(slot))
        self.slot_req[slot] = None
        req.state = "queued"
        req.slot = None
        req.turn_tokens = 0
        req.no_admit_round = self._round
        req.wait_since = None if req.owner.stopped else self.clock()
        self.enqueue(req)
        self.preemptions += 1

    def _admit(self, req: Request, slot: int, ops: list[Op], view: list[list[int]]) -> None:
        ctx = req.gen.context
        pid = req.owner.pid
        resident = self.slot_owner[slot]
        snap = self.snapshots.peek(("req", req.id)) or self.snapshots.peek(("owner", pid))
        snap_n = common_prefix(snap.tokens, ctx) if snap is not None else 0
        own_n = common_prefix(view[slot], ctx)
        src, src_n = None, 0
        for s in range(self.n_slots):
            if s != slot and view[s]:
                n = common_prefix(view[s], ctx)
                if n > src_n:
                    src, src_n = s, n
        best = max(own_n, src_n, snap_n)
        # The slot's current tokens belong to someone else and will be overwritten: keep them.
        if (resident is not None and resident != pid and len(view[slot]) >= MIN_IDLE_SAVE
                and own_n < len(view[slot]) and self.owners.get(resident) is not None
                and not any(isinstance(op, Save) and op.slot == slot for op in ops)):
            ops.append(Save(slot, ("owner", resident)))
        # A preempted request's own state is exact: restore it whenever it is the best
        # source. Idle caches and copies must beat the slot's own prefix by a margin.
        pinned = snap is not None and snap.pinned
        if snap is not None and snap_n == best and snap_n > own_n and (
                pinned or snap_n - max(own_n, src_n) >= MIN_RESTORE):
            self.snapshots.take(snap.key)
            ops.append(Restore(slot, snap))
            view[slot] = list(snap.tokens)
        elif src is not None and src_n == best and src_n - own_n >= MIN_COPY:
            ops.append(Copy(src, slot, src_n))
            view[slot] = view[src][:src_n]
        ops.append(Prepare(slot, ctx, req))
        ops.append(Attach(slot, req.gen))
        keep = min(common_prefix(view[slot], ctx), len(ctx) - 1)
        view[slot] = ctx[:keep]
        if req in self.queue:
            self.queue.remove(req)
        now = self.clock()
        if req.wait_since is not None:
            req.queue_wait += now - req.wait_since
            req.owner.usage.queue_wait += now - req.wait_since
            req.wait_since = None
        req.state = "running"
        req.slot = slot
        self.slot_req[slot] = req
        self.slot_owner[slot] = pid
        self.slot_used[slot] = now
        # The request's own stale idle cache, if any, is superseded by what runs now.
        if snap is not None and snap.key == ("owner", pid) and snap.key in self.snapshots:
            self.snapshots.discard(snap.key)

    # -- leaving -----------------------------------------------------------------------------

    def vacate(self, req: Request, ops: list[Op]) -> None:
        """Take a finished or cancelled request out of the queue or its slot."""
        req.state = "done"
        if req in self.queue:
            self.queue.remove(req)
        if req.slot is not None and self.slot_req[req.slot] is req:
            self.slot_req[req.slot] = None
            ops.append(Detach(req.slot))
        req.slot = None
        self.snapshots.discard(("req", req.id))

    def evict(self, slot: int, ops: list[Op]) -> None:
        """Forget the slot's resident tokens (its request, if any, is gone already)."""
        self.slot_owner[slot] = None
        ops.append(Release(slot))

    def forget(self, pid: int, ops: list[Op]) -> None:
        """Process ``pid`` is gone: its resident slots and idle snapshot with it."""
        for slot in range(self.n_slots):
            if self.slot_owner[slot] == pid:
                self.evict(slot, ops)
        self.snapshots.discard(("owner", pid))

    def evict_idle(self, ops: list[Op]) -> bool:
        """Forget every idle conversation (no KV room); were there any?"""
        idle = [s for s in range(self.n_slots)
                if self.slot_req[s] is None and self.slot_owner[s] is not None]
        for s in idle:
            self.evict(s, ops)
        return bool(idle)
