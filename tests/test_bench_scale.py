"""bench/bench_scale.py's simulation drives the kernel's own DeviceSet: what it
reports about a device loss and about load is what the kernel would do."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_scale  # noqa: E402


def test_a_lost_device_s_requests_get_eio_and_all_finish_elsewhere():
    sim = bench_scale.Sim(devices=20, agents=400, load=0.9, seconds=20.0, losses=(10.0,))
    r = sim.run()
    (loss,) = r["losses"]
    assert loss["devices"] == 1 and loss["in_flight"] > 0
    assert loss["done"] == loss["in_flight"]  # every one retried, re-placed and served
    dead = [k for k, d in enumerate(sim.devs) if not d.device.alive]
    assert len(dead) == 1
    # The DeviceSet's count of each device's requests is the device's own, dead or alive.
    assert sim.ds._load == [d.load() for d in sim.devs]
    assert sim.devs[dead[0]].load() == 0
    assert r["served_per_s"] > 0 and 0 < r["jain"] <= 1


def test_overload_queues_requests_and_a_light_load_does_not():
    light = bench_scale.Sim(devices=10, agents=200, load=0.3, seconds=20.0).run()
    heavy = bench_scale.Sim(devices=10, agents=200, load=1.5, seconds=20.0).run()
    assert heavy["queued"] > light["queued"]
    assert heavy["slots_busy"] > light["slots_busy"]
