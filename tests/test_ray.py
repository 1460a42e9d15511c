"""Beyond one machine: compute devices and agent processes on a (local) Ray cluster.

One kernel for the module: `--ray auto` starts a local Ray instance, places two
device actors (Gemma-3-270M each, 4 slots) and listens on loopback TCP for
remote agent processes. Skipped where Ray is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time

import pytest
from conftest import boot_kernel, in_thread, wait_for

import llmagentos
from llmagentos import KernelError

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed "
                                                   "(pip install 'llmagentos[ray]')")
GREEDY = {"max_tokens": 12, "temperature": 0.0}


@pytest.fixture(scope="module")
def ray_kernel(tmp_path_factory):
    if not HAS_RAY:
        pytest.skip("Ray is not installed (pip install 'llmagentos[ray]')")
    k = boot_kernel(tmp_path_factory.mktemp("ray"), "--ray", "auto", "--devices", "2",
                    "--slots", "4", "--n-ctx", "512", "--tcp", "127.0.0.1:0",
                    model="gemma3-270m", wait=180)
    yield k
    k.stop(timeout=30)


def agent_client(k, name: str) -> llmagentos.Client:
    """A new process (attached) and a connection that is that process."""
    with k.client() as c:
        child = c.proc.attach(name=name)
    return llmagentos.connect(run_dir=k.run_dir, token=child["token"])


def devices(k) -> list[dict]:
    with k.client() as c:
        return c.sys.stats()["device"]["devices"]


@needs_ray
def test_two_device_actors_serve_many_agents(ray_kernel):
    before = [d["tokens_out"] for d in devices(ray_kernel)]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            with agent_client(ray_kernel, f"agent{i}") as c:
                r1 = c.llm.generate(prompt=f"Agent {i} counts: one, two,", params=GREEDY)
                r2 = c.llm.generate(prompt=f"Agent {i} counts: one, two,{r1['text']} and",
                                    params=GREEDY)
                results[i] = r2
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 6
    for r in results.values():
        assert r["usage"]["completion_tokens"] > 0
        # the second turn extends the first: its prefix stayed on the same device
        assert r["usage"]["cached_tokens"] > 0
    after = devices(ray_kernel)
    used = [d["tokens_out"] - b for d, b in zip(after, before)]
    assert all(u > 0 for u in used), f"a device was never used: {used}"
    assert all(d["kind"] == "ray" and d["alive"] and d["node"] for d in after)


@needs_ray
def test_dead_device_actor_fails_in_flight_with_eio_and_next_request_works(ray_kernel):
    with agent_client(ray_kernel, "victim") as c:
        pid = c.proc.getpid()
        c.llm.generate(prompt="Warm up:", params={"max_tokens": 2, "temperature": 0.0})
        home = next(d for d in devices(ray_kernel) if pid in d["processes"])
        t, box = in_thread(c.llm.generate, prompt="Write a very long story about a dragon:",
                           params={"max_tokens": 400, "temperature": 0.7, "seed": 1})
        wait_for(lambda: devices(ray_kernel)[home["device"]]["running"] > 0, timeout=30)
        time.sleep(0.3)
        os.kill(home["actor_pid"], signal.SIGKILL)  # the device's worker process crashes
        t.join(60)
        assert "error" in box, f"the request survived its device: {box}"
        assert box["error"].name == "EIO"
        # The process goes on: its next request prefills on a live device.
        r = c.llm.generate(prompt="After the crash, the answer is", params=GREEDY)
        assert r["usage"]["completion_tokens"] > 0
    dead = devices(ray_kernel)[home["device"]]
    assert dead["failures"] >= 1
    # Ray restarts the actor (max_restarts); the kernel's probe notices.
    wait_for(lambda: devices(ray_kernel)[home["device"]]["alive"], timeout=60, interval=0.5)
    back = devices(ray_kernel)[home["device"]]
    assert back["actor_pid"] != home["actor_pid"]
    with ray_kernel.client() as c:
        cl = c.sys.stats()["cluster"]
    assert cl["nodes_alive"] >= 1 and len(cl["devices"]) == 2


REMOTE_AGENT = """
import os, time, llmagentos
assert os.environ["LLMAGENTOS_SOCKET"].startswith("tcp://")
c = llmagentos.connect()
print("pid", c.proc.getpid(), "tokens", len(c.llm.tokenize("hello world")), flush=True)
r = c.llm.generate(prompt="Hello from a remote node,", params={"max_tokens": 4,
                   "temperature": 0.0})
print("generated", r["usage"]["completion_tokens"], flush=True)
time.sleep(float(os.environ.get("LINGER", "0")))
"""


@needs_ray
def test_remote_agent_process_calls_over_tcp_and_shows_its_node(ray_kernel):
    with ray_kernel.client() as c:
        pid = c.proc.spawn([sys.executable, "-c", REMOTE_AGENT], name="remote",
                           env={"LINGER": "3"}, placement="ray")
        row = next(r for r in c.proc.ps() if r["pid"] == pid)
        assert row["node"], row
        status = c.proc.wait(pid, timeout=60)
        assert status["exit_code"] == 0, c.proc.logs(pid)
        out = c.proc.logs(pid)["data"].decode()
        assert f"pid {pid} tokens" in out and "generated 4" in out, out


@needs_ray
def test_remote_agent_process_is_killed_through_its_node(ray_kernel):
    with ray_kernel.client() as c:
        pid = c.proc.spawn([sys.executable, "-c", "import time; time.sleep(60)"],
                           placement="ray")
        t0 = time.monotonic()
        c.proc.kill(pid, "SIGKILL")
        status = c.proc.wait(pid, timeout=30)
        assert status["signal"] == signal.SIGKILL
        assert time.monotonic() - t0 < 30


def test_ray_placement_needs_a_ray_kernel(kernel):
    with kernel.client() as c:
        for placement in ("ray", "node:ab12"):
            with pytest.raises(KernelError) as e:
                c.proc.spawn(["true"], placement=placement)
            assert e.value.name == "EINVAL" and "--ray" in str(e.value)
        for placement in ("elsewhere", "node:", "node:not-hex", "", "LOCAL"):
            with pytest.raises(KernelError) as e:
                c.proc.spawn(["true"], placement=placement)
            assert e.value.name == "EINVAL" and "placement" in str(e.value)
        assert [r["pid"] for r in c.proc.ps()] == [1]  # nothing half-made was left
