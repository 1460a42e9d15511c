"""Several devices behind one DeviceSet (kernel/devices.py): where a process's
requests go, and that deciding it does not grow with the number of devices or
of processes (the plan at scale, docs/scaling.md; bench/bench_scale.py): by
load first, then by free KV memory.

Real Schedulers on simulated devices (drivers/simdevice.py). Where a test needs
many devices busy at once, their loops are not started: a request then stays
queued, holding its device's load, until the test cancels it.
"""

from __future__ import annotations

import trio
import trio.testing

from llmagentos.drivers.simdevice import SimDevice
from llmagentos.kernel.devices import DeviceSet
from llmagentos.kernel.scheduler import Scheduler

GREEDY = {"max_tokens": 4, "temperature": 0}


def device_set(n: int, **kw) -> DeviceSet:
    return DeviceSet([Scheduler(SimDevice(2, token_cost_s=0.001, **kw), "fair")
                      for _ in range(n)])


def homes(ds: DeviceSet) -> dict[int, list[int]]:
    """device -> the processes placed on it, as `llmos status` shows them."""
    return {d["device"]: d["processes"] for d in ds.stats()["devices"]}


async def queue_up(ds: DeviceSet, nursery: trio.Nursery, owners: range) -> None:
    """A request for each owner, queued on its device (whose loop is not running)."""
    for owner in owners:
        nursery.start_soon(ds.generate, owner, [5, 6, 7], GREEDY)
        await trio.testing.wait_all_tasks_blocked()


# -- where requests go (the behaviour the heap of loads must keep) ---------------------------

async def test_new_processes_go_to_the_least_loaded_device_and_stay_while_resident(nursery):
    ds = device_set(3)
    await nursery.start(ds.run)
    async with trio.open_nursery() as n:
        for owner in (10, 11, 12):
            n.start_soon(ds.generate, owner, [5, 6, 7, owner], GREEDY)
    spread = homes(ds)
    assert sorted(len(p) for p in spread.values()) == [1, 1, 1]
    home = next(d for d, p in spread.items() if 10 in p)
    await ds.generate(10, [5, 6, 7, 10, 1, 2], GREEDY)  # its conversation is resident there
    assert 10 in homes(ds)[home] and ds.moves == 0
    # Every request came back: the loads are level again, so the tie goes to the most free
    # KV cells, then the lowest index. (Which device took 10, whose conversation is the
    # longest, follows trio's task order, so the winner is read from the devices.)
    free = {d["device"]: d["kv_free"] for d in ds.stats()["devices"]}
    await ds.generate(13, [9, 9, 9], GREEDY)
    assert 13 in homes(ds)[min(free, key=lambda d: (-free[d], d))]


async def test_a_dead_device_gets_no_process_until_it_answers_again(nursery):
    ds = device_set(3)
    await nursery.start(ds.run)
    await ds.generate(10, [5, 6, 7], GREEDY)
    assert homes(ds)[0] == [10]
    ds.schedulers[0].device.alive = False
    await ds.generate(11, [5, 6, 7], GREEDY)
    await ds.generate(10, [5, 6, 7, 8], GREEDY)  # its home is dead: it moves
    assert homes(ds)[0] == [] and ds.moves == 1
    ds.schedulers[0].device.alive = True
    await ds.generate(12, [5, 6, 7], GREEDY)  # back, unloaded, lowest index
    assert homes(ds)[0] == [12]


async def test_placement_stays_right_across_many_requests(nursery):
    """Hundreds of load changes (the heap of loads is rebuilt on the way), with a
    device dead all along: it comes back and takes the next new process."""
    ds = device_set(2)
    await nursery.start(ds.run)
    ds.schedulers[0].device.alive = False
    for i in range(120):
        await ds.generate(10 + i % 3, [5, 6, 7, i], GREEDY)
    assert homes(ds)[0] == [] and ds.stats()["devices"][1]["tokens_out"] == 120 * 4
    ds.schedulers[0].device.alive = True
    await ds.generate(99, [5, 6, 7], GREEDY)
    assert homes(ds)[0] == [99]
    assert ds.usage(99)["tokens_out"] == 4 and ds.usage(10)["tokens_out"] == 40 * 4


async def test_with_every_device_dead_a_request_still_gets_an_answer(nursery):
    ds = device_set(2)
    await nursery.start(ds.run)
    for sched in ds.schedulers:
        sched.device.alive = False
    result = await ds.generate(10, [5, 6, 7], GREEDY)  # a simulated device still computes
    assert result.tokens


# -- the cost of deciding, at a thousand devices --------------------------------------------

def count_calls(ds: DeviceSet, method: str) -> list[int]:
    """Wrap ``method`` of every Scheduler of ``ds``; the list holds the count."""
    calls = [0]
    for sched in ds.schedulers:
        real = getattr(sched, method)

        def wrapped(*a, _real=real, **kw):
            calls[0] += 1
            return _real(*a, **kw)
        setattr(sched, method, wrapped)
    return calls


async def test_placing_a_process_does_not_ask_every_device_its_load():
    """Placement read each of the 1,000 Schedulers' load (a walk of its slots) for
    every new process: ~20 ms a decision on a 2-core machine."""
    ds = device_set(1000)
    loads = count_calls(ds, "load")
    async with trio.open_nursery() as n:
        await queue_up(ds, n, range(100, 150))
        assert loads[0] < 1000  # was 50,000: every device, for each of the 50
        spread = homes(ds)
        assert [spread[d] for d in range(50)] == [[100 + d] for d in range(50)]
        await queue_up(ds, n, range(150, 151))  # the least loaded: the first still empty
        assert homes(ds)[50] == [150]
        n.cancel_scope.cancel()


async def test_a_process_exit_is_answered_by_the_devices_that_held_it():
    """release() awaited every one of the 1,000 Schedulers for each exiting process
    (~250 ms an exit on a 2-core machine)."""
    ds = device_set(1000)
    releases = count_calls(ds, "release")
    async with trio.open_nursery() as n:
        await queue_up(ds, n, range(100, 103))
        n.cancel_scope.cancel()
    await ds.release(101)
    assert releases[0] == 1  # was 1,000
    assert 101 not in sum(homes(ds).values(), [])


class CountingHomes(dict):
    """The pid -> device map, counting walks over it."""

    walks = 0

    def items(self):
        self.walks += 1
        return super().items()


async def test_stats_lists_each_devices_processes_in_one_walk():
    """stats() walked every process once per device: 10^8 steps at 1,000 devices
    and 100,000 processes, for one `llmos status`."""
    ds = device_set(100)
    ds._home = CountingHomes({pid: pid % 100 for pid in range(10, 2010)})
    spread = homes(ds)
    assert ds._home.walks == 1  # was 100
    assert spread[7] == list(range(107, 2010, 100))


# -- by free KV memory, among equally loaded devices -----------------------------------------

async def kv_device_set(nursery, *devs: SimDevice) -> DeviceSet:
    ds = DeviceSet([Scheduler(d) for d in devs])
    await nursery.start(ds.run)
    return ds


async def test_a_new_process_goes_where_the_kv_pool_is_free(nursery):
    a, b = SimDevice(2, n_ctx=256, kv_cap=256), SimDevice(2, n_ctx=256, kv_cap=256)
    ds = await kv_device_set(nursery, a, b)
    await ds.generate(1, a.tokenize("x" * 150), {"max_tokens": 10})
    # Process 1's conversation stays resident on device 0 (an idle slot): both devices
    # are idle, but device 0 would have to evict it to take another long prompt.
    assert homes(ds) == {0: [1], 1: []}
    await ds.generate(2, a.tokenize("y" * 150), {"max_tokens": 10})
    assert homes(ds) == {0: [1], 1: [2]}
    free = [d["kv_free"] for d in ds.stats()["devices"]]
    assert 0 < free[0] < 256 and 0 < free[1] < 256
    assert a.cells.used() and b.cells.used()
    assert ds.stats()["preemptions"] == 0 and ds.stats()["idle_saves"] == 0


async def test_load_comes_before_free_kv(nursery):
    small = SimDevice(2, n_ctx=256, kv_cap=128, decode_s=0.01)
    big = SimDevice(2, n_ctx=256, kv_cap=512, decode_s=0.01)
    ds = await kv_device_set(nursery, small, big)
    done = trio.Event()

    async def busy() -> None:
        await ds.generate(1, big.tokenize("long"), {"max_tokens": 100})
        done.set()

    nursery.start_soon(busy)
    with trio.fail_after(10):
        while not sum(d["running"] for d in ds.stats()["devices"]):
            await trio.sleep(0.01)
    assert homes(ds) == {0: [], 1: [1]}  # on the big one: the most free
    await ds.generate(2, small.tokenize("short"), {"max_tokens": 2})
    assert homes(ds)[0] == [2]  # the idle small device, though the busy one has more free
    await done.wait()


async def test_a_device_that_does_not_say_comes_after_those_that_do(nursery):
    class Quiet(SimDevice):
        """A device with no KV accounting (as a proxy that cannot tell)."""
        kv_used = property()  # hasattr() is False: the scheduler cannot know its pool

    quiet, known = Quiet(2, n_ctx=256), SimDevice(2, n_ctx=256, kv_cap=64)
    ds = await kv_device_set(nursery, quiet, known)
    await ds.generate(1, known.tokenize("hi"), {"max_tokens": 2})
    assert homes(ds) == {0: [], 1: [1]}
    assert ds.stats()["devices"][0]["kv_free"] is None
