"""The plan at scale: the kernel's placement at 1,000 devices and 100,000 agents.

Pure Python, no model, no Ray. Where a request runs is decided by the kernel's
own ``DeviceSet`` (kernel/devices.py), the code that ships; only the devices
and the agents are simulated.

(a) Decision cost: a DeviceSet over N real Schedulers on simulated devices
    (drivers/simdevice.py; loops not started, so queued requests hold their
    load), N = 10, 100, 1000: µs to place a new process, to re-place a resident
    one (sticky), per process exit (``release``), and one ``stats()``.
(b) A discrete-event simulation: the DeviceSet over ``--devices`` simulated
    devices, each a ``SimQueue`` standing where a Scheduler stands (the same
    API: ``generate``, ``load``, ``holds``, ``release``...) with ``SLOTS``
    sequences, a KV pool of ``KV_CELLS`` cells, FIFO admission by free KV,
    idle conversations kept resident until the pool needs their cells (then
    saved to a bounded snapshot store), all in simulated time. ``--agents``
    agents think (exponential) and ask; each request is a real
    ``DeviceSet.generate`` coroutine, suspended while its simulated request
    waits and runs, and resumed with its result or with EIO, so placement,
    stickiness, load counting and the EIO path are the kernel's. Reported at
    several offered loads: load balance (max/mean device load, Jain's index),
    KV use, queueing, and agents turned away (a wait past ``DEADLINE_S``: the
    kernel itself queues, it never refuses a request that fits).
(c) Device loss, in the run at the middle load: one device, then a node of
    ``NODE_DEVICES``, die; their requests get EIO and are retried at once.
(d) Kernel memory per agent: tracemalloc over ``--agents`` process-table
    entries (the real PCB, made by the real ProcessTable) plus what the
    scheduler and the DeviceSet keep per process (its Owner, one queued
    Request, the DeviceSet's maps); and on disk, a context in the memory
    database (the real ContextStore).

    python bench/bench_scale.py [--devices 1000] [--agents 100000] [--seconds 20]
                                [--loads 0.5 0.9 1.5] [--quick]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).parent))

from llmagentos.drivers.simdevice import SimDevice  # noqa: E402
from llmagentos.kernel.devices import DeviceSet  # noqa: E402
from llmagentos.kernel.scheduler import Result, Scheduler  # noqa: E402
from llmagentos.kernel.scheduler.requests import Mailbox, Owner, Request  # noqa: E402
from llmagentos.syscalls.errno import SyscallError  # noqa: E402

# -- the simulated fleet (a GPU device serving a small model) ---------------------------------
SLOTS = 16             # sequences a device runs at once
KV_CELLS = 32_768      # its KV pool
STEP_S = 0.020         # a decode step, any batch (continuous batching)
PREFILL_S = 0.0002     # per prompt token fed
RESTORE_S = 0.00005    # per token of a saved conversation restored (~4x cheaper than prefill)
SNAPSHOT_TOKENS = 65_536  # the device's snapshot store (its RAM), in tokens
MIN_IDLE_SAVE = 32     # as kernel/scheduler/placement.py
# -- the agents --------------------------------------------------------------------------------
SYSTEM = 400           # tokens of a fresh conversation
TURN_IN = (50, 250)    # new tokens a turn adds (uniform)
TURN_OUT = (16, 128)   # tokens generated (uniform)
WINDOW = 4_096         # a context's window (paging keeps it there)
DEADLINE_S = 5.0       # an agent waiting longer than this for its turn gives up: "turned away"
LOADS = (0.5, 0.9, 1.5)  # offered load ÷ estimated capacity
NODE_DEVICES = 8       # devices lost with one node

_MEAN_SERVICE = (sum(TURN_OUT) / 2) * STEP_S + (sum(TURN_IN) / 2) * PREFILL_S


class _Wait:
    """What a simulated request's coroutine yields to the event loop below."""

    def __init__(self, req: SimRequest) -> None:
        self.req = req

    def __await__(self):
        return (yield self.req)


class SimRequest:
    __slots__ = ("owner", "ctx", "new", "out", "submitted", "started", "coro", "retry",
                 "cells")

    def __init__(self, owner: int, ctx: int, new: int, out: int, now: float) -> None:
        self.owner, self.ctx, self.new, self.out = owner, ctx, new, out
        self.submitted, self.started = now, None
        self.coro: Any = None
        self.retry: int | None = None  # the device loss that sent it here
        self.cells = 0


class _Dev:
    """The device as the DeviceSet reads it (``alive``, ``model_name``)."""

    def __init__(self) -> None:
        self.alive = True
        self.model_name = "sim"


class SimQueue:
    """A device's run queue in simulated time, with the Scheduler API a DeviceSet uses."""

    policy = "fair"
    quantum = 16
    n_slots = SLOTS

    def __init__(self, sim: Sim, k: int) -> None:
        self.sim, self.k = sim, k
        self.device = _Dev()
        self.queue: deque[SimRequest] = deque()
        self.running: dict[int, SimRequest] = {}
        self.queued: dict[int, int] = {}                   # owner -> requests queued
        self.resident: OrderedDict[int, int] = OrderedDict()  # idle owner -> cells, LRU first
        self.saved: OrderedDict[int, int] = OrderedDict()     # owner -> tokens saved
        self.kv_used = 0
        self.saved_tokens = 0

    # the Scheduler API
    def load(self) -> int:
        return len(self.queue) + len(self.running)

    def kv_free(self) -> int:
        return KV_CELLS - self.kv_used

    def holds(self, owner: int) -> bool:
        return (owner in self.running or owner in self.queued or owner in self.resident
                or owner in self.saved)

    async def release(self, owner: int) -> None:
        self.kv_used -= self.resident.pop(owner, 0)
        self.saved_tokens -= self.saved.pop(owner, 0)

    def set_nice(self, owner: int, nice: int) -> None:
        pass

    def stop(self, owner: int) -> None:
        pass

    def cont(self, owner: int) -> None:
        pass

    async def generate(self, owner: int, prompt_tokens: Any, params: Any = None, *,
                       nice: Any = None, on_token: Any = None) -> Result:
        if not self.device.alive:
            raise SyscallError("EIO", f"device {self.k} is lost")
        t = time.perf_counter()
        ctx, new, out = prompt_tokens  # (context length, new tokens, output): all it needs
        req = SimRequest(owner, ctx, new, out, self.sim.now)
        self.queue.append(req)
        self.queued[owner] = self.queued.get(owner, 0) + 1
        self.sim.admit(self)
        self.sim.device_s += time.perf_counter() - t  # the simulated device's, not the kernel's
        return await _Wait(req)

    # the device
    def make_room(self, need: int) -> bool:
        while KV_CELLS - self.kv_used < need and self.resident:
            owner, cells = self.resident.popitem(last=False)
            self.kv_used -= cells
            if cells >= MIN_IDLE_SAVE:  # saved, as the Scheduler saves an idle conversation
                self.saved[owner] = self.saved.pop(owner, 0) + cells
                self.saved_tokens += cells
                while self.saved_tokens > SNAPSHOT_TOKENS:
                    self.saved_tokens -= self.saved.popitem(last=False)[1]
        return KV_CELLS - self.kv_used >= need

    def lose(self) -> list[SimRequest]:
        """The device dies: what it had in flight."""
        self.device.alive = False
        lost = list(self.queue) + list(self.running.values())
        self.queue.clear()
        self.running.clear()
        self.queued.clear()
        self.resident.clear()
        self.saved.clear()
        self.kv_used = self.saved_tokens = 0
        return lost


class Sim:
    """The event loop: agents, devices, and the kernel's DeviceSet between them."""

    def __init__(self, devices: int, agents: int, load: float, seconds: float,
                 seed: int = 1, losses: tuple[float, ...] = ()) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.devs = [SimQueue(self, k) for k in range(devices)]
        self.ds = DeviceSet(self.devs)  # the kernel's placement, driving simulated devices
        self.agents = agents
        self.ctx = [0] * agents
        capacity = devices * SLOTS / _MEAN_SERVICE          # requests/s the fleet serves
        self.think = max(0.01, agents / (load * capacity) - _MEAN_SERVICE)
        self.offered = agents / (self.think + _MEAN_SERVICE)
        self.capacity = capacity
        self.seconds = seconds
        self.warm = seconds / 4                              # measured from here on
        self.losses = losses
        self.waits: list[float] = []
        self.turned_away = self.completed = self.requests = 0
        self.fresh = self.resumed = self.restored = 0       # how each prompt's prefix came
        self.place_s = 0.0
        self.device_s = 0.0
        self.places = 0
        self.samples: list[tuple[float, float, float, float]] = []
        self.loss_report: list[dict[str, Any]] = []

    def at(self, t: float, kind: str, what: Any) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, what))

    # -- requests --------------------------------------------------------------------------
    def ask(self, agent: int, retry: int | None = None) -> None:
        """The agent's next turn (or the same one again, after EIO)."""
        ctx = self.ctx[agent] or SYSTEM
        rnd = self.rng.random
        new = TURN_IN[0] + int(rnd() * (TURN_IN[1] - TURN_IN[0] + 1))
        out = TURN_OUT[0] + int(rnd() * (TURN_OUT[1] - TURN_OUT[0] + 1))
        coro = self.ds.generate(agent, (min(ctx + new, WINDOW), new, out))
        self.requests += 1
        t = time.perf_counter()
        self._step(agent, coro, retry=retry)
        self.place_s += time.perf_counter() - t
        self.places += 1

    def _step(self, agent: int, coro: Any, value: Any = None, exc: BaseException | None = None,
              retry: int | None = None) -> None:
        try:
            req = coro.throw(exc) if exc is not None else coro.send(value)
        except StopIteration:
            self.turn_done(agent)
        except SyscallError as e:
            assert e.name == "EIO", e
            self.ask(agent, retry=retry)  # what a client does with EIO: ask again
        else:
            req.coro = coro
            req.retry = retry

    def admit(self, dev: SimQueue) -> None:
        while dev.queue and len(dev.running) < SLOTS:
            req = dev.queue[0]
            owner = req.owner
            cached = dev.resident.pop(owner, None)
            if cached is not None:
                dev.kv_used -= cached
            need = req.ctx + req.out
            if not dev.make_room(need):
                if cached is not None:
                    dev.resident[owner] = cached
                    dev.kv_used += cached
                break  # FIFO: nobody behind goes first
            dev.queue.popleft()
            n = dev.queued[owner] - 1
            if n:
                dev.queued[owner] = n
            else:
                del dev.queued[owner]
            saved = dev.saved.pop(owner, 0)
            dev.saved_tokens -= saved
            if cached is not None:
                prefill = req.new * PREFILL_S
                self.resumed += 1
            elif saved:
                prefill = saved * RESTORE_S + (req.ctx - saved) * PREFILL_S
                self.restored += 1
            else:
                prefill = req.ctx * PREFILL_S
                self.fresh += 1
            req.cells = need
            dev.kv_used += need
            req.started = self.now
            dev.running[owner] = req
            wait = self.now - req.submitted
            if self.now >= self.warm:
                self.waits.append(wait)
                if wait > DEADLINE_S:
                    self.turned_away += 1
            self.at(self.now + prefill + req.out * STEP_S, "done", (dev, req))

    def done(self, dev: SimQueue, req: SimRequest) -> None:
        if dev.running.get(req.owner) is not req:
            return  # the device died under it
        del dev.running[req.owner]
        dev.resident[req.owner] = req.cells  # its conversation stays in the KV cache
        self.ctx[req.owner] = min(req.ctx + req.out, WINDOW)
        self.completed += self.now >= self.warm
        if req.retry is not None and self.now >= self.warm:  # a request a loss sent here
            loss = self.loss_report[req.retry]
            loss["done"] += 1
            loss["until"] = self.now - loss["t"]
        self.admit(dev)
        self._step(req.owner, req.coro, Result("", [], "length", {}))

    def turn_done(self, agent: int) -> None:
        self.at(self.now + self.rng.expovariate(1.0 / self.think), "ask", agent)

    # -- faults ----------------------------------------------------------------------------
    def lose(self, n: int) -> None:
        victims = self.rng.sample([d for d in self.devs if d.device.alive], n)
        gone = {d.k for d in victims}
        homed = sum(1 for k in self.ds._home.values() if k in gone)
        lost = [r for d in victims for r in d.lose()]
        idx = len(self.loss_report)
        self.loss_report.append({"devices": n, "t": self.now, "in_flight": len(lost),
                                 "homed": homed, "done": 0, "until": None})
        each = []
        for req in lost:  # each gets EIO through DeviceSet.generate, and asks again
            t, sim = time.perf_counter(), self.device_s
            self._step(req.owner, req.coro, exc=SyscallError("EIO", "device lost"), retry=idx)
            each.append(time.perf_counter() - t - (self.device_s - sim))
        self.loss_report[idx]["replace_ms"] = sum(each) * 1e3
        self.loss_report[idx]["replace_p50_us"] = statistics.median(each or [0.0]) * 1e6

    # -- the run ---------------------------------------------------------------------------
    def sample(self) -> None:
        loads = [d.load() for d in self.devs if d.device.alive]
        mean = sum(loads) / len(loads)
        jain = (sum(loads) ** 2 / (len(loads) * sum(x * x for x in loads))) if mean else 1.0
        pool = KV_CELLS * len(self.devs)
        kv = sum(d.kv_used for d in self.devs) / pool
        active = sum(r.cells for d in self.devs for r in d.running.values()) / pool
        busy = sum(len(d.running) for d in self.devs) / (SLOTS * len(self.devs))
        self.samples.append((max(loads) / mean if mean else 1.0, jain, kv, active, busy))

    def run(self) -> dict[str, Any]:
        cycle = 1.0 / (self.think + _MEAN_SERVICE)
        for a in range(self.agents):  # memoryless: as if the agents had been at it all along
            self.at(self.rng.expovariate(cycle), "ask", a)
        t = 1.0
        while t < self.seconds:
            self.at(t, "sample", None)
            t += 1.0
        for i, when in enumerate(self.losses):
            self.at(when, "lose", 1 if i == 0 else NODE_DEVICES)
        wall = time.perf_counter()
        while self.events:
            when, _, kind, what = heapq.heappop(self.events)
            if when > self.seconds:
                break
            self.now = when
            if kind == "ask":
                self.ask(what)
            elif kind == "done":
                self.done(*what)
            elif kind == "sample":
                if when >= self.warm:
                    self.sample()
            else:
                self.lose(what)
        wall = time.perf_counter() - wall
        span = self.seconds - self.warm
        waits = sorted(self.waits) or [0.0]
        cols = list(zip(*self.samples)) or [[0.0]] * 5
        prefixes = max(1, self.fresh + self.resumed + self.restored)
        return {
            "offered_per_s": self.offered, "capacity_per_s": self.capacity,
            "served_per_s": self.completed / span, "requests": self.requests,
            "wall_s": wall, "us_per_request": wall / max(1, self.requests) * 1e6,
            "place_us": (self.place_s - self.device_s) / max(1, self.places) * 1e6,
            "max_over_mean": statistics.fmean(cols[0]), "jain": statistics.fmean(cols[1]),
            "kv_used": statistics.fmean(cols[2]), "kv_active": statistics.fmean(cols[3]),
            "slots_busy": statistics.fmean(cols[4]),
            "queued": sum(1 for w in waits if w > 0) / len(waits),
            "wait_p50_s": waits[len(waits) // 2], "wait_p99_s": waits[int(len(waits) * 0.99)],
            "turned_away": self.turned_away, "turned_away_frac": self.turned_away / len(waits),
            "resident": self.resumed / prefixes, "restored": self.restored / prefixes,
            "fresh": self.fresh / prefixes, "moves": self.ds.moves,
            "losses": self.loss_report,
        }


# -- (a) the cost of one decision, on real Schedulers ----------------------------------------

async def _decision_cost(n: int, placed: int) -> dict[str, float]:
    ds = DeviceSet([Scheduler(SimDevice(SLOTS, kv_cap=KV_CELLS), "fair") for _ in range(n)])
    rng = random.Random(n)
    owner = 10
    async with trio.open_nursery() as nursery:
        for _ in range(2 * n):  # two queued requests per device on average, unevenly
            nursery.start_soon(ds.schedulers[rng.randrange(n)].generate, owner, [5, 6, 7],
                               {"max_tokens": 4})
            owner += 1
        for _ in range(placed):  # resident processes: a request each, queued where placed
            nursery.start_soon(ds.generate, owner, [5, 6, 7], {"max_tokens": 4})
            owner += 1
        await trio.testing.wait_all_tasks_blocked()
        resident = list(range(owner - placed, owner))
        fresh = list(range(owner, owner + 2000))
        t = time.perf_counter()
        for o in fresh:
            await ds._place(o)
        new_us = (time.perf_counter() - t) / len(fresh) * 1e6
        t = time.perf_counter()
        for o in resident:
            await ds._place(o)
        sticky_us = (time.perf_counter() - t) / len(resident) * 1e6
        t = time.perf_counter()
        stats = ds.stats()
        stats_ms = (time.perf_counter() - t) * 1e3
        assert len(stats["devices"]) == n
        t = time.perf_counter()
        for o in fresh:
            await ds.release(o)
        release_us = (time.perf_counter() - t) / len(fresh) * 1e6
        nursery.cancel_scope.cancel()
    return {"new_us": new_us, "sticky_us": sticky_us, "release_us": release_us,
            "stats_ms": stats_ms}


def decision_cost(sizes: tuple[int, ...]) -> dict[int, dict[str, float]]:
    return {n: trio.run(_decision_cost, n, 500) for n in sizes}


# -- (d) kernel memory per agent -------------------------------------------------------------

def memory_per_agent(agents: int) -> dict[str, float]:
    from llmagentos.kernel.proc.table import ProcessTable

    with tempfile.TemporaryDirectory() as tmp:
        table = ProcessTable(Path(tmp), base_env={})
        ds = DeviceSet([SimQueue(None, 0)])  # type: ignore[arg-type]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(agents):
            pcb = table._new_pcb(ppid=1, name=f"agent-{i}", argv=["python", "agent.py"],
                                 caps=["llm", "ctx", "fs"])
            pcb.agent = f"agent-{i}"
        pcbs = tracemalloc.get_traced_memory()[0] - before
        owners: list[Any] = []
        for pid in list(table.procs)[1:]:
            owner = Owner(pid)
            owners.append(Request(pid, owner, None, Mailbox(), 0.0))
            ds._home[pid] = 0
            ds._held[pid] = {0}
        total = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    return {"pcb_bytes": pcbs / agents, "sched_bytes": (total - pcbs) / agents,
            "total_bytes": total / agents, "total_mb": total / 2**20}


def context_bytes(contexts: int = 300, messages: int = 30) -> dict[str, float]:
    """On disk, per agent: a context of ``messages`` messages (~80 tokens each, as
    counted by whitespace words x 1.3) in the memory database, with its FTS index."""
    from llmagentos.kernel.memory import ContextStore

    rng = random.Random(3)
    words = ["".join(rng.choices("abcdefghijklmnoprstuvw", k=rng.randint(3, 9)))
             for _ in range(5000)]
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.db"
        with ContextStore(path, lambda t: math.ceil(len(t.split()) * 1.3)) as store:
            empty = path.stat().st_size
            for i in range(contexts):
                ctx = store.create(f"agent:a{i}", budget=WINDOW)
                batch = [(("user", "assistant")[m % 2], " ".join(rng.choices(words, k=60)))
                         for m in range(messages)]
                tokens += sum(math.ceil(len(t.split()) * 1.3) for _, t in batch)
                store.import_archive(ctx, batch)
            with store._db.lock:
                store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            size = path.stat().st_size - empty
    return {"context_bytes": size / contexts, "bytes_per_token": size / tokens,
            "tokens": tokens / contexts}


# -- the bench ---------------------------------------------------------------------------------

def run(devices: int = 1000, agents: int = 100_000, seconds: float = 20.0,
        sizes: tuple[int, ...] = (10, 100, 1000),
        loads: tuple[float, ...] = LOADS) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": devices, "agents": agents, "seconds": seconds}
    t = time.perf_counter()
    out["decision"] = decision_cost(sizes)
    out["decision_wall_s"] = time.perf_counter() - t
    out["sim"] = {}
    for i, load in enumerate(loads):
        losses = (seconds * 0.5, seconds * 0.6) if i == len(loads) // 2 else ()
        out["sim"][load] = Sim(devices, agents, load, seconds, losses=losses).run()
    out["memory"] = memory_per_agent(agents) | context_bytes()
    return out


def report(r: dict[str, Any]) -> None:
    print(f"== placement at scale: {r['devices']} devices, {r['agents']:,} agents "
          f"(simulated; the kernel's DeviceSet) ==")
    print("  decision cost on real Schedulers (simulated devices, 2 queued requests each):")
    for n, d in r["decision"].items():
        print(f"    {n:5d} devices: new process {d['new_us']:7.1f} us   resident "
              f"{d['sticky_us']:5.1f} us   exit {d['release_us']:6.1f} us   "
              f"stats() {d['stats_ms']:7.1f} ms")
    print(f"  discrete-event simulation, {r['seconds']:.0f} simulated s each (first quarter "
          f"not measured); {SLOTS} slots and {KV_CELLS:,} KV cells a device:")
    for load, s in r["sim"].items():
        print(f"    offered {load:.1f}x capacity ({s['offered_per_s']:,.0f} req/s): served "
              f"{s['served_per_s']:,.0f}/s; load max/mean {s['max_over_mean']:.2f}, Jain "
              f"{s['jain']:.3f}; slots busy {s['slots_busy']:.2f}; KV used {s['kv_used']:.2f} "
              f"(by running requests {s['kv_active']:.2f}, the rest idle conversations)")
        print(f"      queued {s['queued']:.1%}, wait p50 {s['wait_p50_s']:.2f} s p99 "
              f"{s['wait_p99_s']:.2f} s; turned away (wait > {DEADLINE_S:.0f} s) "
              f"{s['turned_away']:,} ({s['turned_away_frac']:.1%}); prefix resident "
              f"{s['resident']:.0%}, restored {s['restored']:.0%}, re-prefilled "
              f"{s['fresh']:.0%}; DeviceSet {s['place_us']:.1f} us a request "
              f"({s['requests']:,} requests, {s['wall_s']:.1f} s wall)")
        for loss in s["losses"]:
            until = "-" if loss["until"] is None else f"{loss['until']:.1f} s"
            print(f"      lost {loss['devices']} device(s) at {loss['t']:.0f} s: "
                  f"{loss['in_flight']} requests in flight got EIO and were re-placed: "
                  f"{loss['replace_ms']:.1f} ms of kernel time (median "
                  f"{loss['replace_p50_us']:.0f} us each); {loss['homed']} agents "
                  f"were homed there; {loss['done']} retries done, the last "
                  f"{until} after the loss")
    m = r["memory"]
    print(f"  kernel memory per agent (tracemalloc, {r['agents']:,}): PCB + process table "
          f"{m['pcb_bytes']:,.0f} B, scheduler Owner + a queued Request + DeviceSet maps "
          f"{m['sched_bytes']:,.0f} B; {m['total_bytes']:,.0f} B in all "
          f"({m['total_mb']:.0f} MiB)")
    print(f"  on disk per agent: a context of {m['tokens']:,.0f} tokens in the memory database "
          f"(with its search index) {m['context_bytes'] / 1024:,.0f} KiB, "
          f"{m['bytes_per_token']:.1f} B a token")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--agents", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=20.0, help="simulated seconds per load")
    p.add_argument("--loads", type=float, nargs="+", default=list(LOADS),
                   help="offered loads, as fractions of the fleet's capacity")
    p.add_argument("--quick", action="store_true",
                   help="100 devices, 10,000 agents, decision cost at 10 and 100")
    a = p.parse_args()
    if a.quick:
        report(run(100, 10_000, a.seconds, (10, 100), tuple(a.loads)))
    else:
        report(run(a.devices, a.agents, a.seconds, loads=tuple(a.loads)))


if __name__ == "__main__":
    main()
