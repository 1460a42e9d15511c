"""The run queue and the device loop: who gets the compute device's slots, and when.

The loop runs in ticks. Between ticks, on the trio thread, it admits waiting
requests to slots (which may mean preempting one) and writes down the device
operations that admission needs. Then one worker-thread call runs those
operations and one ``Device.step`` (continuous batching: a token for every
running request, plus prompt chunks). Back on the trio thread it hands out
the tokens. The worker is never abandoned on cancel: it owns the llama context.

Invariants:

* Only the loop touches the device, and only in its worker call or between
  ticks. Code running while a tick is in flight (``generate`` being
  cancelled, ``release``, ``stop``) changes bookkeeping only and leaves device
  work in ``_deferred`` for the next tick.
* A request is in exactly one place: the queue (``_queue``), a slot
  (``_slot_req``), or done. A slot's *resident owner* (``_slot_owner``) is
  whoever's tokens are in its KV cache, running or not: that is the prefix
  cache a multi-turn process comes back to.

Placement (per request): the process's own idle slot, else an empty one, else
the least recently used idle slot (whose tokens are first saved to the
snapshot store). Then the best source of a prefix is used: a saved snapshot
(restore), or any other slot sharing a prefix (``copy_prefix``: a common
system prompt is decoded once), else the slot's own prefix is kept.

Policies decide the order of the queue and who yields a slot when none is
free. A running request yields only after ``quantum`` output tokens in its
turn (and a stopped one at once, whatever the policy):

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
a long monopoly. With no contention (a free slot for everyone)
every running request advances every tick whatever the policy: batching a
sequence more is nearly free, so holding one back would only waste the device.

What is not nearly free is a request's own sampling (a grammar checks
candidates against its parse stacks; penalties scan the vocabulary): it runs
inside the tick, so everyone in the batch waits for it. A step's decode time is
shared among its slots by tokens fed, and each slot's sampling time is its
own. Under ``fair`` and ``priority`` a *costly sampler* (one whose sampling
takes longer than the shared decode) sits out a tick while its owner's virtual
time is ahead of another running owner's, and may lose its slot before its
quantum: it gets its share of the device, and the others keep theirs.

Embeddings are requests too (``embed``): each tick may add one chunk of the
embed request first in policy order (``Device.embed_step``, a bounded decode
on the embedding context), when its owner's virtual time is no more than the
least of the generating owners'; the chunk's time is charged to that owner.
So a long embed time-shares the device with generation instead of stalling
it, and is withdrawn like a generation (cancel, STOP, release).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from llmagentos.drivers.device import DeviceFullError, StepResult
from llmagentos.drivers.llama_device import Generation
from llmagentos.drivers.sampling import SamplingParams
from llmagentos.kernel.kvstore import SnapshotStore
from llmagentos.syscalls.errno import SyscallError

log = logging.getLogger(__name__)

POLICIES = ("fifo", "rr", "priority", "fair")
NICE_MIN, NICE_MAX = -20, 19
MIN_COPY = 8        # shortest shared prefix worth a copy_prefix
MIN_RESTORE = 16    # shortest snapshot prefix worth a restore
MIN_IDLE_SAVE = 32  # shortest idle conversation worth saving on eviction
STATS_WINDOW = 10.0
COST_EWMA = 0.2     # weight of the newest sample in the per-token cost averages


def nice_weight(nice: int) -> float:
    return 1024.0 / (1.25 ** nice)


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str
    usage: dict[str, Any]


@dataclass
class OwnerUsage:
    tokens_in: int = 0        # prompt tokens actually decoded
    tokens_out: int = 0       # output tokens
    cached_tokens: int = 0    # prompt tokens reused (resident, copied or restored)
    device_time: float = 0.0  # seconds of device steps attributed (by tokens in the batch)
    queue_wait: float = 0.0   # seconds runnable but without a slot
    requests: int = 0


@dataclass
class EmbedResult:
    vectors: list[list[float]]
    usage: dict[str, Any]


@dataclass(eq=False)
class _Owner:
    pid: int
    nice: int = 0
    stopped: bool = False
    vtime_fair: float = 0.0   # device seconds
    vtime_prio: float = 0.0   # device seconds / weight
    usage: OwnerUsage = field(default_factory=OwnerUsage)


@dataclass(eq=False)
class _Request:
    id: int
    owner: _Owner
    gen: Generation
    send: trio.MemorySendChannel
    seq: int                         # queue position key (fifo/rr)
    submitted: float
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

    @property
    def done(self) -> bool:
        return self.state == "done"


@dataclass(eq=False)
class _EmbedRequest:
    id: int
    owner: _Owner
    job: Any                         # the device's Embedding
    send: trio.MemorySendChannel
    seq: int
    submitted: float
    state: str = "queued"            # queued | done
    device_time: float = 0.0
    started: float | None = None     # its first chunk

    @property
    def done(self) -> bool:
        return self.state == "done"


class Scheduler:
    """Continuous-batching scheduler over one Device. See the module doc."""

    def __init__(
        self,
        device: Any,
        policy: str = "fair",
        quantum: int = 16,
        snapshot_ram_bytes: int = 256 << 20,
        spill_dir: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        slots: int | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise SyscallError("EINVAL", f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        if quantum < 1:
            raise SyscallError("EINVAL", "quantum must be >= 1 token")
        self.device = device
        self.policy = policy
        self.quantum = quantum
        self.clock = clock
        self.n_slots = min(slots or device.n_seq_max, device.n_seq_max)
        self.snapshots = SnapshotStore(snapshot_ram_bytes, spill_dir)
        self._owners: dict[int, _Owner] = {}
        self._queue: list[_Request] = []
        self._embeds: list[_EmbedRequest] = []
        self._decode_cost = 0.0  # seconds of a step's shared decode (average)
        self._floor = (0.0, 0.0)  # least (fair, prio) virtual time when some last ran
        self._slot_req: list[_Request | None] = [None] * self.n_slots
        self._slot_owner: list[int | None] = [None] * self.n_slots
        self._slot_used: list[float] = [0.0] * self.n_slots
        self._deferred: list[tuple] = []   # device ops left by code that ran during a tick
        self._to_close: list[Generation] = []
        self._ids = itertools.count(1)
        self._seqs = itertools.count()
        self._round = 0
        self._wake = trio.Event()
        self._running = False
        self._started = clock()
        # Counters for stats().
        self.steps = 0
        self.busy = 0.0
        self.tokens_out = 0
        self.tokens_in = 0
        self.batch_rows = 0
        self.preemptions = 0
        self.restores = 0
        self.restore_failures = 0
        self.copies = 0
        self.copied_tokens = 0
        self.idle_saves = 0
        self.embed_chunks = 0
        self.embed_tokens = 0
        self.throttled = 0
        self._window: deque[tuple[float, int, float, int]] = deque()  # (t, tokens, busy, rows)

    # -- the API the kernel uses ---------------------------------------------------------

    async def generate(
        self,
        owner: int,
        prompt_tokens: Sequence[int],
        params: SamplingParams | dict | None = None,
        *,
        nice: int | None = None,
        on_token: Callable[[str], Awaitable[Any]] | None = None,
    ) -> Result:
        """Run one completion for process ``owner``; returns when it finishes.

        Cancelling the awaiting task withdraws the request and frees its slot.
        ``on_token`` receives each new piece of text as it becomes safe to show.
        """
        # EINVAL/E2BIG here. A grammar (or JSON schema) is converted, compiled and
        # probed in the request's constructor: a worker thread's time, not the loop's.
        params = SamplingParams.from_dict(params)
        if params.grammar is not None or params.json_schema not in (None, False):
            gen = await trio.to_thread.run_sync(
                self.device.generation, list(prompt_tokens), params)
        else:
            gen = self.device.generation(list(prompt_tokens), params)
        acct = self._owner(owner)
        if nice is not None:
            self.set_nice(owner, nice)
        send, recv = trio.open_memory_channel(math.inf)
        now = self.clock()
        req = _Request(next(self._ids), acct, gen, send, next(self._seqs), now)
        req.wait_since = None if acct.stopped else now
        acct.usage.requests += 1
        self._activate(acct)
        self._queue.append(req)
        self._kick()
        try:
            async for kind, value in recv:
                if kind == "piece":
                    if on_token is not None:
                        await on_token(value)
                elif kind == "done":
                    return value
                else:
                    raise value
            raise SyscallError("ESHUTDOWN", "the device loop stopped")
        finally:
            if not req.done:  # cancelled, or on_token failed: withdraw the request
                self._cancel(req)
            recv.close()

    async def embed(self, owner: int, job: Any, *, nice: int | None = None) -> EmbedResult:
        """Run an embed request (a ``Device.embedding``) for ``owner``, a chunk per tick
        under the policy. Cancelling the awaiting task withdraws it."""
        if not hasattr(self.device, "embed_step"):
            raise SyscallError("ENOSYS", "this device does not compute embeddings")
        acct = self._owner(owner)
        if nice is not None:
            self.set_nice(owner, nice)
        send, recv = trio.open_memory_channel(math.inf)
        req = _EmbedRequest(next(self._ids), acct, job, send, next(self._seqs), self.clock())
        acct.usage.requests += 1
        self._activate(acct)
        self._embeds.append(req)
        self._kick()
        try:
            async for kind, value in recv:
                if kind == "done":
                    return value
                raise value
            raise SyscallError("ESHUTDOWN", "the device loop stopped")
        finally:
            if not req.done:
                self._cancel_embed(req)
            recv.close()

    def stop(self, owner: int) -> None:
        """SIGSTOP: park the owner's requests. Their slots may be given away (state saved)."""
        acct = self._owner(owner)
        if acct.stopped:
            return
        acct.stopped = True
        now = self.clock()
        for req in self._queue:
            if req.owner is acct and req.wait_since is not None:
                req.queue_wait += now - req.wait_since
                req.wait_since = None
        self._kick()

    def cont(self, owner: int) -> None:
        """SIGCONT: resume where the requests left off."""
        acct = self._owner(owner)
        if not acct.stopped:
            return
        acct.stopped = False
        now = self.clock()
        for req in self._queue:
            if req.owner is acct:
                req.wait_since = now
        self._activate(acct)
        self._kick()

    async def release(self, owner: int) -> None:
        """The process is gone: cancel its requests, free its slots and snapshots."""
        acct = self._owners.pop(owner, None)
        if acct is not None:
            for req in [r for r in self._queue if r.owner is acct]:
                self._cancel(req, SyscallError("ECANCELED", f"process {owner} released"))
            for req in [r for r in self._slot_req if r is not None and r.owner is acct]:
                self._cancel(req, SyscallError("ECANCELED", f"process {owner} released"))
            for ereq in [e for e in self._embeds if e.owner is acct]:
                self._cancel_embed(ereq, SyscallError("ECANCELED", f"process {owner} released"))
        for slot in range(self.n_slots):
            if self._slot_owner[slot] == owner:
                self._slot_owner[slot] = None
                self._deferred.append(("release", slot))
        self.snapshots.discard(("owner", owner))
        self._kick()
        await trio.lowlevel.checkpoint()

    def set_nice(self, owner: int, nice: int) -> None:
        if not isinstance(nice, int) or isinstance(nice, bool) or not NICE_MIN <= nice <= NICE_MAX:
            raise SyscallError("EINVAL", f"nice must be an integer in {NICE_MIN}..{NICE_MAX}")
        self._owner(owner).nice = nice

    def usage(self, owner: int) -> dict[str, Any]:
        acct = self._owners.get(owner)
        if acct is None:
            raise SyscallError("ESRCH", f"no usage recorded for process {owner}")
        return dict(vars(acct.usage))

    def load(self) -> int:
        """Requests queued or running: what a DeviceSet balances new processes by."""
        return (len(self._queue) + len(self._embeds)
                + sum(1 for r in self._slot_req if r is not None))

    def holds(self, owner: int) -> bool:
        """Has ``owner`` anything here: a request, a resident slot or saved state?"""
        acct = self._owners.get(owner)
        if acct is not None and (any(r.owner is acct for r in self._queue) or any(
                r is not None and r.owner is acct for r in self._slot_req)
                or any(e.owner is acct for e in self._embeds)):
            return True
        return owner in self._slot_owner or ("owner", owner) in self.snapshots

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        while self._window and self._window[0][0] < now - STATS_WINDOW:
            self._window.popleft()
        span = min(STATS_WINDOW, max(now - self._started, 1e-9))
        w_tokens = sum(x[1] for x in self._window)
        w_busy = sum(x[2] for x in self._window)
        w_rows = sum(x[3] for x in self._window)
        slots = []
        for s in range(self.n_slots):
            req = self._slot_req[s]
            state = ("empty" if self._slot_owner[s] is None else "idle") if req is None else (
                "parked" if req.owner.stopped else "running")
            slots.append({"slot": s, "state": state, "owner": self._slot_owner[s],
                          "tokens": len(self.device.slot_tokens(s)) if self._running else None})
        return {
            "policy": self.policy,
            "quantum": self.quantum,
            "slots": slots,
            "n_slots": self.n_slots,
            "running": sum(1 for x in slots if x["state"] == "running"),
            "parked": sum(1 for x in slots if x["state"] == "parked"),
            "queue_length": len(self._queue),
            "utilization": min(1.0, w_busy / span),
            "batch_size": (w_rows / len(self._window)) if self._window else 0.0,
            "tokens_per_s": w_tokens / span,
            "steps": self.steps,
            "tokens_out": self.tokens_out,
            "tokens_in": self.tokens_in,
            "device_time": self.busy,
            "preemptions": self.preemptions,
            "restores": self.restores,
            "restore_failures": self.restore_failures,
            "prefix_copies": self.copies,
            "copied_tokens": self.copied_tokens,
            "idle_saves": self.idle_saves,
            "embed_queue": len(self._embeds),
            "embed_chunks": self.embed_chunks,
            "embed_tokens": self.embed_tokens,
            "throttled": self.throttled,
            "snapshots": {"count": len(self.snapshots), "ram_bytes": self.snapshots.ram_bytes,
                          "disk_bytes": self.snapshots.disk_bytes,
                          "ram_budget": self.snapshots.ram_budget,
                          "spills": self.snapshots.spills, "drops": self.snapshots.drops},
            "owners": {pid: dict(vars(o.usage), nice=o.nice, stopped=o.stopped)
                       for pid, o in self._owners.items()},
        }

    # -- the device loop -----------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The device loop task. Start it in the kernel's nursery (``nursery.start``)."""
        if self._running:
            raise RuntimeError("Scheduler.run() is already running")
        self._running = True
        try:
            await trio.to_thread.run_sync(self._reset_device, abandon_on_cancel=False)
            task_status.started()
            while True:
                ops, plan, ereq = self._plan()
                if not ops and not plan and ereq is None:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                if ops or plan:
                    results, step, error = await trio.to_thread.run_sync(
                        self._tick, ops, [s for s, _ in plan], abandon_on_cancel=False
                    )
                    self._apply(ops, results, plan, step)
                    if isinstance(error, DeviceFullError):
                        self._on_device_full(plan, error)
                    elif error is not None:  # a device fault must not take the kernel down
                        log.error("device tick failed: %r", error)
                        self._fail_plan(plan, SyscallError("EIO", f"device error: {error}"))
                if ereq is not None and not ereq.done:
                    n, seconds, error = await trio.to_thread.run_sync(
                        self._embed_chunk, ereq.job, abandon_on_cancel=False)
                    self._apply_embed(ereq, n, seconds, error)
                await trio.lowlevel.checkpoint()
        finally:
            self._running = False
            err = SyscallError("ESHUTDOWN", "the device loop stopped")
            for req in list(self._queue) + [r for r in self._slot_req if r is not None]:
                self._cancel(req, err)
            for ereq in list(self._embeds):
                self._cancel_embed(ereq, err)
            for gen in self._to_close:
                gen.close()
            self._to_close.clear()

    def _reset_device(self) -> None:
        for s in range(self.n_slots):
            self.device.release(s)

    def _tick(
        self, ops: list[tuple], plan: list[int]
    ) -> tuple[list[Any], StepResult, Exception | None]:
        """Worker thread: run the planned device operations, then one step.

        Never raises: what the operations did before a failure is reported with it,
        so the bookkeeping (snapshots taken, states saved) stays true.
        """
        remote_tick = getattr(self.device, "tick", None)
        if remote_tick is not None:  # a remote device runs the whole tick in one round trip
            return remote_tick(ops, plan)
        results: list[Any] = []
        try:
            self._run_ops(ops, results)
            step = self.device.step(plan) if plan else StepResult([], {}, 0, 0, 0.0)
        except Exception as exc:
            return results, StepResult([], {}, 0, 0, 0.0), exc
        return results, step, None

    def _run_ops(self, ops: list[tuple], results: list[Any]) -> None:
        d = self.device
        for op in ops:
            kind = op[0]
            if kind == "save":
                _, slot = op[:2]
                results.append((d.slot_tokens(slot), d.save(slot)))
            elif kind == "restore":
                _, slot, snap = op
                try:
                    results.append(d.restore(slot, snap.load(), snap.tokens))
                except OSError:
                    results.append(0)
            elif kind == "copy":
                _, src, dst, n = op
                results.append(d.copy_prefix(src, dst, n))
            elif kind == "prepare":
                _, slot, tokens = op[:3]
                results.append(d.prepare(slot, tokens))
            elif kind == "attach":
                _, slot, gen = op
                d.attach(slot, gen)
                results.append(None)
            elif kind == "detach":
                d.detach(op[1])
                results.append(None)
            elif kind == "release":
                d.release(op[1])
                results.append(None)
            elif kind == "embed_release":
                d.embed_release(op[1])
                results.append(None)
            else:
                raise AssertionError(f"unknown device op {kind}")

    def _embed_chunk(self, job: Any) -> tuple[int, float, Exception | None]:
        """Worker thread: one chunk of an embed request. Never raises."""
        t0 = time.perf_counter()
        try:
            n = self.device.embed_step(job)
        except Exception as exc:
            return 0, time.perf_counter() - t0, exc
        return n, time.perf_counter() - t0, None

    # -- planning (trio thread, device idle) ---------------------------------------------

    def _plan(self) -> tuple[list[tuple], list[tuple[int, _Request]], _EmbedRequest | None]:
        self._round += 1
        self._note_floor()
        for gen in self._to_close:
            gen.close()
        self._to_close.clear()
        ops: list[tuple] = list(self._deferred)
        self._deferred.clear()
        waiting = [r for r in self._queue if not r.owner.stopped]
        if waiting:
            view = [self.device.slot_tokens(s) for s in range(self.n_slots)]
            for op in ops:
                if op[0] == "release":
                    view[op[1]] = []
            self._admit_waiting(sorted(waiting, key=self._key), ops, view)
        plan = [(s, r) for s, r in enumerate(self._slot_req)
                if r is not None and not r.owner.stopped]
        plan.sort(key=lambda sr: self._key(sr[1]))
        if self.policy in ("fair", "priority") and len(plan) > 1:
            plan = self._throttle(plan)
        return ops, plan, self._pick_embed(plan, ops)

    def _costly(self, req: _Request) -> bool:
        """Does its own sampling cost more than the decode everyone shares?"""
        return req.sample_cost > max(self._decode_cost, 0.001)

    def _throttle(self, plan: list[tuple[int, _Request]]) -> list[tuple[int, _Request]]:
        """Costly samplers whose owner is ahead of another running owner sit this tick out."""
        least = min(self._vtime(r) for _, r in plan)
        keep = [(s, r) for s, r in plan if not self._costly(r) or self._vtime(r) <= least]
        self.throttled += len(plan) - len(keep)
        return keep

    def _pick_embed(self, plan: list[tuple[int, _Request]],
                    ops: list[tuple]) -> _EmbedRequest | None:
        """The embed request that gets a chunk this tick, if any (see the module doc)."""
        if not self._embeds:
            return None
        waiting = sorted((e for e in self._embeds if not e.owner.stopped), key=self._key)
        ready = [e for e in waiting if self.device.embed_runnable(e.job)]
        if not ready:
            # Half-done texts of parked embedders hold the cells: they start over later.
            for e in self._embeds:
                if waiting and e.owner.stopped and e.job.seq is not None:
                    ops.append(("embed_release", e.job))
            return None
        ereq = ready[0]
        if plan and self._vtime(ereq) > min(self._vtime(r) for _, r in plan):
            return None
        return ereq

    def _vtime(self, req: _Request | _EmbedRequest) -> float:
        acct = req.owner
        return acct.vtime_prio if self.policy == "priority" else acct.vtime_fair

    def _key(self, req: _Request | _EmbedRequest) -> tuple:
        if self.policy == "priority":
            return (req.owner.vtime_prio, req.owner.nice, req.seq)
        if self.policy == "fair":
            return (req.owner.vtime_fair, req.seq)
        return (req.seq,)

    def _admit_waiting(self, waiting: list[_Request], ops: list[tuple],
                       view: list[list[int]]) -> None:
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

    def _idle_slot(self, req: _Request, view: list[list[int]]) -> int | None:
        idle = [s for s in range(self.n_slots) if self._slot_req[s] is None]
        if not idle:
            return None
        ctx = req.gen.context
        own = [s for s in idle if self._slot_owner[s] == req.owner.pid]
        if own:
            return max(own, key=lambda s: (_lcp(view[s], ctx), self._slot_used[s]))
        empty = [s for s in idle if not view[s] and self._slot_owner[s] is None]
        if empty:
            return empty[0]
        return min(idle, key=lambda s: self._slot_used[s])

    def _victim(self, req: _Request) -> int | None:
        """A slot to take from someone for ``req``: a parked request's, else per policy."""
        held = [(s, r) for s, r in enumerate(self._slot_req) if r is not None]
        parked = [(s, r) for s, r in held if r.owner.stopped]
        if parked:
            return min(parked, key=lambda sr: self._slot_used[sr[0]])[0]
        if self.policy == "fifo":
            return None
        spent = [(s, r) for s, r in held if r.turn_tokens >= self.quantum or (
            self.policy in ("fair", "priority") and self._costly(r))]  # (it may sit out long)
        if self.policy == "rr":
            if not spent:
                return None
            return max(spent, key=lambda sr: (sr[1].turn_tokens, -sr[1].seq))[0]
        # Ties go to the waiting request: equal shares take turns, as under rr.
        mine = self._vtime(req)
        worse = [(s, r) for s, r in spent if self._vtime(r) >= mine]
        if not worse:
            return None
        return max(worse, key=lambda sr: (self._vtime(sr[1]), sr[1].turn_tokens))[0]

    def _preempt(self, slot: int, ops: list[tuple]) -> None:
        """Take the slot's request off the device: save its state, send it back to the queue."""
        req = self._slot_req[slot]
        assert req is not None
        ops.append(("save", slot, ("req", req.id), True))
        ops.append(("detach", slot))
        self._slot_req[slot] = None
        req.state = "queued"
        req.slot = None
        req.turn_tokens = 0
        req.seq = next(self._seqs)
        req.no_admit_round = self._round
        req.wait_since = None if req.owner.stopped else self.clock()
        self._queue.append(req)
        self.preemptions += 1

    def _admit(self, req: _Request, slot: int, ops: list[tuple], view: list[list[int]]) -> None:
        ctx = req.gen.context
        pid = req.owner.pid
        resident = self._slot_owner[slot]
        snap = self.snapshots.peek(("req", req.id)) or self.snapshots.peek(("owner", pid))
        snap_n = _lcp(snap.tokens, ctx) if snap is not None else 0
        own_n = _lcp(view[slot], ctx)
        src, src_n = None, 0
        for s in range(self.n_slots):
            if s != slot and view[s]:
                n = _lcp(view[s], ctx)
                if n > src_n:
                    src, src_n = s, n
        best = max(own_n, src_n, snap_n)
        # The slot's current tokens belong to someone else and will be overwritten: keep them.
        if (resident is not None and resident != pid and len(view[slot]) >= MIN_IDLE_SAVE
                and own_n < len(view[slot]) and self._owners.get(resident) is not None
                and not any(op[0] == "save" and op[1] == slot for op in ops)):
            ops.append(("save", slot, ("owner", resident), False))
        # A preempted request's own state is exact: restore it whenever it is the best
        # source. Idle caches and copies must beat the slot's own prefix by a margin.
        pinned = snap is not None and snap.pinned
        if snap is not None and snap_n == best and snap_n > own_n and (
                pinned or snap_n - max(own_n, src_n) >= MIN_RESTORE):
            self.snapshots.take(snap.key)
            ops.append(("restore", slot, snap))
            view[slot] = list(snap.tokens)
        elif src is not None and src_n == best and src_n - own_n >= MIN_COPY:
            ops.append(("copy", src, slot, src_n))
            view[slot] = view[src][:src_n]
        ops.append(("prepare", slot, ctx, req))
        ops.append(("attach", slot, req.gen))
        keep = min(_lcp(view[slot], ctx), len(ctx) - 1)
        view[slot] = ctx[:keep]
        if req in self._queue:
            self._queue.remove(req)
        now = self.clock()
        if req.wait_since is not None:
            req.queue_wait += now - req.wait_since
            req.owner.usage.queue_wait += now - req.wait_since
            req.wait_since = None
        req.state = "running"
        req.slot = slot
        self._slot_req[slot] = req
        self._slot_owner[slot] = pid
        self._slot_used[slot] = now
        # The request's own stale idle cache, if any, is superseded by what runs now.
        if snap is not None and snap.key == ("owner", pid) and snap.key in self.snapshots:
            self.snapshots.discard(snap.key)

    # -- results (trio thread, device idle) ----------------------------------------------

    def _apply(self, ops: list[tuple], results: list[Any], plan: list[tuple[int, _Request]],
               step: StepResult) -> None:
        now = self.clock()
        for op in ops[len(results):]:  # not run (the tick failed first)
            if op[0] == "restore" and op[2].key not in self.snapshots:
                snap = op[2]
                if snap.data is not None or snap.path is not None:
                    self.snapshots.put(snap.key, snap.tokens, snap.load(), pinned=snap.pinned)
                    SnapshotStore.finish(snap)
        for op, res in zip(ops, results):
            kind = op[0]
            if kind == "save":
                tokens, data = res
                key, pinned = op[2], op[3]
                alive = (key[0] == "req" and self._request_alive(key[1])) or (
                    key[0] == "owner" and key[1] in self._owners)
                if alive and tokens:
                    self.snapshots.put(key, tokens, data, pinned=pinned)
                    if key[0] == "owner":
                        self.idle_saves += 1
            elif kind == "restore":
                snap = op[2]
                SnapshotStore.finish(snap)
                if res:
                    self.restores += 1
                else:
                    self.restore_failures += 1
            elif kind == "copy":
                self.copies += 1
                self.copied_tokens += res
            elif kind == "prepare":
                req = op[3]
                if not req.admitted_once:
                    req.admitted_once = True
                    n_prompt = len(req.gen.prompt_tokens)
                    reused = min(res, n_prompt)
                    req.cached_tokens = reused
                    req.owner.usage.cached_tokens += reused
                    req.owner.usage.tokens_in += n_prompt - reused
                    self.tokens_in += n_prompt - reused
        total_fed = sum(step.fed.values())
        by_slot = dict(plan)
        sampled = step.sample_seconds
        shared = max(0.0, step.seconds - sum(sampled.values()))
        if step.fed:
            self._decode_cost += COST_EWMA * (shared - self._decode_cost)
        for slot, fed in step.fed.items():
            req = by_slot.get(slot)
            if req is None or total_fed == 0:
                continue
            own = sampled.get(slot)
            if own is not None:
                req.sample_cost += COST_EWMA * (own - req.sample_cost)
            share = shared * fed / total_fed + (own or 0.0)
            req.device_time += share
            acct = req.owner
            acct.usage.device_time += share
            acct.vtime_fair += share
            acct.vtime_prio += share * 1024.0 / nice_weight(acct.nice)
            self._slot_used[slot] = now
        n_out = 0
        for ev in step.events:
            req = by_slot.get(ev.slot)
            if req is None or req.state != "running" or req.slot != ev.slot:
                continue  # cancelled or moved while the tick was in flight
            if ev.token is not None and not (ev.finished and ev.reason == "eog"):
                n_out += 1
                req.turn_tokens += 1
                req.owner.usage.tokens_out += 1
            if ev.piece:
                _send(req, ("piece", ev.piece))
            if ev.finished:
                self._finish(req)
        self.tokens_out += n_out
        self.steps += 1 if step.fed else 0
        self.busy += step.seconds
        self.batch_rows += len(step.fed)
        if step.fed:
            self._window.append((now, n_out, step.seconds, len(step.fed)))

    def _finish(self, req: _Request) -> None:
        gen = req.gen
        usage = {
            "prompt_tokens": len(gen.prompt_tokens),
            "cached_tokens": req.cached_tokens,
            "completion_tokens": len(gen.tokens),
            "queue_wait": req.queue_wait,
            "device_time": req.device_time,
        }
        result = Result(gen.text, list(gen.tokens), gen.reason or "stop", usage)
        self._vacate(req)
        _send(req, ("done", result))
        req.send.close()

    def _vacate(self, req: _Request) -> None:
        """Take a finished or cancelled request out of the queue or its slot."""
        req.state = "done"
        if req in self._queue:
            self._queue.remove(req)
        if req.slot is not None and self._slot_req[req.slot] is req:
            self._slot_req[req.slot] = None
            self._deferred.append(("detach", req.slot))
        req.slot = None
        self.snapshots.discard(("req", req.id))
        self._to_close.append(req.gen)
        self._kick()

    def _cancel(self, req: _Request, error: SyscallError | None = None) -> None:
        if req.done:
            return
        self._vacate(req)
        if error is not None:
            _send(req, ("error", error))
        req.send.close()

    def _apply_embed(self, ereq: _EmbedRequest, n: int, seconds: float,
                     error: Exception | None) -> None:
        now = self.clock()
        acct = ereq.owner
        if ereq.started is None:
            ereq.started = now - seconds
            acct.usage.queue_wait += ereq.started - ereq.submitted
        ereq.device_time += seconds
        acct.usage.device_time += seconds
        acct.usage.tokens_in += n
        acct.vtime_fair += seconds
        acct.vtime_prio += seconds * 1024.0 / nice_weight(acct.nice)
        self.busy += seconds
        self.tokens_in += n
        self.embed_tokens += n
        self.embed_chunks += 1
        self._window.append((now, 0, seconds, 0))
        if ereq.done:
            return  # withdrawn while its chunk ran: its release op is already deferred
        if error is not None:
            log.error("embedding chunk failed: %r", error)
            msg = error.message if isinstance(error, SyscallError) else repr(error)
            self._cancel_embed(ereq, SyscallError("EIO", f"device error: {msg}"))
        elif ereq.job.done:
            usage = {"prompt_tokens": ereq.job.n_tokens, "cached_tokens": 0,
                     "completion_tokens": 0, "device_time": ereq.device_time,
                     "queue_wait": ereq.started - ereq.submitted}
            ereq.state = "done"
            self._embeds.remove(ereq)
            _send(ereq, ("done", EmbedResult(ereq.job.vectors, usage)))
            ereq.send.close()

    def _cancel_embed(self, ereq: _EmbedRequest, error: SyscallError | None = None) -> None:
        if ereq.done:
            return
        ereq.state = "done"
        self._embeds.remove(ereq)
        self._deferred.append(("embed_release", ereq.job))
        self._kick()
        if error is not None:
            _send(ereq, ("error", error))
        ereq.send.close()

    def _request_alive(self, req_id: int) -> bool:
        return any(r.id == req_id for r in self._queue)

    def _on_device_full(self, plan: list[tuple[int, _Request]], exc: DeviceFullError) -> None:
        """No KV room: drop idle conversations first; else fail the longest request."""
        idle = [s for s in range(self.n_slots)
                if self._slot_req[s] is None and self._slot_owner[s] is not None]
        if idle:
            for s in idle:
                self._slot_owner[s] = None
                self._deferred.append(("release", s))
            return
        victim = max(plan, key=lambda sr: len(sr[1].gen.context))[1]
        slot = victim.slot
        self._cancel(victim, exc)
        if slot is not None:
            self._slot_owner[slot] = None
            self._deferred.append(("release", slot))

    def _fail_plan(self, plan: list[tuple[int, _Request]], error: SyscallError) -> None:
        for slot, req in plan:
            self._cancel(req, error)
            self._slot_owner[slot] = None
            self._deferred.append(("release", slot))

    # -- helpers -------------------------------------------------------------------------

    def _owner(self, pid: int) -> _Owner:
        acct = self._owners.get(pid)
        if acct is None:
            acct = self._owners[pid] = _Owner(pid)
        return acct

    def _runnable_owners(self) -> set[_Owner]:
        owners = {r.owner for r in self._queue} | {
            r.owner for r in self._slot_req if r is not None} | {e.owner for e in self._embeds}
        return {o for o in owners if not o.stopped}

    def _note_floor(self) -> None:
        """Remember the least virtual times among runnable owners (they only grow)."""
        owners = self._runnable_owners()
        if owners:
            self._floor = (max(self._floor[0], min(o.vtime_fair for o in owners)),
                           max(self._floor[1], min(o.vtime_prio for o in owners)))

    def _activate(self, acct: _Owner) -> None:
        """Coming back to the run queue: start no earlier than the runnable minimum."""
        self._note_floor()
        acct.vtime_fair = max(acct.vtime_fair, self._floor[0])
        acct.vtime_prio = max(acct.vtime_prio, self._floor[1])

    def _kick(self) -> None:
        self._wake.set()


def _send(req: _Request, item: tuple) -> None:
    """Hand an item to the waiting generate(); it may already be gone (cancelled)."""
    try:
        req.send.send_nowait(item)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
