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

Slots are many (the device's ``n_seq_max``); what bounds admission is the KV
pool (``device.kv_size`` cells, drivers/device.py). A request is admitted
while the pool holds its uncached prompt plus ``KV_HEADROOM`` cells for its
next tokens, after the same for every running request (``_Room``). When it
does not, idle resident caches give way, least recently used first (saved
when worth it), then parked requests, then the running requests the policy
would preempt for it; if even that is not enough, it waits. A step that
still finds the pool full (running sequences grew) preempts the running
request last in policy order (``preempt_for_room``).

Everything here runs on the trio thread while the device is idle; it only
writes down operations (drivers/device.py) for the next tick to run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
KV_HEADROOM = 16    # KV cells kept free per running request for its next tokens


@dataclass
class _Room:
    """The KV pool during one planning round: cells free once every running
    request has its pending prompt and headroom, and per slot the cells that
    releasing it would free (0 once a copy this round shares them)."""
    free: int
    exclusive: list[int]


def headroom(req: Request, kv_size: int) -> int:
    """Cells kept for a request's next tokens: those it may still feed (its last
    token is sampled, never fed), at most KV_HEADROOM, and no more than the pool
    has beside its context (alone it is always admitted)."""
    gen = req.gen
    return max(0, min(KV_HEADROOM, gen.params.max_tokens - len(gen.tokens) - 1,
                      kv_size - len(gen.prompt_tokens) - len(gen.tokens)))


class Placement:
    """The run queue and the slots of one device (see the module doc)."""

    def __init__(self, n_slots: int, policy: Policy, quantum: int, snapshots: SnapshotStore,
                 owners: dict[int, Owner], clock: Callable[[], float],
                 costly: Callable[[Request], bool], device: Any = None) -> None:
        self.n_slots = n_slots
        self.policy = policy
        self.quantum = quantum
        self.snapshots = snapshots
        self.owners = owners    # the live processes: only theirs is worth saving
        self.clock = clock
        self.costly = costly    # does a request's own sampling cost more than the decode?
        # the KV pool's counts, where the device keeps them (a Ray proxy does not)
        self.device = device if hasattr(device, "kv_used") else None
        self.queue: list[Request] = []
        self.slot_req: list[Request | None] = [None] * n_slots
        self.slot_owner: list[int | None] = [None] * n_slots
        self.slot_used: list[float] = [0.0] * n_slots
        self.preemptions = 0
        self._seqs = itertools.count()
        self._round = 0
        self._fresh: set[int] = set()

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
        self._fresh.clear()  # slots admitted this round: not yet on the device
        room = self._room(ops)
        for req in waiting:
            if req.no_admit_round == self._round:
                continue
            slot = self._idle_slot(req, view)
            if slot is None:
                slot = self._victim(req)
                if slot is None:
                    break  # the queue is in policy order: nobody behind can do better
                if room is not None:
                    room.free += self._held_room(slot)
                self._preempt(slot, ops)
            source = None
            if room is not None:
                source = self._fit(req, slot, ops, view, room)
                if source is None:
                    break  # the pool cannot hold it yet; nobody behind goes first
            self._admit(req, slot, ops, view, source)

    # -- the KV pool -----------------------------------------------------------------------

    def _room(self, ops: list[Op]) -> _Room | None:
        dev = self.device
        if dev is None:
            return None
        exclusive = dev.exclusive_cells()
        free = dev.kv_size - dev.kv_used()
        for op in ops:
            if isinstance(op, Release):  # left by the last tick's leavers: freed first
                free += exclusive[op.slot]
                exclusive[op.slot] = 0
        for slot, req in self.running():
            free -= dev.slot_pending(slot) + headroom(req, dev.kv_size)
        return _Room(free, exclusive)

    def _held_room(self, slot: int) -> int:
        """What a running request holds beyond its cells: pending prompt and headroom."""
        req = self.slot_req[slot]
        if req is None:
            return 0
        return self.device.slot_pending(slot) + headroom(req, self.device.kv_size)

    def _fit(self, req: Request, slot: int, ops: list[Op], view: list[list[int]],
             room: _Room) -> tuple[str, int | None, int] | None:
        """Make the pool hold ``req`` on ``slot``; the prefix source to use, or None
        (it must wait). A prefix copied from an idle slot keeps that slot's cells: if
        that is too tight, the slot gives way and the prompt is decoded instead."""
        source = self._source(req, slot, view)
        kind, src, _ = source
        if self._make_room(req, slot, source, ops, view, room):
            return source
        if kind == "copy" and self.slot_req[src] is None:
            own = ("own", None, common_prefix(view[slot], req.gen.context))
            if self._make_room(req, slot, own, ops, view, room):
                return own
        return None

    def _make_room(self, req: Request, slot: int, source: tuple[str, int | None, int],
                   ops: list[Op], view: list[list[int]], room: _Room) -> bool:
        """Give way idle caches, parked and spent requests until the pool holds ``req``
        admitted with ``source``; nothing is touched when even that is too little."""
        kind, src, n = source
        ctx = req.gen.context
        # Prepare re-feeds the last token of a prompt that is all resident.
        shared = min(n, len(ctx) - 1) if kind in ("own", "copy") else 0
        need = len(ctx) - shared + headroom(req, self.device.kv_size)
        # The slot's own cells past what is kept are freed when it is prepared.
        gain = max(0, room.exclusive[slot] - (shared if kind == "own" else 0))
        if room.free + gain >= need:
            room.free += gain - need
            room.exclusive[slot] = 0
            if kind == "copy":
                room.exclusive[src] = 0
            return True
        idle = sorted((s for s in range(self.n_slots) if s not in (slot, src)
                       and self.slot_req[s] is None and room.exclusive[s] > 0),
                      key=lambda s: self.slot_used[s])
        idle_out: list[int] = []
        for s in idle:
            if room.free + gain >= need:
                break
            idle_out.append(s)
            gain += room.exclusive[s]
        out: list[int] = []
        if room.free + gain < need:
            held = [(s, r) for s, r in self.running() if s != src and s not in self._fresh]
            parked = sorted((sr for sr in held if sr[1].owner.stopped),
                            key=lambda sr: self.slot_used[sr[0]])
            spent = [(s, r) for s, r in held if not r.owner.stopped and (
                r.turn_tokens >= self.quantum or (self.policy.throttles and self.costly(r)))]
            while room.free + gain < need:
                if parked:
                    s = parked.pop(0)[0]
                else:
                    s = self.policy.victim(req, spent)
                    if s is None:
                        return False
                    spent = [sr for sr in spent if sr[0] != s]
                out.append(s)
                gain += room.exclusive[s] + self._held_room(s)
        for s in out:
            self._preempt(s, ops)
        for s in idle_out + out:
            self._give_way(s, ops, view)
            room.exclusive[s] = 0
        room.free += gain - need
        room.exclusive[slot] = 0
        if kind == "copy":
            room.exclusive[src] = 0
        return True

    def _give_way(self, slot: int, ops: list[Op], view: list[list[int]]) -> None:
        """Free an idle slot's cells; its conversation is saved first if worth it."""
        resident = self.slot_owner[slot]
        if (resident is not None and len(view[slot]) >= MIN_IDLE_SAVE
                and self.owners.get(resident) is not None
                and not any(isinstance(op, Save) and op.slot == slot for op in ops)):
            ops.append(Save(slot, ("owner", resident)))
        self.evict(slot, ops)
        view[slot] = []

    def preempt_for_room(self, key: Callable[[Request], Any], ops: list[Op],
                         view: list[list[int]]) -> bool:
        """A step found the pool full: a parked request, else the running request last
        in policy order (``key``), is saved and requeued and its cells freed. False
        when one request alone holds the device: it cannot fit."""
        held = self.running()
        if len(held) < 2:
            return False
        parked = [(s, r) for s, r in held if r.owner.stopped]
        if parked:
            slot = min(parked, key=lambda sr: self.slot_used[sr[0]])[0]
        else:
            slot = max(held, key=lambda sr: key(sr[1]))[0]
        self._preempt(slot, ops)
        self._give_way(slot, ops, view)
        return True

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

    def _source(self, req: Request, slot: int,
                view: list[list[int]]) -> tuple[str, int | None, int]:
        """Where ``req``'s prefix on ``slot`` comes from: ("restore", None, n) a saved
        snapshot, ("copy", src, n) another slot, or ("own", None, n) the slot's own."""
        ctx = req.gen.context
        snap = self._snapshot(req)
        snap_n = common_prefix(snap.tokens, ctx) if snap is not None else 0
        own_n = common_prefix(view[slot], ctx)
        src, src_n = None, 0
        for s in range(self.n_slots):
            if s != slot and view[s]:
                n = common_prefix(view[s], ctx)
                if n > src_n:
                    src, src_n = s, n
        best = max(own_n, src_n, snap_n)
        # A preempted request's own state is exact: restore it whenever it is the best
        # source. Idle caches and copies must beat the slot's own prefix by a margin.
        pinned = snap is not None and snap.pinned
        if snap is not None and snap_n == best and snap_n > own_n and (
                pinned or snap_n - max(own_n, src_n) >= MIN_RESTORE):
            return "restore", None, snap_n
        if src is not None and src_n == best and src_n - own_n >= MIN_COPY:
            return "copy", src, src_n
        return "own", None, own_n

    def _snapshot(self, req: Request) -> Any:
        return (self.snapshots.peek(("req", req.id))
                or self.snapshots.peek(("owner", req.owner.pid)))

    def _admit(self, req: Request, slot: int, ops: list[Op], view: list[list[int]],
               source: tuple[str, int | None, int] | None = None) -> None:
        ctx = req.gen.context
        pid = req.owner.pid
        resident = self.slot_owner[slot]
        snap = self._snapshot(req)
        kind, src, n = source or self._source(req, slot, view)
        own_n = common_prefix(view[slot], ctx)
        # The slot's current tokens belong to someone else and will be overwritten: keep them.
        if (resident is not None and resident != pid and len(view[slot]) >= MIN_IDLE_SAVE
                and own_n < len(view[slot]) and self.owners.get(resident) is not None
                and not any(isinstance(op, Save) and op.slot == slot for op in ops)):
            ops.append(Save(slot, ("owner", resident)))
        if kind == "restore":
            self.snapshots.take(snap.key)
            ops.append(Restore(slot, snap))
            view[slot] = list(snap.tokens)
        elif kind == "copy":
            ops.append(Copy(src, slot, n))
            view[slot] = view[src][:n]
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
        self._fresh.add(slot)
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

    def evict_idle(self, ops: list[Op], view: list[list[int]]) -> bool:
        """Free every idle conversation (no KV room), saving those worth it; were
        there any?"""
        idle = [s for s in range(self.n_slots)
                if self.slot_req[s] is None and self.slot_owner[s] is not None]
        for s in idle:
            self._give_way(s, ops, view)
        return bool(idle)

