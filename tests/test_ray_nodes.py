"""Agents and devices on other nodes of a real multi-node Ray cluster, and node loss.

One cluster for the module, made on this machine with ray.cluster_utils: a
head (no CPUs: nothing but the GCS) and two worker nodes with their own
resources and one CPU each, so each holds one device actor (the simulated
device, 10 ms a step). The kernel joins it (`--ray ADDRESS`) and serves remote
agents over its TLS listener on loopback. The node-loss test removes a worker
node and runs last.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import boot_kernel, in_thread, wait_for

import llmagentos
from llmagentos import KernelError

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="Ray is not installed (pip install 'llmagentos[ray]')")]

MODELS = '[models.sim-10ms]\nkind = "sim"\ndecode_ms = 10\nn_ctx = 1024\n'
# Node death is noticed within a few seconds, not Ray's default half minute.
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
               "health_check_failure_threshold": 3}


class Nodes:
    def __init__(self, cluster, kernel, a, b) -> None:
        self.cluster, self.kernel, self.a, self.b = cluster, kernel, a, b


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("nodes")
    (tmp / "models.toml").write_text(MODELS)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
    k = None
    try:
        a = cluster.add_node(num_cpus=1, resources={"node_a": 1})
        b = cluster.add_node(num_cpus=1, resources={"node_b": 1})
        cluster.wait_for_nodes()
        k = boot_kernel(tmp, "--ray", cluster.address, "--devices", "2", "--slots", "4",
                        "--n-ctx", "1024", "--listen", "127.0.0.1:0",
                        "--config", str(tmp / "models.toml"), model="sim-10ms", wait=180)
        yield Nodes(cluster, k, a, b)
    finally:
        if k is not None:
            k.stop(timeout=30)
        cluster.shutdown()


def devices(k) -> list[dict]:
    with k.client() as c:
        return c.sys.stats()["device"]["devices"]


def row(c, pid: int) -> dict:
    return next(r for r in c.proc.ps() if r["pid"] == pid)


def os_state(os_pid: int) -> str:
    """The OS process's state letter (R, S, T, Z), or "" once it is gone."""
    try:
        with open(f"/proc/{os_pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return ""


REMOTE_AGENT = """
import os, llmagentos
c = llmagentos.connect()
assert os.environ["LLMAGENTOS_ADDRESS"].startswith("tls://"), os.environ["LLMAGENTOS_ADDRESS"]
assert os.environ["LLMAGENTOS_CA"] and "LLMAGENTOS_TOKEN" not in os.environ
r = c.llm.generate(prompt="Hello from another node,", params={"max_tokens": 6})
print("pid", c.proc.getpid(), "generated", r["usage"]["completion_tokens"], flush=True)
"""


def test_agent_on_a_worker_node_generates_through_a_device_on_another(nodes):
    before = devices(nodes.kernel)
    # The device actors report their free KV cells (placement weighs them after load).
    assert [d["kv_free"] for d in before] == [4 * 1024] * 2, before
    # A new process goes to the least-loaded device, the first of equals: device 0.
    # The agent runs on the other worker node, so it reaches device 0 across nodes.
    elsewhere = next(n for n in (nodes.a, nodes.b) if n.node_id != before[0]["node_id"])
    with nodes.kernel.client() as c:
        # whatever the spawner's env says, the kernel says where it is and whose token
        forged = {"LLMAGENTOS_TOKEN": "forged", "LLMAGENTOS_ADDRESS": "tls://127.0.0.1:1",
                  "LLMAGENTOS_CA": "/nonexistent.pem", "LLMAGENTOS_PID": "1"}
        pid = c.proc.spawn([sys.executable, "-c", REMOTE_AGENT], name="faraway", env=forged,
                           placement=f"node:{elsewhere.node_id}")
        r = row(c, pid)
        assert r["node_id"] == elsewhere.node_id and r["node"], r
        status = c.proc.wait(pid, timeout=60)
        out = c.proc.logs(pid)["data"].decode()
        assert status["exit_code"] == 0, out
        assert f"pid {pid} generated 6" in out, out
    after = devices(nodes.kernel)
    assert after[0]["tokens_out"] - before[0]["tokens_out"] >= 6
    assert after[1]["tokens_out"] == before[1]["tokens_out"]
    assert after[0]["node_id"] != elsewhere.node_id


def test_the_readme_node_placement_example_runs(nodes):
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    start = text.index("```python\n", text.index('`placement="node:ID"`'))
    code = textwrap.dedent(text[start + len("```python\n"):text.index("```", start + 9)])
    out = subprocess.run([sys.executable, "-c", code], env=nodes.kernel.env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "'exit_code': 0" in out.stdout, out.stdout


def test_node_placement_is_checked_before_anything_runs(nodes):
    with nodes.kernel.client() as c:
        # a short unique prefix of the id is enough, as `llmos status` shows it
        pid = c.proc.spawn(["true"], placement=f"node:{nodes.a.node_id[:12].upper()}")
        assert c.proc.wait(pid, timeout=60)["exit_code"] == 0
        for bad, errno in [("node:", "EINVAL"), ("node:xyz", "EINVAL"),
                           (f"node:{nodes.a.node_id}0", "EINVAL"),  # longer than an id
                           ("node: " + nodes.a.node_id, "EINVAL"), ("nodes:ab", "EINVAL"),
                           ("Ray", "EINVAL"), ("node:" + "f" * 56, "ESRCH")]:
            t0 = time.monotonic()
            with pytest.raises(KernelError) as e:
                c.proc.spawn(["true"], placement=bad)
            assert e.value.name == errno, (bad, e.value)
            assert time.monotonic() - t0 < 10, f"{bad!r} waited for Ray"
        with pytest.raises(KernelError) as e:
            c.proc.spawn(["/no/such/program"], placement=f"node:{nodes.b.node_id}")
        assert e.value.name == "ENOENT"
        assert not [r for r in c.proc.ps() if r["state"] == "NEW"]
    # the same from the shell
    cli = [sys.executable, "-m", "llmagentos.cli", "spawn"]
    env = nodes.kernel.env()
    out = subprocess.run([*cli, "--placement", f"node:{nodes.b.node_id[:10]}", "--", "true"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with nodes.kernel.client() as c:
        assert row(c, int(out.stdout))["node_id"] == nodes.b.node_id
    out = subprocess.run([*cli, "--placement", "node:" + "0" * 56, "--", "true"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "ESRCH" in out.stderr, out


SLEEPER = "import time\nprint('up', flush=True)\nwhile True: time.sleep(0.05)\n"


HOST_AGENT = """
import time, llmagentos
c = llmagentos.connect()
child = c.proc.attach(name="inner")
inner = llmagentos.connect(token=child["token"])
inner.sys.null()
while True: time.sleep(0.05)
"""


def test_stop_and_cont_of_a_remote_process_reach_the_agents_it_hosts(nodes):
    with nodes.kernel.client() as c:
        host = c.proc.spawn([sys.executable, "-c", HOST_AGENT],
                            placement=f"node:{nodes.a.node_id}")

        def inner() -> dict | None:
            return next((r for r in c.proc.ps() if r["ppid"] == host and r["attached"]), None)

        wait_for(lambda: inner() and inner()["syscalls"] > 0, timeout=30)
        assert inner()["node"] == row(c, host)["node"] and inner()["os_pid"] == \
            row(c, host)["os_pid"]
        c.proc.kill(host, "SIGSTOP")
        assert inner()["state"] == "STOPPED"
        c.proc.kill(host, "SIGCONT")
        assert inner()["state"] != "STOPPED"
        c.proc.kill(host, "SIGKILL")
        assert c.proc.wait(host, timeout=30)["signal"] == signal.SIGKILL
        wait_for(lambda: inner() is None or inner()["state"] == "ZOMBIE", timeout=30)


def test_stop_cont_term_kill_reach_the_remote_os_process(nodes):
    with nodes.kernel.client() as c:
        p1 = c.proc.spawn([sys.executable, "-c", SLEEPER], placement=f"node:{nodes.a.node_id}")
        p2 = c.proc.spawn([sys.executable, "-c", SLEEPER], placement=f"node:{nodes.b.node_id}")
        os1, os2 = row(c, p1)["os_pid"], row(c, p2)["os_pid"]
        assert os_state(os1) and os_state(os2)  # the nodes are on this machine: we can look
        c.proc.kill(p1, "SIGSTOP")
        wait_for(lambda: os_state(os1) == "T", timeout=15)
        assert row(c, p1)["state"] == "STOPPED"
        c.proc.kill(p1, "SIGCONT")
        wait_for(lambda: os_state(os1) in ("R", "S"), timeout=15)
        c.proc.kill(p1, "SIGTERM")
        s1 = c.proc.wait(p1, timeout=30)
        assert s1["signal"] == signal.SIGTERM, s1
        assert "up" in c.proc.logs(p1)["data"].decode()  # its output came back from the node
        c.proc.kill(p2, "SIGSTOP")
        wait_for(lambda: os_state(os2) == "T", timeout=15)
        c.proc.kill(p2, "SIGKILL")  # a stopped process dies too
        s2 = c.proc.wait(p2, timeout=30)
        assert s2["signal"] == signal.SIGKILL and s2["reason"] == "", s2
    wait_for(lambda: os_state(os1) in ("", "Z") and os_state(os2) in ("", "Z"), timeout=15)


def test_a_lost_node_fails_its_requests_and_processes_and_nothing_else(nodes):
    k = nodes.kernel
    with k.client() as c:
        child = c.proc.attach(name="survivor")
    with llmagentos.connect(run_dir=k.run_dir, token=child["token"]) as c:
        me = c.proc.getpid()
        c.llm.generate(prompt="Warm up:", params={"max_tokens": 2})
        home = next(d for d in devices(k) if me in d["processes"])
        lost_node = next(n for n in (nodes.a, nodes.b) if n.node_id == home["node_id"])
        kept_node = nodes.b if lost_node is nodes.a else nodes.a
        with k.client() as sh:
            doomed = sh.proc.spawn([sys.executable, "-c", SLEEPER],
                                   placement=f"node:{lost_node.node_id}")
            spared = sh.proc.spawn([sys.executable, "-c", SLEEPER],
                                   placement=f"node:{kept_node.node_id}")
            doomed_os = row(sh, doomed)["os_pid"]
        t, box = in_thread(c.llm.generate, prompt="A very long story:",
                           params={"max_tokens": 900})
        wait_for(lambda: devices(k)[home["device"]]["running"] > 0, timeout=30)
        time.sleep(0.3)
        nodes.cluster.remove_node(lost_node, allow_graceful=False)
        t.join(60)
        assert not t.is_alive(), "the in-flight request hangs"
        assert "error" in box, f"the request outlived its node: {box}"
        assert box["error"].name == "EIO"

        # The process goes on: its next request runs on the device that is left.
        r = c.llm.generate(prompt="After the loss, the answer is", params={"max_tokens": 5})
        assert r["usage"]["completion_tokens"] == 5

    with k.client() as sh:
        # The agent on the lost node is a zombie that says why; the other runs on.
        wait_for(lambda: row(sh, doomed)["state"] == "ZOMBIE", timeout=60, interval=0.2)
        status = sh.proc.wait(doomed, timeout=10)
        assert status["signal"] == signal.SIGKILL and "lost" in status["reason"], status
        assert lost_node.node_id[:12] in status["reason"]
        assert row(sh, spared)["state"] != "ZOMBIE"
        # ... and its OS process died with its host: nothing left calling the kernel
        wait_for(lambda: os_state(doomed_os) in ("", "Z"), timeout=30)
        # The dead node is refused at once.
        with pytest.raises(KernelError) as e:
            sh.proc.spawn(["true"], placement=f"node:{lost_node.node_id}")
        assert e.value.name == "ESRCH" and "dead" in str(e.value)

        def lost() -> list:
            return sh.sys.stats()["cluster"]["lost"]

        wait_for(lambda: lost() and lost()[0]["devices"], timeout=60, interval=0.5)
        cl = sh.sys.stats()["cluster"]
        assert cl["nodes_dead"] == 1
        assert lost() == [{"node_id": lost_node.node_id, "node": lost()[0]["node"],
                           "devices": [home["device"]], "processes": [doomed]}]
        sh.proc.kill(spared, "SIGKILL")
        sh.proc.wait(spared, timeout=30)
    text = subprocess.run([sys.executable, "-m", "llmagentos.cli", "status"], env=k.env(),
                          capture_output=True, text=True, timeout=60).stdout
    assert "LOST node" in text and f"processes [{doomed}]" in text, text
    assert os.path.exists(k.socket)  # the kernel is still up


def test_the_kernels_ca_reaches_a_remote_program_in_no_named_file(monkeypatch, tmp_path):
    """A remote agent trusts the kernel's CA from a file with no name (/dev/fd/N).
    It was a llmagentos-ca-*.pem in the node's temp dir, removed only when the host
    waited for the program: a host killed first (a lost node, a stopped kernel)
    left it behind, one a remote agent."""
    import tempfile
    import types

    from llmagentos.kernel import cluster
    from llmagentos.syscalls import paths

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a named one would go
    monkeypatch.setattr(cluster, "ray", types.SimpleNamespace(
        util=types.SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1"),
        get_runtime_context=lambda: types.SimpleNamespace(get_node_id=lambda: "n1")))
    host = cluster.AgentHost()
    prog = ("import os; p = os.environ['LLMAGENTOS_CA']; "
            "print(p, open(p).read() == open(p).read() == 'PEM')")
    host.start([sys.executable, "-c", prog], {paths.ENV_SOCKET: "tls://127.0.0.1:1"},
               cluster.seal("tok", host.public_key()), b"PEM")
    assert list(tmp_path.iterdir()) == []  # nothing named, even while it runs
    rc, out = host.wait()
    where, same = out.decode().split()
    assert rc == 0 and where.startswith("/dev/fd/") and same == "True"  # read twice


def test_the_token_crosses_ray_sealed_to_its_host():
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from llmagentos.kernel.cluster import AgentHost, seal, unseal

    host, other = AgentHost(), X25519PrivateKey.generate()
    token = "t0k3n-" + "x" * 40
    sealed = seal(token, host.public_key())
    assert not any(token.encode() in part or b"x" * 40 in part for part in sealed)
    assert unseal(host._key, sealed) == token
    assert seal(token, host.public_key()) != sealed  # a fresh key and nonce each time
    with pytest.raises(InvalidTag):  # only the host that asked can open it
        unseal(other, sealed)
    eph, nonce, box = sealed
    with pytest.raises(InvalidTag):  # and nobody can alter it on the way
        unseal(host._key, (eph, nonce, box[:-1] + bytes([box[-1] ^ 1])))
