"""Signals with meaning: SIGINT, SIGUSR1 and SIGUSR2 with a payload reach a
process that talks to the kernel as a proc.signal notification, to the
client's on_signal handlers; the sender's pid is the kernel's word."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import PY, boot_kernel

import llmagentos

# Registers a SIGUSR1 handler under trio, says "ready" on its stdout (a pipe
# to its parent), and prints what the handler received.
CHILD = """
import json, trio, llmagentos

async def main():
    async with llmagentos.aconnect() as c:
        got, seen = trio.Event(), []

        async def on_usr1(sig, payload, sender):
            seen.append([sig, payload, sender])
            got.set()
        c.on_signal("SIGUSR1", on_usr1)
        print("ready", flush=True)
        await got.wait()
        print(json.dumps(seen[0]), flush=True)

trio.run(main)
"""
# Spawns CHILD with a pipe for its stdout, waits for "ready", signals it
# with a payload, then reports what came back.
PARENT = f"""
import json, sys, llmagentos
c = llmagentos.connect()
p = c.ipc.pipe()
kid = c.proc.spawn([sys.executable, "-c", {CHILD!r}], stdout=p["write"])
c.fs.close(p["write"])
out = b""
while b"ready" not in out:
    out += c.fs.read(p["read"], 100)
c.proc.kill(kid, "SIGUSR1", {{"job": [1, 2], "note": "wake up"}})
while chunk := c.fs.read(p["read"], 4096):
    out += chunk
print(json.dumps({{"me": c.pid, "kid": kid, "got": out.decode().split()[1:]}}))
c.proc.wait(kid, 20)
"""


def test_sigusr1_with_payload_reaches_the_handler_with_the_senders_pid(shared_kernel):
    with shared_kernel.client() as c:
        parent = c.proc.spawn([PY, "-c", PARENT])
        assert c.proc.wait(parent, 30)["exit_code"] == 0, c.proc.logs(parent)["data"]
        report = json.loads(c.proc.logs(parent)["data"])
        sig, payload, sender = json.loads(" ".join(report["got"]))
        assert (sig, payload) == (10, {"job": [1, 2], "note": "wake up"})
        assert sender == report["me"] != c.pid  # the parent, not init


def test_the_sender_cannot_forge_its_pid_nor_signal_outside_its_tree(shared_kernel):
    with shared_kernel.client() as c:
        a, b = c.proc.attach(), c.proc.attach()
        with llmagentos.connect(run_dir=shared_kernel.run_dir, token=a["token"]) as ca:
            seen = []
            ca.on_signal("USR2", lambda *args: seen.append(list(args)))
            for forged in (lambda: ca.call("proc.kill", a["pid"], "SIGUSR2", "x", 1),
                           lambda: ca.call("proc.kill", a["pid"], "SIGUSR2", "x", sender=1)):
                with pytest.raises(llmagentos.KernelError) as e:
                    forged()
                assert e.value.name == "EINVAL"
            ca.proc.kill(a["pid"], "SIGUSR2", "to myself")  # own tree: fine
            assert seen == [[12, "to myself", a["pid"]]]
            with pytest.raises(llmagentos.KernelError) as e:
                ca.proc.kill(b["pid"], "SIGUSR1", "to my sibling")
            assert e.value.name == "EPERM"
            c.proc.kill(a["pid"], "SIGUSR1", None)  # no handler: ignored, not fatal
            assert ca.proc.getpid() == a["pid"]


def test_payload_rules_and_a_process_without_a_connection(shared_kernel):
    with shared_kernel.client() as c:
        sleeper = c.proc.spawn(["sleep", "30"])
        for sig, payload, errno in (("SIGTERM", "x", "EINVAL"), ("SIGKILL", 0, "EINVAL"),
                                    ("SIGUSR1", "x" * (64 * 1024 + 1), "E2BIG")):
            with pytest.raises(llmagentos.KernelError) as e:
                c.proc.kill(sleeper, sig, payload)
            assert e.value.name == errno
        assert c.proc.stat(sleeper)["state"] != "ZOMBIE"  # nothing was sent
        # No connection: the OS signal, as ever (its default action ends it).
        c.proc.kill(sleeper, "SIGUSR1", {"lost": True})
        assert c.proc.wait(sleeper, 10)["signal_name"] == "SIGUSR1"


def test_a_process_that_does_not_read_its_signals_is_eagain(shared_kernel):
    with shared_kernel.client() as c:
        a = c.proc.attach()
        with llmagentos.connect(run_dir=shared_kernel.run_dir, token=a["token"]) as ca:
            assert ca.proc.getpid() == a["pid"]  # then never reads again
            big = "s" * (60 * 1024)
            for n in range(1000):
                try:
                    c.proc.kill(a["pid"], "SIGUSR1", big)
                except llmagentos.KernelError as e:
                    assert e.name == "EAGAIN"
                    break
            else:
                pytest.fail("the kernel queued 60 MB of signals for a reader that never reads")
            assert n * len(big) < 32 << 20
            assert c.sys.null() is None


def test_sigint_stops_the_generation_under_way(tmp_path):
    conf = tmp_path / "kernel.toml"
    conf.write_text('[models.sim-slow]\nkind = "sim"\ndecode_ms = 20\n')
    k = boot_kernel(tmp_path, "--config", str(conf), "--slots", "2", "--n-ctx", "4096",
                    model="sim-slow")
    try:
        with k.client() as c:
            a = c.proc.attach()
            ca = llmagentos.connect(run_dir=k.run_dir, token=a["token"])
            heard, result = [], {}

            def generate():  # 3000 tokens at 20 ms: a minute, unless stopped
                try:
                    result["ok"] = ca.llm.generate("tell a long story", None,
                                                   {"max_tokens": 3000})
                except llmagentos.KernelError as e:
                    result["errno"] = e.name
            ca.on_signal("SIGINT", lambda *args: heard.append(list(args)))
            t = threading.Thread(target=generate)
            t.start()
            for _ in range(200):  # until it is on the device
                if c.proc.stat(a["pid"])["state"] == "WAITING":
                    break
                t.join(0.05)
            c.proc.kill(a["pid"], "SIGINT", "stop")
            t.join(20)
            assert not t.is_alive() and result == {"errno": "EINTR"}
            assert heard == [[2, "stop", 1]]
            assert c.proc.stat(a["pid"])["state"] != "ZOMBIE"  # interrupted, not ended
            res = ca.llm.generate("again", None, {"max_tokens": 3})
            assert res["usage"]["completion_tokens"] == 3
            ca.close()
    finally:
        k.stop()


def test_the_readme_section_runs_as_written(shared_kernel, tmp_path):
    import re
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Pipes and signals", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(python|sh)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["python", "sh", "python"]
    env = shared_kernel.env()
    env["PATH"] = f"{Path(PY).parent}:{env['PATH']}"  # llmos and python3 of this venv
    outs = []
    for lang, code in blocks:
        cmd = [PY, "-c", code] if lang == "python" else ["bash", "-c", code]
        r = subprocess.run(cmd, env=env, capture_output=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 0, r.stderr.decode()
        outs.append(r.stdout.decode())
    assert outs[0] == "HELLO FROM A PIPE\n"
    assert outs[1].split() == ["A", "B", "C"]
    assert re.fullmatch(r"SIGUSR1 from pid 1 with \{'job': 7\}\n", outs[2])


def test_a_sync_handler_may_make_calls_and_runs_once_the_call_returns(shared_kernel):
    with shared_kernel.client() as c:
        a = c.proc.attach()
        with llmagentos.connect(run_dir=shared_kernel.run_dir, token=a["token"],
                                timeout=10) as ca:
            ran = []
            ca.on_signal("USR1", lambda sig, payload, sender: ran.append(
                (payload, ca.proc.getpid())))  # a call from inside the handler
            c.proc.kill(a["pid"], "SIGUSR1", "first")
            c.proc.kill(a["pid"], "SIGUSR1", "second")
            assert ran == []  # nothing runs between calls
            assert ca.sys.null() is None  # the interrupted call still gets its answer
            assert ran == [("first", a["pid"]), ("second", a["pid"])]
