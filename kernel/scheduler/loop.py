"""The device loop: the Scheduler's API, its ticks, and the accounting of device time.

The loop runs in ticks. Between ticks, on the trio thread, it admits waiting
requests to slots (placement.py) and writes down the device operations that
admission needs (drivers/device.py). Then the device's compute thread runs
those operations and one ``step`` (continuous batching: a token for every
running request, plus prompt chunks): one hand-off there and one back per
tick (``ComputeThread.run``). Back on the trio thread it hands out the tokens.
A tick is never abandoned on cancel: the compute thread owns the device state.
While every running request decodes one token a step and nobody waits, the
next tick is queued before this one's results are in (``_may_run_ahead``), so
the device does not wait for the event loop between ticks; at most two ticks
are then in flight.

Handing out costs no task switch per token: a caller that streams gets its
pieces from a callback the loop calls, and its task, like that of one that
does not stream, is woken once, with the result (requests.Mailbox).

Only the loop touches the device, and only in its worker call or between
ticks. Code running while a tick is in flight (``generate`` being cancelled,
``release``, ``stop``) changes bookkeeping only and leaves device work in
``_deferred`` for the next tick.

A step's decode time is shared among its slots by tokens fed, and each
slot's sampling time is its own; the policy turns an owner's device seconds
into its virtual time (policy.py).

Embeddings are requests too (``embed``): each tick may add one chunk of the
embed request first in policy order (``embed_step``, a bounded decode on the
embedding context), when its owner's virtual time is no more than the least
of the generating owners'; the chunk's time is charged to that owner. So a
long embed time-shares the device with generation instead of stalling it, and
is withdrawn like a generation (cancel, STOP, release).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import outcome
import trio

from llmagentos.drivers.device import (
    Copy,
    DeviceFullError,
    EmbedRelease,
    Op,
    Prepare,
    Release,
    Restore,
    Save,
    StepResult,
    run_tick,
)
from llmagentos.drivers.sampling import SamplingParams
from llmagentos.kernel.kvstore import SnapshotStore
from llmagentos.syscalls.errno import SyscallError

from .placement import Placement
from .policy import policy_named
from .requests import (
    EmbedRequest,
    EmbedResult,
    Mailbox,
    Owner,
    Owners,
    Request,
    Result,
    StatsWindow,
)

log = logging.getLogger(__name__)

STATS_WINDOW = 10.0
COST_EWMA = 0.2     # weight of the newest sample in the per-token cost averages
COSTLY_FLOOR = 0.001  # seconds of its own sampling per token below which nobody is costly

Plan = list[tuple[int, Request]]  # (slot, request) to step this tick, in policy order


@dataclass(eq=False)
class Tick:
    """A tick queued on the device: its plan and the pending result."""
    plan: Plan
    pending: Any                 # Pending (drivers/device.py) or _InWorker
    after_error: bool = False    # the tick before it failed (its own error is that one's)


class _InWorker:
    """A tick run in a trio worker thread when awaited: for a device without a
    compute thread (a remote device's round trip)."""

    revoked = False

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._fn, self._args = fn, args

    async def wait(self) -> Any:
        return await trio.to_thread.run_sync(self._fn, *self._args, abandon_on_cancel=False)


class SlotView:
    """Each slot's tokens as they will be once a tick's operations have run (what
    admission reads, placement.py): read from the device only for the slots it
    looks at, not copied for every slot on every tick something waits."""

    def __init__(self, device: Any, n_slots: int, released: Sequence[int]) -> None:
        self._device = device
        self._n = n_slots
        self._known: dict[int, list[int]] = {s: [] for s in released}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, slot: int) -> list[int]:
        tokens = self._known.get(slot)
        if tokens is None:
            if not 0 <= slot < self._n:
                raise IndexError(slot)
            tokens = self._known[slot] = self._device.slot_tokens(slot)
        return tokens

    def __setitem__(self, slot: int, tokens: list[int]) -> None:
        self._known[slot] = tokens


class Scheduler:
    """Continuous-batching scheduler over one compute device. See the package doc."""

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
        self._policy = policy_named(policy)
        if quantum < 1:
            raise SyscallError("EINVAL", "quantum must be >= 1 token")
        self.device = device
        self.policy = policy
        self.quantum = quantum
        self.clock = clock
        self.n_slots = min(slots or device.n_seq_max, device.n_seq_max)
        self.snapshots = SnapshotStore(snapshot_ram_bytes, spill_dir)
        self._owners = Owners(self._queued_owners)
        self.placement = Placement(self.n_slots, self._policy, quantum, self.snapshots,
                                   self._owners, clock, self._costly, device)
        self._embeds: list[EmbedRequest] = []
        self._decode_cost = 0.0  # seconds of a step's shared decode (average)
        self._deferred: list[Op] = []   # device ops left by code that ran during a tick
        self._to_close: list[Any] = []  # generations to close between ticks
        self._remote_tick = getattr(device, "tick", None)  # a whole tick in one round trip
        # Where the ticks run: the device's own compute thread (else a trio worker).
        self._compute = None if self._remote_tick else getattr(device, "compute_thread", None)
        self._samplers: set[Request] = set()  # requests whose sampling may make them costly
        self._kv_free: int | None = None  # free KV cells after the last tick (None: unknown)
        self._ahead: Tick | None = None  # the next tick, queued while one computes
        self._ids = itertools.count(1)
        self._embed_seqs = itertools.count()
        self._wake = trio.Event()
        self._running = False
        self.stop_error: SyscallError | None = None  # what requests get when the loop ends
        self._started = clock()
        # Counters for stats().
        self.steps = 0
        self.busy = 0.0
        self.tokens_out = 0
        self.tokens_in = 0
        self.batch_rows = 0
        self.restores = 0
        self.restore_failures = 0
        self.copies = 0
        self.copied_tokens = 0
        self.idle_saves = 0
        self.embed_chunks = 0
        self.embed_tokens = 0
        self.throttled = 0
        self._window = StatsWindow(STATS_WINDOW)

    # -- the API the kernel uses ---------------------------------------------------------

    async def generate(
        self,
        owner: int,
        prompt_tokens: Sequence[int],
        params: SamplingParams | dict | None = None,
        *,
        nice: int | None = None,
        on_token: Callable[[str], Any] | Callable[[str], Awaitable[Any]] | None = None,
    ) -> Result:
        """Run one completion for process ``owner``; returns when it finishes.

        Cancelling the awaiting task withdraws the request and frees its slot.
        ``on_token`` receives each new piece of text as it becomes safe to show. A
        plain function is called by the device loop as the piece comes, so it must
        not block (queue the piece; kernel/sysllm.py queues a notification); what it
        raises ends the request and is raised here. A coroutine function is awaited
        in this task, with the pieces that piled up while it ran.
        """
        # EINVAL/E2BIG here. A grammar (or JSON schema) is converted, compiled and
        # probed in the request's constructor: a worker thread's time, not the loop's.
        params = SamplingParams.from_dict(params)
        kv_size = getattr(self.device, "kv_size", None)
        if kv_size is not None and len(prompt_tokens) > kv_size:
            raise SyscallError("ENOSPC", f"prompt of {len(prompt_tokens)} tokens cannot fit the "
                                         f"device's KV pool of {kv_size} cells even alone")
        if params.grammar is not None or params.json_schema not in (None, False):
            gen = await trio.to_thread.run_sync(
                self.device.generation, list(prompt_tokens), params)
        else:
            gen = self.device.generation(list(prompt_tokens), params)
        acct = self._owners.of(owner)
        if nice is not None:
            self.set_nice(owner, nice)
        now = self.clock()
        req = Request(next(self._ids), acct, gen, Mailbox(), now)
        if inspect.iscoroutinefunction(on_token):
            req.keep_pieces = True
        else:
            req.on_piece = on_token
        req.wait_since = None if acct.stopped else now
        acct.usage.requests += 1
        self._owners.activate(acct)
        self.placement.enqueue(req)
        self._kick()
        box = req.box
        try:
            while True:
                await box.wait()
                if box.pieces:  # an async on_token: every piece before the outcome
                    pieces, box.pieces = box.pieces, []
                    for piece in pieces:
                        await on_token(piece)
                elif box.outcome is not None:
                    return box.outcome.unwrap()
        finally:
            if not req.done:  # cancelled, or on_token failed: withdraw the request
                self._cancel(req)

    async def embed(self, owner: int, job: Any, *, nice: int | None = None) -> EmbedResult:
        """Run an embed request (a ``Device.embedding``) for ``owner``, a chunk per tick
        under the policy. Cancelling the awaiting task withdraws it."""
        if not hasattr(self.device, "embed_step"):
            raise SyscallError("ENOSYS", "this device does not compute embeddings")
        acct = self._owners.of(owner)
        if nice is not None:
            self.set_nice(owner, nice)
        req = EmbedRequest(next(self._ids), acct, job, Mailbox(), next(self._embed_seqs),
                           self.clock())
        acct.usage.requests += 1
        self._owners.activate(acct)
        self._embeds.append(req)
        self._kick()
        try:
            await req.box.wait()
            return req.box.outcome.unwrap()
        finally:
            if not req.done:
                self._cancel_embed(req)

    def stop(self, owner: int) -> None:
        """SIGSTOP: park the owner's requests. Their slots may be given away (state saved)."""
        acct = self._owners.of(owner)
        if acct.stopped:
            return
        self._owners.note_floor()  # it leaves the runnable owners
        acct.stopped = True
        now = self.clock()
        for req in self.placement.queue:
            if req.owner is acct and req.wait_since is not None:
                req.queue_wait += now - req.wait_since
                req.wait_since = None
        self._kick()

    def cont(self, owner: int) -> None:
        """SIGCONT: resume where the requests left off."""
        acct = self._owners.of(owner)
        if not acct.stopped:
            return
        acct.stopped = False
        now = self.clock()
        for req in self.placement.queue:
            if req.owner is acct:
                req.wait_since = now
        self._owners.activate(acct)
        self._kick()

    async def release(self, owner: int) -> None:
        """The process is gone: cancel its requests, free its slots and snapshots."""
        self._owners.note_floor()
        acct = self._owners.pop(owner, None)
        if acct is not None:
            err = SyscallError("ECANCELED", f"process {owner} released")
            for req in [r for r in self.placement.queue if r.owner is acct]:
                self._cancel(req, err)
            for _, req in [sr for sr in self.placement.running() if sr[1].owner is acct]:
                self._cancel(req, err)
            for ereq in [e for e in self._embeds if e.owner is acct]:
                self._cancel_embed(ereq, err)
        self.placement.forget(owner, self._deferred)
        self._kick()
        await trio.lowlevel.checkpoint()

    def set_nice(self, owner: int, nice: int) -> None:
        self._owners.set_nice(owner, nice)

    def usage(self, owner: int) -> dict[str, Any]:
        return self._owners.usage(owner)

    def load(self) -> int:
        """Requests queued or running: what a DeviceSet balances new processes by."""
        return len(self.placement.queue) + len(self._embeds) + len(self.placement.running())

    def kv_free(self) -> int | None:
        """Free cells of the device's KV pool as of its last tick (None: it does not
        say): what a DeviceSet places new processes by, beside load. Read from the
        last tick, never from the device, which may be computing now."""
        return self._kv_free

    def holds(self, owner: int) -> bool:
        """Has ``owner`` anything here: a request, a resident slot or saved state?"""
        return self.placement.holds(owner) or any(e.owner.pid == owner for e in self._embeds)

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        span = min(STATS_WINDOW, max(now - self._started, 1e-9))
        w_tokens, w_busy, w_rows, w_n = self._window.totals(now)
        place = self.placement
        slots = [{"slot": s, "state": place.slot_state(s), "owner": place.slot_owner[s],
                  "tokens": len(self.device.slot_tokens(s)) if self._running else None}
                 for s in range(self.n_slots)]
        return {
            "policy": self.policy,
            "quantum": self.quantum,
            "slots": slots,
            "n_slots": self.n_slots,
            "running": sum(1 for x in slots if x["state"] == "running"),
            "parked": sum(1 for x in slots if x["state"] == "parked"),
            "queue_length": len(place.queue),
            "utilization": min(1.0, w_busy / span),
            "batch_size": (w_rows / w_n) if w_n else 0.0,
            "tokens_per_s": w_tokens / span,
            "steps": self.steps,
            "tokens_out": self.tokens_out,
            "tokens_in": self.tokens_in,
            "device_time": self.busy,
            "preemptions": place.preemptions,
            "restores": self.restores,
            "restore_failures": self.restore_failures,
            "prefix_copies": self.copies,
            "copied_tokens": self.copied_tokens,
            "idle_saves": self.idle_saves,
            "embed_queue": len(self._embeds),
            "embed_chunks": self.embed_chunks,
            "embed_tokens": self.embed_tokens,
            "throttled": self.throttled,
            "kv_pool": self._kv_pool(),
            "snapshots": {"count": len(self.snapshots), "ram_bytes": self.snapshots.ram_bytes,
                          "disk_bytes": self.snapshots.disk_bytes,
                          "ram_budget": self.snapshots.ram_budget,
                          "spills": self.snapshots.spills, "drops": self.snapshots.drops},
            "owners": self._owners.rows(),
        }

    # -- the device loop -----------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The device loop task. Start it in the kernel's nursery (``nursery.start``)."""
        if self._running:
            raise RuntimeError("Scheduler.run() is already running")
        self._running = True
        try:
            await self._on_device(self._reset_device)
            task_status.started()
            while True:
                if self._ahead is not None:  # queued while the last tick computed
                    tick, self._ahead = self._ahead, None
                    ops, plan, ereq = [], tick.plan, None
                else:
                    ops, plan, ereq = self._plan()
                    if not ops and not plan and ereq is None:
                        await self._wake.wait()
                        self._wake = trio.Event()
                        continue
                    tick = self._submit(ops, plan) if ops or plan else None
                if tick is not None:
                    if ereq is None and self._may_run_ahead(plan):
                        self._ahead = self._submit([], plan)
                    out = await tick.pending.wait()
                    if out is None:
                        continue  # revoked before it ran: plan afresh
                    results, step, error = out
                    self._apply_ops(ops, results)
                    self._apply_step(plan, step)
                    if error is not None and tick.after_error:
                        error = None  # queued before the last tick failed: that one is handled
                    if error is not None and self._ahead is not None:
                        self._ahead.after_error = True
                        self._revoke_ahead()
                    if isinstance(error, DeviceFullError):
                        self._on_device_full(plan, error)
                    elif error is not None:  # a device fault must not take the kernel down
                        log.error("device tick failed: %r", error)
                        self._fail_plan(plan, SyscallError("EIO", f"device error: {error}"))
                if ereq is not None and not ereq.done:
                    n, seconds, error = await self._on_device(self._embed_chunk, ereq.job)
                    self._apply_embed(ereq, n, seconds, error)
                await trio.lowlevel.checkpoint()
        finally:
            if self._ahead is not None:  # the device is left as the bookkeeping says
                self._revoke_ahead()
                with trio.CancelScope(shield=True):
                    await self._ahead.pending.wait()
                self._ahead = None
            self._running = False
            err = self.stop_error or SyscallError("ESHUTDOWN", "the device loop stopped")
            for req in list(self.placement.queue) + [r for _, r in self.placement.running()]:
                self._cancel(req, err)
            for ereq in list(self._embeds):
                self._cancel_embed(ereq, err)
            for gen in self._to_close:
                gen.close()
            self._to_close.clear()

    def _submit(self, ops: list[Op], plan: Plan) -> Tick:
        """Queue a tick on the device (it runs after those queued before it)."""
        slots = [s for s, _ in plan]
        if self._compute is not None:
            return Tick(plan, self._compute.submit(self._tick, ops, slots))
        return Tick(plan, _InWorker(self._tick, ops, slots))

    def _may_run_ahead(self, plan: Plan) -> bool:
        """May the next tick be queued now, while this one computes, as this one's plan
        without operations? Only where planning it after this one's results could
        decide nothing else: there is a batch (a tick of operations alone has none to
        repeat), nobody waits for a slot, nothing is deferred, no embed, no
        throttling, and every planned request decodes one token a step, all in one
        batch. (A request that finishes in this tick is skipped by the device.) So the
        device does not wait for the event loop between ticks. ``_kick`` revokes it
        while it has not started, when something changed."""
        if (not plan or self._compute is None or self._ahead is not None or self._deferred
                or self._embeds or self._samplers or len(plan) > self.device.n_batch):
            return False
        if any(not r.owner.stopped for r in self.placement.queue):
            return False
        for _, r in plan:
            if not r.decoding or r.state == "done" or r.owner.stopped:
                return False
        return True

    def _revoke_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.pending.revoked = True

    async def _on_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` where the device's work runs; never abandoned on cancel."""
        if self._compute is not None:
            return await self._compute.run(fn, *args)
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=False)

    def _reset_device(self) -> None:
        for s in range(self.n_slots):
            self.device.release(s)
        self._note_kv()

    def _note_kv(self) -> None:
        """Compute thread, after the device's work: how much of its KV pool is free."""
        dev = self.device
        if hasattr(dev, "kv_free"):  # a Ray proxy: as the actor reported it
            self._kv_free = dev.kv_free()
        elif hasattr(dev, "kv_used"):
            self._kv_free = dev.kv_size - dev.kv_used()

    def _tick(self, ops: list[Op], plan: list[int]) -> tuple[list[Any], StepResult,
                                                            Exception | None]:
        """Compute thread: the planned operations, then one step (never raises)."""
        if self._remote_tick is not None:
            out = self._remote_tick(ops, plan)
        else:
            out = run_tick(self.device, ops, plan)
        self._note_kv()
        return out

    def _embed_chunk(self, job: Any) -> tuple[int, float, Exception | None]:
        """Compute thread: one chunk of an embed request. Never raises."""
        t0 = time.perf_counter()
        try:
            n = self.device.embed_step(job)
        except Exception as exc:
            return 0, time.perf_counter() - t0, exc
        return n, time.perf_counter() - t0, None

    # -- planning (trio thread, device idle) ---------------------------------------------

    def _plan(self) -> tuple[list[Op], Plan, EmbedRequest | None]:
        if self._to_close:
            for gen in self._to_close:
                gen.close()
            self._to_close.clear()
        ops, self._deferred = self._deferred, []
        place = self.placement
        waiting = [r for r in place.queue if not r.owner.stopped]
        if waiting:
            view = SlotView(self.device, self.n_slots,
                            [op.slot for op in ops if isinstance(op, Release)])
            place.admit_waiting(sorted(waiting, key=self._policy.key), ops, view)
            for op in ops:
                if isinstance(op, Prepare) and op.request is not None:
                    op.request.decoding = False  # a prompt to feed first
        plan = [(s, r) for s, r in enumerate(place.slot_req)
                if r is not None and not r.owner.stopped]
        plan.sort(key=lambda sr: self._policy.key(sr[1]))
        # Only a request whose own sampling is slow can be throttled (see _costly).
        if self._policy.throttles and len(plan) > 1 and self._samplers:
            plan = self._throttle(plan)
        return ops, plan, self._pick_embed(plan, ops)

    def _costly(self, req: Request) -> bool:
        """Does its own sampling cost more than the decode everyone shares?"""
        return req.sample_cost > max(self._decode_cost, COSTLY_FLOOR)

    def _throttle(self, plan: Plan) -> Plan:
        """Costly samplers whose owner is ahead of another running owner sit this tick out."""
        least = min(r.owner.vtime for _, r in plan)
        keep = [(s, r) for s, r in plan if not self._costly(r) or r.owner.vtime <= least]
        self.throttled += len(plan) - len(keep)
        return keep

    def _pick_embed(self, plan: Plan, ops: list[Op]) -> EmbedRequest | None:
        """The embed request that gets a chunk this tick, if any (see the module doc)."""
        if not self._embeds:
            return None
        waiting = sorted((e for e in self._embeds if not e.owner.stopped), key=self._policy.key)
        ready = [e for e in waiting if self.device.embed_runnable(e.job)]
        if not ready:
            # Half-done texts of parked embedders hold the cells: they start over later.
            for e in self._embeds:
                if waiting and e.owner.stopped and e.job.seq is not None:
                    ops.append(EmbedRelease(e.job))
            return None
        ereq = ready[0]
        if plan and ereq.owner.vtime > min(r.owner.vtime for _, r in plan):
            return None
        return ereq

    # -- results (trio thread, device idle) ----------------------------------------------

    def _apply_ops(self, ops: list[Op], results: list[Any]) -> None:
        """What the tick's operations did; ``results`` stops where a failure did."""
        for op in ops[len(results):]:  # not run: a snapshot taken for it goes back
            if isinstance(op, Restore) and op.snapshot.key not in self.snapshots:
                snap = op.snapshot
                if snap.data is not None or snap.path is not None:
                    self.snapshots.put(snap.key, snap.tokens, snap.load(), pinned=snap.pinned)
                    SnapshotStore.finish(snap)
        for op, res in zip(ops, results):
            match op:
                case Save(key=key, pinned=pinned):
                    tokens, data = res
                    alive = (key[0] == "req" and self.placement.has_request(key[1])) or (
                        key[0] == "owner" and key[1] in self._owners)
                    if alive and tokens:
                        self.snapshots.put(key, tokens, data, pinned=pinned)
                        if key[0] == "owner":
                            self.idle_saves += 1
                case Restore(snapshot=snap):
                    SnapshotStore.finish(snap)
                    if res:
                        self.restores += 1
                    else:
                        self.restore_failures += 1
                case Copy():
                    self.copies += 1
                    self.copied_tokens += res
                case Prepare(request=req) if not req.admitted_once:
                    req.admitted_once = True
                    n_prompt = len(req.gen.prompt_tokens)
                    reused = min(res, n_prompt)
                    req.cached_tokens = reused
                    req.owner.usage.cached_tokens += reused
                    req.owner.usage.tokens_in += n_prompt - reused
                    self.tokens_in += n_prompt - reused

    def _apply_step(self, plan: Plan, step: StepResult) -> None:
        """Charge the step's device time and hand out its tokens. This runs for every
        token of every batch, so it is written flat: one pass per slot, no calls it
        can do without (the kernel's own cost per tick, bench/bench_overhead.py)."""
        now = self.clock()
        fed_slots = step.fed
        by_slot = dict(plan)
        if fed_slots:
            sampled = step.sample_seconds
            shared = max(0.0, step.seconds - sum(sampled.values()))
            self._decode_cost += COST_EWMA * (shared - self._decode_cost)
            total_fed = sum(fed_slots.values())
            slot_used = self.placement.slot_used
            for slot, fed in fed_slots.items():
                req = by_slot.get(slot)
                if req is None or total_fed == 0:
                    continue
                share = shared * fed / total_fed
                if sampled:
                    own = sampled.get(slot)
                    if own is not None:
                        share += own
                        req.sample_cost += COST_EWMA * (own - req.sample_cost)
                        if req.sample_cost > COSTLY_FLOOR:
                            self._samplers.add(req)
                        else:
                            self._samplers.discard(req)
                req.device_time += share
                self._charge(req.owner, share)
                slot_used[slot] = now
        n_out = 0
        for ev in step.events:
            slot = ev.slot
            req = by_slot.get(slot)
            if req is None or req.state != "running" or req.slot != slot:
                continue  # cancelled or moved while the tick was in flight
            req.decoding = True  # fed to the end: one token a step from now on
            finished = ev.finished
            if ev.token is not None and not (finished and ev.reason == "eog"):
                n_out += 1
                req.turn_tokens += 1
                req.owner.usage.tokens_out += 1
            piece = ev.piece
            if piece:
                on_piece = req.on_piece
                if on_piece is not None:
                    try:
                        ret = on_piece(piece)
                    except Exception as exc:
                        self._cancel(req, exc)
                        continue  # its callback failed: the request is over
                    if ret is not None:
                        self._check_callback_result(req, ret)
                        if req.state == "done":
                            continue
                elif req.keep_pieces:
                    req.box.put(piece)
            if finished:
                self._finish(req)
        self.tokens_out += n_out
        if fed_slots:
            self.steps += 1
            self._window.add(now, n_out, step.seconds, len(fed_slots))
        self.busy += step.seconds
        self.batch_rows += len(fed_slots)

    def _check_callback_result(self, req: Request, ret: Any) -> None:
        """An on_token callback that returned an awaitable was meant to be awaited:
        its request ends with a TypeError that says so (or with what looking raised)."""
        try:
            if not hasattr(ret, "__await__"):
                return
            ret.close()
            error: Exception = TypeError("on_token returned an awaitable: pass a coroutine "
                                         "function to have it awaited")
        except Exception as exc:
            error = exc
        self._cancel(req, error)

    def _charge(self, acct: Owner, seconds: float) -> None:
        acct.usage.device_time += seconds
        self._policy.charge(acct, seconds)

    def _finish(self, req: Request) -> None:
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
        req.box.close(outcome.Value(result))

    def _vacate(self, req: Request) -> None:
        self._owners.note_floor()  # its owner may leave the runnable owners
        self.placement.vacate(req, self._deferred)
        self._samplers.discard(req)
        self._to_close.append(req.gen)
        self._kick()

    def _cancel(self, req: Request, error: Exception | None = None) -> None:
        """Withdraw a request; ``error`` is what its caller gets (None: the caller
        itself withdrew it)."""
        if req.done:
            return
        self._vacate(req)
        if error is not None:
            req.box.close(outcome.Error(error))

    def _apply_embed(self, ereq: EmbedRequest, n: int, seconds: float,
                     error: Exception | None) -> None:
        now = self.clock()
        acct = ereq.owner
        if ereq.started is None:
            ereq.started = now - seconds
            acct.usage.queue_wait += ereq.started - ereq.submitted
        ereq.device_time += seconds
        acct.usage.tokens_in += n
        self._charge(acct, seconds)
        self.busy += seconds
        self.tokens_in += n
        self.embed_tokens += n
        self.embed_chunks += 1
        self._window.add(now, 0, seconds, 0)
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
            self._owners.note_floor()
            ereq.state = "done"
            self._embeds.remove(ereq)
            ereq.box.close(outcome.Value(EmbedResult(ereq.job.vectors, usage)))

    def _cancel_embed(self, ereq: EmbedRequest, error: SyscallError | None = None) -> None:
        if ereq.done:
            return
        self._owners.note_floor()
        ereq.state = "done"
        self._embeds.remove(ereq)
        self._deferred.append(EmbedRelease(ereq.job))
        self._kick()
        if error is not None:
            ereq.box.close(outcome.Error(error))

    def _kv_pool(self) -> dict[str, Any] | None:
        dev = self.device
        if not hasattr(dev, "kv_used"):
            return None
        cell = getattr(dev, "kv_cell_bytes", None)
        return {"cells": dev.kv_size, "used": dev.kv_used(), "cell_bytes": cell,
                "bytes": dev.kv_size * cell if cell else None}

    def _on_device_full(self, plan: Plan, exc: DeviceFullError) -> None:
        """No KV room for the step: idle conversations give way (saved if worth it);
        else a parked request, or the running one last in policy order, is preempted
        (saved, requeued); only a request alone on the device that still does not fit
        fails, ENOSPC."""
        view = [self.device.slot_tokens(s) for s in range(self.n_slots)]
        if self.placement.evict_idle(self._deferred, view):
            return
        if self.placement.preempt_for_room(self._policy.key, self._deferred, view):
            return
        victim = max(plan, key=lambda sr: len(sr[1].gen.context))[1]
        slot = victim.slot
        self._cancel(victim, exc)
        if slot is not None:
            self.placement.evict(slot, self._deferred)

    def _fail_plan(self, plan: Plan, error: SyscallError) -> None:
        for slot, req in plan:
            self._cancel(req, error)
            self.placement.evict(slot, self._deferred)

    # -- owners ----------------------------------------------------------------------------

    def _queued_owners(self) -> set[Owner]:
        return {r.owner for r in self.placement.queue} | {
            r.owner for _, r in self.placement.running()} | {e.owner for e in self._embeds}

    def _kick(self) -> None:
        self._revoke_ahead()  # planned before the change: plan again if it has not started
        self._wake.set()
