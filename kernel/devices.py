"""Several compute devices behind the Scheduler's API: which device runs which process.

A ``DeviceSet`` owns one Scheduler per device, local or remote (a Ray actor,
drivers/ray_device.py); each Scheduler runs its own device loop. The kernel
sees the same API as for one Scheduler (generate, stop, cont, release,
set_nice, usage, stats, run).

Placement, per process (owner pid):

* Sticky while resident: a process whose home device holds anything of it (a
  request, its conversation in a slot, a saved snapshot) goes there again, so
  a multi-turn agent keeps reusing its prefix.
* Otherwise, and for new processes, the live device with the least load
  (queued + running requests) takes it; among equally loaded ones, the one
  with the most free KV cells (as of its last tick; one that does not say
  comes last): a device whose pool is held by idle conversations would have
  to evict (and save) them before it could take the prompt.
* A device that fails loses its processes' residency: their in-flight requests
  got EIO from its Scheduler, and their next request is placed afresh and
  prefills from the context on whichever device takes it. A dead device gets
  no new processes until a probe finds it answering again (Ray restarted it).

A sequence never moves between devices while it runs; a process moves only
between requests, and then only by re-prefilling (no KV state crosses devices
here; snapshots stay with the Scheduler that took them).

At a thousand devices and a hundred thousand processes nothing here walks every
device or every process per request: the least loaded device comes from a heap
of loads (the set counts the requests it has handed each device and not yet had
back), a process's exit touches only the devices that have held it, and stats
groups processes by device in one pass (bench/bench_scale.py measures it).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from llmagentos.drivers.sampling import SamplingParams
from llmagentos.syscalls.errno import SyscallError

from .scheduler import NICE_MAX, NICE_MIN, Result, Scheduler

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0  # seconds between liveness probes of dead devices
SUMMED = ("steps", "tokens_out", "tokens_in", "device_time", "preemptions", "restores",
          "restore_failures", "prefix_copies", "copied_tokens", "idle_saves", "running",
          "parked", "queue_length", "n_slots", "tokens_per_s")


KV_CANDIDATES = 8  # equally loaded devices compared by free KV cells at one placement


class DeviceSet:
    """The Scheduler API over several Schedulers, one per device. See the module doc."""

    def __init__(self, schedulers: Sequence[Scheduler]) -> None:
        if not schedulers:
            raise ValueError("a DeviceSet needs at least one device")
        self.schedulers = list(schedulers)
        self.policy = self.schedulers[0].policy
        self.quantum = self.schedulers[0].quantum
        self._home: dict[int, int] = {}   # owner pid -> index of its device
        self._held: dict[int, set[int]] = {}  # owner pid -> devices that may hold some of it
        self._load = [0] * len(self.schedulers)  # requests handed to each and not yet back
        # (load, device) entries, least first; one is current while its load is the
        # device's: the others are dropped as they come to the top.
        self._by_load = [(0, k) for k in range(len(self.schedulers))]
        self._benched: set[int] = set()   # dead devices taken off the heap
        self._nice: dict[int, int] = {}
        self._stopped: set[int] = set()
        self.moves = 0                    # processes placed away from their old device

    @property
    def n_slots(self) -> int:
        return sum(s.n_slots for s in self.schedulers)

    def alive(self, i: int) -> bool:
        return getattr(self.schedulers[i].device, "alive", True)

    # -- placement --------------------------------------------------------------------------

    def _add_load(self, k: int, n: int) -> None:
        self._load[k] += n
        if k not in self._benched:
            heapq.heappush(self._by_load, (self._load[k], k))
        if len(self._by_load) > 4 * len(self._load) + 64:  # mostly stale: rebuild
            self._by_load = [(m, d) for d, m in enumerate(self._load) if d not in self._benched]
            heapq.heapify(self._by_load)

    def _least(self, prefer: int | None) -> int:
        """The live device with the least load; among up to KV_CANDIDATES equally
        loaded ones, the one with the most free KV cells (as of its last tick; one that
        does not say comes last), then ``prefer``, then the lowest index.
        O(log devices) amortized, plus a look at each dead one."""
        heap, load = self._by_load, self._load
        for k in [k for k in self._benched if self.alive(k)]:  # back from the dead
            self._benched.discard(k)
            heapq.heappush(heap, (load[k], k))
        ties: list[int] = []
        while heap and len(ties) < KV_CANDIDATES:
            m, k = heap[0]
            if m != load[k] or k in ties:
                heapq.heappop(heap)  # stale, or a second entry of one already taken
            elif ties and m != load[ties[0]]:
                break  # the next load up
            else:
                heapq.heappop(heap)
                if self.alive(k):
                    ties.append(k)
                else:
                    self._benched.add(k)
        if not ties:  # every device is dead: the least loaded answers (with EIO)
            return min(range(len(load)), key=lambda k: (load[k], k != prefer, k))
        n = load[ties[0]]
        for k in ties:
            heapq.heappush(heap, (n, k))
        if prefer is not None and prefer not in ties and load[prefer] == n \
                and self.alive(prefer):
            ties.append(prefer)

        def rank(k: int) -> tuple:
            free = self.schedulers[k].kv_free()
            return (1 if free is None else -free, k != prefer, k)
        return min(ties, key=rank)

    async def _place(self, owner: int) -> int:
        """The index of the device ``owner``'s next request goes to (see the module doc)."""
        i = self._home.get(owner)
        if i is not None and self.alive(i) and self.schedulers[i].holds(owner):
            return i
        j = self._least(i)
        if i is not None and i != j:
            self.moves += 1
            await self.schedulers[i].release(owner)  # its leftovers there are of no use
            self._held.get(owner, set()).discard(i)
        self._home[owner] = j
        self._held.setdefault(owner, set()).add(j)
        sched = self.schedulers[j]
        if owner in self._nice:
            sched.set_nice(owner, self._nice[owner])
        if owner in self._stopped:
            sched.stop(owner)
        return j

    # -- the Scheduler API --------------------------------------------------------------------

    async def generate(
        self,
        owner: int,
        prompt_tokens: Sequence[int],
        params: SamplingParams | dict | None = None,
        *,
        nice: int | None = None,
        on_token: Callable[[str], Any] | None = None,
    ) -> Result:
        if nice is not None:
            self.set_nice(owner, nice)
        j = await self._place(owner)
        self._add_load(j, 1)
        try:
            return await self.schedulers[j].generate(owner, prompt_tokens, params, nice=nice,
                                                     on_token=on_token)
        except SyscallError as exc:
            if exc.name == "EIO" and self._home.get(owner) == j:
                self._home.pop(owner, None)  # next time: wherever is alive and least loaded
            raise
        finally:
            self._add_load(j, -1)

    def stop(self, owner: int) -> None:
        self._stopped.add(owner)
        i = self._home.get(owner)
        if i is not None:
            self.schedulers[i].stop(owner)

    def cont(self, owner: int) -> None:
        self._stopped.discard(owner)
        i = self._home.get(owner)
        if i is not None:
            self.schedulers[i].cont(owner)

    async def release(self, owner: int) -> None:
        self._home.pop(owner, None)
        self._nice.pop(owner, None)
        self._stopped.discard(owner)
        for k in sorted(self._held.pop(owner, ())):
            await self.schedulers[k].release(owner)

    def set_nice(self, owner: int, nice: int) -> None:
        if not isinstance(nice, int) or isinstance(nice, bool) or not NICE_MIN <= nice <= NICE_MAX:
            raise SyscallError("EINVAL", f"nice must be an integer in {NICE_MIN}..{NICE_MAX}")
        i = self._home.get(owner)
        if i is not None:
            self.schedulers[i].set_nice(owner, nice)
        self._nice[owner] = nice

    def usage(self, owner: int) -> dict[str, Any]:
        total: dict[str, Any] | None = None
        for d in sorted(self._held.get(owner, ())):
            try:
                u = self.schedulers[d].usage(owner)
            except SyscallError:
                continue
            total = u if total is None else {k: total[k] + u[k] for k in total}
        if total is None:
            raise SyscallError("ESRCH", f"no usage recorded for process {owner}")
        return total

    def stats(self) -> dict[str, Any]:
        per = [s.stats() for s in self.schedulers]
        out: dict[str, Any] = {k: sum(p[k] for p in per) for k in SUMMED}
        out["policy"] = self.policy
        out["quantum"] = self.quantum
        out["slots"] = [{**slot, "device": i} for i, p in enumerate(per) for slot in p["slots"]]
        out["utilization"] = sum(p["utilization"] for p in per) / len(per)
        busy = [p["batch_size"] for p in per if p["batch_size"]]
        out["batch_size"] = sum(busy) / len(busy) if busy else 0.0
        snaps = [p["snapshots"] for p in per]
        out["snapshots"] = {k: sum(s[k] for s in snaps) for k in snaps[0]}
        out["owners"] = {}
        for p in per:
            out["owners"].update(p["owners"])
        pools = [p.get("kv_pool") for p in per]
        out["kv_pool"] = None if None in pools else {
            "cells": sum(q["cells"] for q in pools), "used": sum(q["used"] for q in pools),
            "cell_bytes": pools[0]["cell_bytes"], "bytes": None if None in (
                q["bytes"] for q in pools) else sum(q["bytes"] for q in pools)}
        out["moves"] = self.moves
        homed: list[list[int]] = [[] for _ in self.schedulers]
        for o, k in self._home.items():
            homed[k].append(o)
        out["devices"] = []
        for i, (sched, p) in enumerate(zip(self.schedulers, per)):
            dev = sched.device
            desc = dev.describe() if hasattr(dev, "describe") else {
                "kind": "local", "node": "local", "alive": True, "failures": 0}
            out["devices"].append({
                "device": i, **desc, "model": dev.model_name, "n_slots": p["n_slots"],
                "running": p["running"], "queue_length": p["queue_length"],
                "tokens_per_s": p["tokens_per_s"], "utilization": p["utilization"],
                "tokens_out": p["tokens_out"], "kv_pool": p.get("kv_pool"),
                "kv_free": sched.kv_free(),
                "processes": sorted(homed[i])})
        return out

    # -- the device loops -------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Every device's loop, plus the liveness probe of remote devices."""
        async with trio.open_nursery() as n:
            for sched in self.schedulers:
                await n.start(sched.run)
            if any(hasattr(s.device, "probe") for s in self.schedulers):
                n.start_soon(self._probe_loop)
            task_status.started()

    async def _probe_loop(self) -> None:
        """Dead devices come back when Ray has restarted their actor; live ones that went
        quiet are checked too, so a lost node shows in stats without waiting for a tick."""
        while True:
            await trio.sleep(PROBE_INTERVAL)
            lost: set[int] = set()
            for i, sched in enumerate(self.schedulers):
                dev = sched.device
                if not hasattr(dev, "probe") or (dev.alive and sched.load()):
                    continue  # a busy live device proves itself every tick
                was = dev.alive
                ok = await trio.to_thread.run_sync(dev.probe, abandon_on_cancel=True)
                if ok != was:
                    log.warning("device %d is %s", i, "back" if ok else "dead")
                if not ok:
                    lost.add(i)
            if lost:  # their processes go elsewhere from their next request on
                for owner in [o for o, k in self._home.items() if k in lost]:
                    self._home.pop(owner, None)
