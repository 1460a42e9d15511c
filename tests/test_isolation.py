"""A spawned process gets exactly its own rights, below the syscall layer too.

The attack from the hardening issue: a child spawned with caps=[] ran as the
kernel's uid, read the shell token file in the run dir, said sys.hello as pid 1
and SIGKILLed another agent; it could also read any agent's token from
/proc/<pid>/environ. Each step is tried here from inside a spawned process.
"""

from __future__ import annotations

import json
import os
import textwrap

import psutil
import pytest
from conftest import PY, boot_kernel, token_of

ATTACK = textwrap.dedent("""
    import json, os, signal, socket, sys
    import msgpack
    run_dir, state_dir, victim_os_pid, stolen, signals = sys.argv[1:6]
    out = {}

    def attempt(name, fn):
        try:
            out[name] = ["ok", fn()]
        except Exception as e:
            out[name] = ["refused", type(e).__name__]

    def read(path):
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")

    def hello(token):
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.environ["LLMAGENTOS_SOCKET"])
        s.sendall(msgpack.packb([0, 1, "sys.hello", [token]]))
        u = msgpack.Unpacker()
        while True:
            msg = next(u, None)
            if msg is not None:
                break
            u.feed(s.recv(65536))
        if msg[2] is not None:
            raise PermissionError(msg[2]["name"])
        return msg[3]["pid"]

    attempt("token_file", lambda: read(os.path.join(run_dir, "token")).strip() or None)
    attempt("list_run_dir", lambda: sorted(os.listdir(run_dir)))
    attempt("state_dir", lambda: sorted(os.listdir(state_dir)))
    attempt("memory_db", lambda: len(read(os.path.join(state_dir, "memory.db"))))
    attempt("victim_environ", lambda: "LLMAGENTOS_TOKEN=" in read(f"/proc/{victim_os_pid}/environ"))
    fd = "?"
    try:
        fd = dict(l.split("=", 1) for l in read(f"/proc/{victim_os_pid}/environ").split("\\0")
                  if "=" in l).get("LLMAGENTOS_TOKEN_FD", "?")
    except Exception:
        pass
    attempt("victim_token_fd", lambda: read(f"/proc/{victim_os_pid}/fd/{fd}"))
    attempt("kernel_environ", lambda: len(read(f"/proc/{os.getppid()}/environ")))
    attempt("hello_as_init", lambda: hello(stolen))
    if signals == "yes":  # at level "none" nothing stops these: not tried there
        attempt("kill_victim", lambda: os.kill(int(victim_os_pid), signal.SIGKILL))
        attempt("kill_kernel", lambda: os.kill(os.getppid(), signal.SIGSTOP))
    own_fd = int(os.environ["LLMAGENTOS_TOKEN_FD"])
    attempt("own_hello", lambda: hello(os.pread(own_fd, 4096, 0).decode()))
    attempt("token_in_env", lambda: "LLMAGENTOS_TOKEN" in os.environ or None)
    print("RESULT " + json.dumps(out), flush=True)
""")


def _attack(k, signals: bool) -> dict:
    with k.client() as c:
        victim = c.proc.spawn(["sleep", "60"], "victim")
        victim_os = c.proc.stat(victim)["os_pid"]
        pid = c.proc.spawn([PY, "-c", ATTACK, str(k.run_dir), str(k.state_dir), str(victim_os),
                            k.token, "yes" if signals else "no"], None, None, None, [])
        c.proc.wait(pid, 30)
        log = c.proc.logs(pid)["data"].decode()
        line = next((ln for ln in log.splitlines() if ln.startswith("RESULT ")), None)
        assert line, log
        out = json.loads(line[len("RESULT "):])
        # The victim lives, and the kernel answers.
        assert c.proc.stat(victim)["state"] in ("READY", "RUNNING")
        assert psutil.Process(k.proc.pid).status() != psutil.STATUS_STOPPED
        c.proc.kill(victim, "KILL")
        return {**out, "own_pid": pid}


def _refused(out: dict, name: str) -> bool:
    status, value = out[name]
    return status == "refused" or not value


@pytest.fixture(scope="module")
def iso_kernel(tmp_path_factory):
    k = boot_kernel(tmp_path_factory.mktemp("iso"))
    yield k
    k.stop()


def test_level_is_reported(iso_kernel):
    with iso_kernel.client() as c:
        iso = c.sys.uname()["isolation"]
    assert iso["level"] in ("namespace", "landlock", "none")
    if os.geteuid() == 0:
        assert iso["level"] == "namespace"  # root can always hide the kernel's files


def test_spawned_child_cannot_take_the_shells_rights(iso_kernel):
    out = _attack(iso_kernel, True)
    # Its own identity works, and nothing of it is in the environment.
    assert out["own_hello"] == ["ok", out["own_pid"]]
    assert _refused(out, "token_in_env")
    # A token taken from anywhere is useless: the kernel binds it to its process.
    assert out["hello_as_init"][0] == "refused"
    assert _refused(out, "victim_environ")
    with iso_kernel.client() as c:
        level = c.sys.uname()["isolation"]
    if level["level"] == "namespace":
        assert _refused(out, "token_file"), out["token_file"]
        assert _refused(out, "state_dir") and _refused(out, "memory_db")
    if level["landlock_abi"] >= 1 and level["level"] != "none":
        assert _refused(out, "victim_token_fd"), out["victim_token_fd"]
        assert _refused(out, "kernel_environ")
    if level["landlock_abi"] >= 6 and level["level"] != "none":
        assert out["kill_victim"][0] == "refused" and out["kill_kernel"][0] == "refused"


@pytest.mark.parametrize("level", ["landlock", "none"])
def test_a_stolen_token_is_refused_at_every_level(tmp_path, level):
    k = boot_kernel(tmp_path, "--isolation", level)
    try:
        out = _attack(k, level != "none")
        assert out["hello_as_init"][0] == "refused"
        assert out["own_hello"] == ["ok", out["own_pid"]]
        if level == "landlock":
            assert _refused(out, "victim_token_fd") and _refused(out, "kernel_environ")
            assert out["kill_victim"][0] == "refused"
    finally:
        k.stop()


def test_the_shell_user_still_presents_any_token(iso_kernel):
    """The shell user's own programs (not started by the kernel) are trusted:
    they may speak as any process, as `llmos` does."""
    with iso_kernel.client() as c:
        child = c.proc.spawn(["sleep", "30"])
        token = token_of(c, child)
        import llmagentos
        with llmagentos.connect(token=token, run_dir=iso_kernel.run_dir) as cc:
            assert cc.proc.getpid() == child
        c.proc.kill(child, "KILL")


def test_launch_failure_is_a_spawn_error(iso_kernel):
    with iso_kernel.client() as c:
        with pytest.raises(FileNotFoundError):
            c.proc.spawn(["/no/such/program"])
        with pytest.raises(PermissionError):
            c.proc.spawn([str(iso_kernel.run_dir)])  # a directory
