"""The exec driver: real subprocesses, real rlimits, real namespaces.

Each test states what a run may use and shows the limit biting. Tests of an
isolation feature run only where that level is what this machine gives
(``probe_isolation``); the limits are also tested at the weaker levels,
forced, so the fallbacks are not dead code.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import boot_kernel, containment_levels

from llmagentos.drivers.execbox import (
    NOBODY,
    ExecLimits,
    Isolation,
    probe_isolation,
    run_code,
)
from llmagentos.syscalls.errno import SyscallError

ISO = probe_isolation()
CONTAINER = ISO.level == "container"
DROPS_UID = ISO.level in ("container", "uid")
needs_container = pytest.mark.skipif(not CONTAINER, reason=f"isolation is {ISO.level}: "
                                                           f"{ISO.reason}")
needs_uid = pytest.mark.skipif(not DROPS_UID, reason="not root: the code runs as our own uid")

FAST = ExecLimits(cpu_s=5, wall_s=10)


def processes_of(uid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    out.append(int(entry))
            except FileNotFoundError:
                pass
    return out


def wait_gone(pred, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture
def box(tmp_path) -> Path:
    d = tmp_path / "box"
    d.mkdir()
    return d


def test_this_machine_gets_the_strongest_level_that_works():
    assert ISO.level in ("container", "uid", "rlimits")
    if os.geteuid() == 0 and ISO.level != "container":
        pytest.skip(f"namespaces unavailable here: {ISO.reason}")
    if os.geteuid() == 0:
        assert ISO.level == "container", ISO.reason


def test_python_and_shell_run(box):
    r = run_code("python", "print(6 * 7)", box, FAST)
    assert (r.exit_code, r.signal, r.stdout, r.timed_out, r.truncated) == (0, None, "42\n",
                                                                           False, False)
    assert r.isolation == ISO.level
    r = run_code("sh", "echo out; echo err >&2; exit 3", box, FAST)
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_bad_requests():
    with pytest.raises(SyscallError) as e:
        run_code("ruby", "puts 1", Path("/"), FAST)
    assert e.value.name == "EINVAL"
    with pytest.raises(SyscallError) as e:
        run_code("sh", "echo \0", Path("/"), FAST)
    assert e.value.name == "EINVAL"
    with pytest.raises(SyscallError) as e:
        run_code("sh", "#" * 200_000, Path("/"), FAST)
    assert e.value.name == "E2BIG"
    with pytest.raises(SyscallError) as e:
        run_code("sh", "true", Path("/nonexistent/scratch"), FAST)
    assert e.value.name == "ENOENT"
    for bad in (ExecLimits(cpu_s=0), ExecLimits(wall_s=-1), ExecLimits(nproc=True)):
        with pytest.raises(SyscallError) as e:
            run_code("sh", "true", Path("/"), bad)
        assert e.value.name == "EINVAL"


def test_shell_code_starting_with_a_dash_is_code(box):
    r = run_code("sh", "-v", box, FAST)
    assert r.exit_code == 127 and "not found" in r.stderr


def test_infinite_loop_stopped_by_cpu_limit(box):
    r = run_code("python", "while True: pass", box, ExecLimits(cpu_s=1, wall_s=15))
    assert r.signal in (signal.SIGXCPU, signal.SIGKILL), r
    assert not r.timed_out
    assert r.wall_s < 6


def test_memory_bomb_stopped_by_address_space_limit(box):
    limits = ExecLimits(memory_bytes=256 * 1024 * 1024, wall_s=15)
    r = run_code("python", "x = bytearray(4 * 1024 ** 3)", box, limits)
    assert r.exit_code == 1 and "MemoryError" in r.stderr, r
    r = run_code("python", "l = []\nwhile True: l.append(bytearray(10 ** 7))", box, limits)
    assert r.exit_code == 1 and "MemoryError" in r.stderr, r
    assert r.wall_s < 10


@needs_uid
def test_fork_bomb_stopped_by_process_limit(box):
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 10000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e.errno)\n"
    )
    before = set(processes_of(NOBODY))
    r = run_code("python", code, box, ExecLimits(nproc=16, wall_s=15))
    forks, err = map(int, r.stdout.split())
    assert err == 11 and forks < 16, r  # EAGAIN long before 10000
    # Every sleeping child died with the run: nothing new of that uid is left.
    assert wait_gone(lambda: set(processes_of(NOBODY)) <= before), processes_of(NOBODY)


@needs_uid
def test_shell_fork_bomb_is_bounded_and_cleaned_up(box):
    before = set(processes_of(NOBODY))
    start = time.monotonic()
    r = run_code("sh", "b() { b | b & }; b; sleep 5", box, ExecLimits(nproc=24, wall_s=1.5))
    assert time.monotonic() - start < 6
    assert r.timed_out or r.exit_code is not None
    assert "Cannot fork" in r.stderr  # the limit bit
    assert wait_gone(lambda: set(processes_of(NOBODY)) <= before), processes_of(NOBODY)
    # And the machine is fine: the next run works at once.
    assert run_code("sh", "echo alive", box, FAST).stdout == "alive\n"


def test_huge_output_capped(box):
    start = time.monotonic()
    r = run_code("sh", "yes spam", box, ExecLimits(output_bytes=10_000, wall_s=10))
    assert r.truncated and not r.timed_out
    assert len(r.stdout) + len(r.stderr) == 10_000
    assert r.stdout.startswith("spam\nspam\n")
    assert time.monotonic() - start < 5
    r = run_code("python", "import sys\nfor _ in range(10**6): sys.stderr.write('e' * 100)",
                 box, ExecLimits(output_bytes=5_000, wall_s=10))
    assert r.truncated and len(r.stderr) == 5_000
    r = run_code("sh", "printf 12345", box, ExecLimits(output_bytes=5))
    assert r.stdout == "12345" and not r.truncated  # exactly at the cap is not over it


def test_wall_clock_timeout_kills_sleep(box):
    r = run_code("sh", "echo before; sleep 30; echo after", box, ExecLimits(wall_s=0.5))
    assert r.timed_out and r.signal == signal.SIGKILL and r.exit_code is None
    assert r.stdout == "before\n"
    assert r.wall_s < 3


def test_background_child_does_not_outlive_the_run(box):
    start = time.monotonic()
    r = run_code("sh", "sleep 32.3 & (setsid sleep 31.7 &); echo started", box, FAST)
    assert r.stdout == "started\n"
    assert time.monotonic() - start < 3  # not held until the wall clock by the child

    def none_left() -> bool:
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
                continue
            if cmdline in (b"sleep\x0032.3\x00", b"sleep\x0031.7\x00"):
                return False
        return True

    if CONTAINER:  # the pid namespace dies with its init, setsid or not
        assert wait_gone(none_left)


def test_environment_scrubbed(box, monkeypatch):
    monkeypatch.setenv("LLMAGENTOS_TEST_SECRET", "hunter2")
    monkeypatch.setenv("LLMAGENTOS_TOKEN", "kernel-token")
    r = run_code("python", "import json, os; print(json.dumps(dict(os.environ)))", box, FAST)
    env = json.loads(r.stdout)
    assert set(env) == {"PATH", "HOME", "LANG", "TMPDIR"}
    assert env["HOME"] == env["TMPDIR"]
    assert "hunter2" not in r.stdout and "kernel-token" not in r.stdout
    r = run_code("sh", "env", box, FAST)
    assert "hunter2" not in r.stdout and "LLMAGENTOS" not in r.stdout


def test_files_written_land_in_the_scratch_dir(box):
    (box / "input.txt").write_text("from the kernel")  # root-owned, as Sandbox writes it
    r = run_code("python", "import os\n"
                           "open('out.txt', 'w').write(open('input.txt').read().upper())\n"
                           "open('input.txt', 'a').write('!')\n"
                           "os.mkdir('sub'); open('sub/x', 'w').write('x')\n", box, FAST)
    assert r.exit_code == 0, r
    assert (box / "out.txt").read_text() == "FROM THE KERNEL"
    assert (box / "input.txt").read_text() == "from the kernel!"
    assert (box / "sub" / "x").read_text() == "x"


def test_limits_nofile_and_fsize(box):
    r = run_code("python", "fs = [open('f%d' % i, 'w') for i in range(100)]", box,
                 ExecLimits(nofile=20, wall_s=10))
    assert r.exit_code == 1 and "Too many open files" in r.stderr
    r = run_code("python", "open('big', 'wb').write(b'x' * 3_000_000)", box,
                 ExecLimits(fsize_bytes=1_000_000, wall_s=10))
    assert r.exit_code == 1 and "File too large" in r.stderr
    assert (box / "big").stat().st_size <= 1_000_000


@needs_uid
def test_runs_unprivileged(box):
    r = run_code("python", "import os; print(os.getuid(), os.getgid(), os.getgroups())", box,
                 FAST)
    assert r.stdout.split(maxsplit=2) == [str(NOBODY), str(NOBODY), "[]\n"] or \
        r.stdout == f"{NOBODY} {NOBODY} []\n"
    r = run_code("sh", "cat /etc/shadow", box, FAST)
    assert r.exit_code != 0 and "Permission denied" in r.stderr


@needs_uid
def test_hand_over_never_touches_files_outside(box, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("root's")
    os.link(outside, box / "hardlink")
    os.symlink(outside, box / "symlink")
    run_code("sh", "true", box, FAST)
    st = outside.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert outside.read_text() == "root's"


@needs_container
def test_container_sees_no_host_files(box, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    os.chmod(secret, 0o644)  # world-readable: only the container keeps it out
    code = (
        "import os\n"
        f"print(os.path.exists({str(secret)!r}), os.path.exists({str(Path.cwd())!r}))\n"
        "print(sorted(os.listdir('/')))\n"
        "print(os.getcwd(), os.getpid())\n"
    )
    r = run_code("python", code, box, FAST)
    lines = r.stdout.splitlines()
    assert lines[0] == "False False", r
    assert "root" not in lines[1] and "work" not in lines[1] and "home" not in lines[1]
    assert lines[2] == "/sandbox 2"  # pid 2 of its own pid namespace


@needs_container
def test_container_cannot_write_outside_the_scratch_dir(box):
    code = (
        "import os\n"
        "for p in ['/x', '/usr/x', '/etc/x', '/dev/x', '/proc/x', '/sandbox/../x',"
        " '/dev/shm/x', '/var/tmp/x']:\n"
        "    try:\n"
        "        open(p, 'w').write('x'); print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('refused', p, e.errno)\n"
        "open('/tmp/t.txt', 'w').write('tmp is the scratch dir')\n"
        "open('/dev/null', 'w').write('devices still work')\n"
    )
    r = run_code("python", code, box, FAST)
    assert r.exit_code == 0, r
    assert "WROTE" not in r.stdout and r.stdout.count("refused") == 8
    assert (box / "t.txt").read_text() == "tmp is the scratch dir"


@needs_container
def test_container_has_no_network(box):
    code = (
        "import socket, time\n"
        "t = time.monotonic()\n"
        "for addr in [('1.1.1.1', 53), ('127.0.0.1', 22)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=2); print('CONNECTED')\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
        "print(time.monotonic() - t < 1)\n"
    )
    r = run_code("python", code, box, FAST)
    assert "CONNECTED" not in r.stdout and r.stdout.endswith("True\n"), r


@needs_container
def test_container_cannot_see_or_signal_host_processes(box):
    r = run_code("sh", f"ls /proc | grep -c '^[0-9]'; kill -0 {os.getpid()} && echo SEEN",
                 box, FAST)
    count = int(r.stdout.split()[0])
    assert count <= 4 and "SEEN" not in r.stdout, r


def test_forced_weaker_levels_still_limit(box):
    """The fallbacks (no namespaces; not root) keep the rlimits, the timeout,
    the output cap and the scrubbed environment."""
    python = ISO.python
    levels = ["rlimits"] + (["uid"] if os.geteuid() == 0 else [])
    for level in levels:
        iso = Isolation(level, python)
        r = run_code("python", "import os; print(sorted(os.environ))", box, FAST, isolation=iso)
        assert r.stdout == "['HOME', 'LANG', 'PATH', 'TMPDIR']\n" and r.isolation == level
        r = run_code("python", "while True: pass", box, ExecLimits(cpu_s=1, wall_s=10),
                     isolation=iso)
        assert r.signal == signal.SIGXCPU, (level, r)
        r = run_code("sh", "sleep 20", box, ExecLimits(wall_s=0.3), isolation=iso)
        assert r.timed_out
        r = run_code("sh", "yes", box, ExecLimits(output_bytes=100), isolation=iso)
        assert r.truncated and len(r.stdout) == 100
        r = run_code("sh", "id -u", box, FAST, isolation=iso)
        assert r.stdout.strip() == str(NOBODY if level == "uid" else os.geteuid())


# --- user namespaces, disk quota, cancellation (run_code) ---------------------

USERNS_CODE = """
import ctypes, os, platform, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
print("unshare", libc.unshare(0x10000000), ctypes.get_errno())
nr = {"x86_64": 56, "aarch64": 220}[platform.machine()]
r = libc.syscall(nr, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
if r == 0:
    os._exit(0)
print("clone", r, ctypes.get_errno())
if r > 0:
    os.waitpid(r, 0)
p = subprocess.run(["unshare", "-U", "true"], capture_output=True, text=True)
print("unshare-U", p.returncode, p.stderr.strip())
t = threading.Thread(target=print, args=("threads still work",))
t.start(); t.join()
print("fork still works", subprocess.run(["true"]).returncode)
"""


def test_no_user_namespaces_inside_exec(box):
    levels = [ISO] + [Isolation(lv, ISO.python) for lv in ("uid", "rlimits")
                      if lv != ISO.level and (lv == "rlimits" or os.geteuid() == 0)]
    for iso in levels:
        r = run_code("python", USERNS_CODE, box, FAST, isolation=iso)
        out = r.stdout.splitlines()
        assert out[0] == "unshare -1 1", (iso.level, r)  # EPERM
        assert out[1] == "clone -1 1", (iso.level, r)
        assert out[2].startswith("unshare-U 1") and "Operation not permitted" in out[2]
        assert out[3:] == ["threads still work", "fork still works 0"], (iso.level, r)


def test_writing_past_the_disk_quota_stops_the_run(box):
    from llmagentos.drivers.execbox import DiskQuota
    (box / "old.bin").write_bytes(b"o" * 200_000)  # already counted against the quota
    quota = DiskQuota(max_bytes=1_000_000, max_files=100)
    code = ("import time\n"
            "for i in range(200):\n"
            "    open('f%d' % i, 'wb').write(b'x' * 100_000)\n"
            "    time.sleep(0.01)\n"
            "print('all written')\n")
    r = run_code("python", code, box, FAST, disk=quota)
    assert r.errno == "EDQUOT" and r.signal == signal.SIGKILL, r
    assert "all written" not in r.stdout and r.wall_s < 1.5
    assert sum(f.stat().st_size for f in box.iterdir()) < 3_000_000
    # one file can't take more than what is left either (RLIMIT_FSIZE at the room left)
    for f in box.iterdir():
        f.unlink()
    r = run_code("python", "open('big', 'wb').write(b'x' * 3_000_000)", box, FAST, disk=quota)
    assert r.exit_code == 1 and "File too large" in r.stderr, r
    assert (box / "big").stat().st_size <= 1_000_000
    # many empty files: the entry count is a quota too
    r = run_code("sh", "i=0; while [ $i -lt 1000 ]; do : > f$i; i=$((i+1)); sleep 0.002; done",
                 box, FAST, disk=quota)
    assert r.errno == "EDQUOT", r


def test_cancel_kills_the_run_at_once(box):
    import threading
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    start = time.monotonic()
    r = run_code("sh", "sleep 30.77 & sleep 30.78", box, FAST, cancel=cancel)
    assert time.monotonic() - start < 2
    assert r.errno == "ECANCELED" and r.signal == signal.SIGKILL, r
    assert wait_gone(lambda: not _cmdlines_with(b"sleep\x0030.7"))


def _cmdlines_with(needle: bytes) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(int(pid))
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
    return out


# --- exec through the kernel: groups, caps, uids, timeouts ---------------------

def _as_new_process(k, limits=None):
    """A fresh process of the kernel (attached: it lives in this test) and a
    connection speaking as it; ``conn.token`` opens more."""
    with k.client() as c:
        info = c.proc.attach(None, None, limits)
    conn = _connect(k, info["token"])
    conn.token = info["token"]
    return info["pid"], conn


def _connect(k, token):
    import llmagentos
    return llmagentos.connect(run_dir=k.run_dir, token=token)


def _exec(conn, lang, code, timeout=30, call_timeout=60.0):
    return conn.tool.call("exec.run", {"lang": lang, "code": code, "timeout": timeout},
                          call_timeout)


def _in_background(fn, *args):
    import threading
    box_ = {}
    t = threading.Thread(target=lambda: box_.setdefault("r", _catch(fn, *args)), daemon=True)
    t.start()
    return t, box_


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e


def test_tool_timeout_answers_etimedout_and_kills_the_run(shared_kernel):
    import llmagentos
    pid, conn = _as_new_process(shared_kernel)
    with conn:
        start = time.monotonic()
        try:
            r = conn.tool.call("exec.run", {"lang": "sh", "code": "sleep 3.217"}, 1.0)
        except llmagentos.KernelError as e:
            err = e
        else:
            pytest.fail(f"answered after {time.monotonic() - start:.2f}s: {r}")
        took = time.monotonic() - start
        assert err.name == "ETIMEDOUT" and 0.9 < took < 1.5, (err, took)
        assert wait_gone(lambda: not _cmdlines_with(b"sleep\x003.217"), timeout=1.0)
        # and the process can run code again at once
        assert _exec(conn, "sh", "echo again")["stdout"] == "again\n"


def _killed_callers_container_dies(k):
    pid, conn = _as_new_process(k)
    t, res = _in_background(_exec, conn, "sh", "sleep 123.456 & sleep 59.876", 60)
    # both running (the shell may start the foreground sleep before the background one)
    assert wait_gone(lambda: _cmdlines_with(b"sleep\x0059.876")
                     and _cmdlines_with(b"sleep\x00123.456"), timeout=15)
    with k.client() as c:
        start = time.monotonic()
        c.proc.kill(pid, "SIGKILL")
    assert wait_gone(lambda: not _cmdlines_with(b"sleep\x00123.456")
                     and not _cmdlines_with(b"sleep\x0059.876"), timeout=2.0)
    assert time.monotonic() - start < 2.0
    t.join(10)
    assert not t.is_alive()
    conn.close()


def test_a_killed_callers_container_dies_at_once(shared_kernel):
    _killed_callers_container_dies(shared_kernel)


@pytest.mark.parametrize("level", containment_levels()[1])
def test_a_killed_callers_container_dies_at_the_weaker_levels(tmp_path, level):
    k = boot_kernel(tmp_path, "--containment", level)
    try:
        _killed_callers_container_dies(k)
    finally:
        k.stop()


def test_the_runs_processes_are_in_its_group(box):
    """The group is joined before the code starts, at every isolation level
    (as root, before the uid drop)."""
    from llmagentos.kernel.cgroups import Containment
    c = Containment.probe("llmagentos-testrun")
    try:
        if c.level == "subreaper":
            pytest.skip("no cgroups here: nothing to join")
        levels = [ISO] + [Isolation(lv, ISO.python) for lv in ("uid", "rlimits")
                          if lv != ISO.level and (lv == "rlimits" or os.geteuid() == 0)]
        for i, iso in enumerate(levels):
            g = c.create(f"r{i}")
            r = run_code("sh", "cat /proc/self/cgroup; (sleep 0 &); echo done", box, FAST,
                         isolation=iso, group=g)
            assert r.stdout.endswith("done\n"), (iso.level, r)
            mine = [ln for ln in r.stdout.splitlines() if ln.endswith(f"/{c.name}/r{i}")]
            assert len(mine) == len(c.bases), (iso.level, r.stdout)
            assert not g.pids()  # and nothing is left in it
            g.remove()
    finally:
        c.close()


def _containment(k) -> dict:
    with k.client() as c:
        return c.sys.uname()["containment"]


def _sandbox_root(k, pid) -> Path:
    from llmagentos.kernel.names import path_name
    return k.state_dir / "fs" / path_name(f"pid:{pid}")


def test_exec_memory_is_capped_across_a_processs_runs(shared_kernel):
    import llmagentos
    if "memory" not in _containment(shared_kernel)["controllers"]:
        pytest.skip("no cgroup memory controller here: exec has no aggregate memory cap")
    mb = 1024 * 1024
    pid_a, a1 = _as_new_process(shared_kernel, {"exec_memory": 300 * mb})
    hold = ("import os, time\n"
            f"x = b'1' * {100 * mb}\n"
            "open('holding', 'w').close()\n"
            "time.sleep(6)\n"
            "print('held')\n")
    t, res = _in_background(_exec, a1, "python", hold)
    assert wait_gone(lambda: (_sandbox_root(shared_kernel, pid_a) / "holding").exists(),
                     timeout=15)
    grab = f"x = b'1' * {250 * mb}\nprint('fit')\n"
    a2 = _connect(shared_kernel, a1.token)  # a second, concurrent run of the same process
    r = _exec(a2, "python", grab)
    # 100 MB held + 250 MB asked > 300 MB for all of pid A's runs: this run dies
    assert r["signal"] == signal.SIGKILL and r["errno"] == "ENOMEM" and "fit" not in r["stdout"], r
    # another process's runs are not A's business: the same 250 MB fits at once
    pid_b, b = _as_new_process(shared_kernel)
    with b:
        r = _exec(b, "python", grab)
    assert r["exit_code"] == 0 and r["stdout"] == "fit\n" and r["errno"] is None, r
    t.join(15)
    assert res["r"]["stdout"] == "held\n", res  # the holder was not the one killed
    a2.close()
    a1.close()
    # a cap too small to hold even a run's cgroup: ENOMEM, not a process that "exited"
    pid_c, tiny = _as_new_process(shared_kernel, {"exec_memory": 4096})
    with tiny, pytest.raises(llmagentos.KernelError) as e:
        _exec(tiny, "sh", "true")
    assert e.value.name == "ENOMEM", e.value


def test_exec_run_stops_at_the_processs_disk_quota(shared_kernel):
    pid, conn = _as_new_process(shared_kernel, {"fs_bytes": 1_000_000})
    code = ("import time\n"
            "for i in range(100):\n"
            "    open('f%d' % i, 'wb').write(b'x' * 100_000)\n"
            "    time.sleep(0.01)\n")
    with conn:
        r = _exec(conn, "python", code)
        assert r["errno"] == "EDQUOT" and r["signal"] == signal.SIGKILL, r
        assert conn.fs.usage()["bytes"] < 3_000_000


def test_exec_runs_of_two_processes_use_their_own_uids(shared_kernel):
    from llmagentos.drivers.execbox import exec_uid
    if not DROPS_UID:
        pytest.skip("not root: the code runs as our own uid")
    pid_a, a = _as_new_process(shared_kernel)
    pid_b, b = _as_new_process(shared_kernel)
    with a, b:
        assert _exec(a, "sh", "id -u")["stdout"] == f"{exec_uid(pid_a)}\n"
        assert _exec(b, "sh", "id -u")["stdout"] == f"{exec_uid(pid_b)}\n"
        # A uses up its RLIMIT_NPROC and holds it...
        bomb = ("import os, time\n"
                "n = 0\n"
                "try:\n"
                "    while n < 500:\n"
                "        if os.fork() == 0:\n"
                "            time.sleep(30)\n"
                "            os._exit(0)\n"
                "        n += 1\n"
                "except OSError as e:\n"
                "    print(n, e.errno, flush=True)\n"
                "open('full', 'w').close()\n"
                "time.sleep(5)\n")
        t, res = _in_background(_exec, a, "python", bomb)
        wait_gone(lambda: (_sandbox_root(shared_kernel, pid_a) / "full").exists(), timeout=20)
        # ...and B can still fork: its count is its own
        r = _exec(b, "sh", "sleep 0 & wait $!; echo forked")
        assert r["stdout"] == "forked\n" and "fork" not in r["stderr"], r
        t.join(20)
        forks, err = map(int, res["r"]["stdout"].split())
        assert err == 11 and forks < 100, res  # EAGAIN: A's own limit did bite
