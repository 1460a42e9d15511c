"""Placement over several devices (kernel/devices.py DeviceSet), on the simulated
device: by load first, then by free KV memory."""

from __future__ import annotations

import trio

from llmagentos.drivers.simdevice import SimDevice
from llmagentos.kernel.devices import DeviceSet
from llmagentos.kernel.scheduler import Scheduler


async def device_set(nursery, *devs: SimDevice) -> DeviceSet:
    ds = DeviceSet([Scheduler(d) for d in devs])
    await nursery.start(ds.run)
    return ds


def homes(ds: DeviceSet) -> dict[int, list[int]]:
    return {d["device"]: d["processes"] for d in ds.stats()["devices"]}


async def test_a_new_process_goes_where_the_kv_pool_is_free(nursery):
    a, b = SimDevice(2, n_ctx=256, kv_cap=256), SimDevice(2, n_ctx=256, kv_cap=256)
    ds = await device_set(nursery, a, b)
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
    ds = await device_set(nursery, small, big)
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
    ds = await device_set(nursery, quiet, known)
    await ds.generate(1, known.tokenize("hi"), {"max_tokens": 2})
    assert homes(ds) == {0: [], 1: [1]}
    assert ds.stats()["devices"][0]["kv_free"] is None
