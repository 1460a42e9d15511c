"""Kill means the whole tree: a process's double-forked and setsid descendants
die with it (SIGKILL, wall time, any exit, kernel shutdown), at every
containment level this machine offers (kernel/cgroups.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import PY, boot_kernel, containment_levels, probe_name, wait_for

from llmagentos.kernel.cgroups import Containment, kernel_name

AUTO_LEVEL, FORCED = containment_levels()  # FORCED: the weaker levels this machine has
LEVEL_PARAMS = ["auto", *FORCED]


def double_fork(pidfile: Path, *, exit_after: bool = False) -> list[str]:
    """A program whose grandchild leaves: fork, setsid, fork again, the middle
    process exits; the grandchild writes its pid and sleeps."""
    return [PY, "-c", textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                with open({str(pidfile)!r} + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename({str(pidfile)!r} + ".tmp", {str(pidfile)!r})
                time.sleep(120)
            os._exit(0)
        os.wait()
        while not os.path.exists({str(pidfile)!r}):
            time.sleep(0.01)
        if {exit_after!r}:
            raise SystemExit(0)
        time.sleep(120)
    """)]


def alive(pid: int) -> bool:
    """Running or stopped (a zombie has died; only its parent has not waited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def grandchild(pidfile: Path) -> int:
    return int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=15))


def extra(level: str) -> list[str]:
    return [] if level == "auto" else ["--containment", level]


@pytest.fixture(params=LEVEL_PARAMS)
def level(request):
    return request.param


@pytest.fixture
def leftovers():
    """Grandchildren a failing test would leave: killed afterwards whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkill_kills_a_double_forked_setsid_grandchild(tmp_path, level, leftovers):
    k = boot_kernel(tmp_path, *extra(level))
    try:
        with k.client() as c:
            assert c.sys.uname()["containment"]["level"] == \
                (AUTO_LEVEL if level == "auto" else level)
            pid = c.proc.spawn(double_fork(tmp_path / "gc.pid"), "forker")
            gc = grandchild(tmp_path / "gc.pid")
            leftovers.append(gc)
            os_pid = c.proc.stat(pid)["os_pid"]
            assert os.getsid(gc) != os.getsid(os_pid)  # another session
            time.sleep(0.3)  # well past the point where it has left its parent
            c.proc.kill(pid, "SIGKILL")
            assert c.proc.wait(pid, 10)["signal_name"] == "SIGKILL"
            wait_for(lambda: not alive(gc), timeout=5)
    finally:
        k.stop()


def test_kernel_shutdown_kills_a_grandchild(tmp_path, level, leftovers):
    k = boot_kernel(tmp_path, *extra(level))
    try:
        with k.client() as c:
            c.proc.spawn(double_fork(tmp_path / "gc.pid"), "forker")
            gc = grandchild(tmp_path / "gc.pid")
            leftovers.append(gc)
    finally:
        assert k.stop() == 0
    wait_for(lambda: not alive(gc), timeout=5)


def test_exit_and_wall_time_take_the_tree_along(shared_kernel, tmp_path, leftovers):
    with shared_kernel.client() as c:
        # a process that exits normally leaves nothing running behind it
        pid = c.proc.spawn(double_fork(tmp_path / "a.pid", exit_after=True), "leaver")
        gc = grandchild(tmp_path / "a.pid")
        leftovers.append(gc)
        assert c.proc.wait(pid, 15)["exit_code"] == 0
        wait_for(lambda: not alive(gc), timeout=5)
        # nor does one killed for its wall time
        pid = c.proc.spawn(double_fork(tmp_path / "b.pid"), "slow", None, None, None,
                           {"wall_time": 2})
        gc = grandchild(tmp_path / "b.pid")
        leftovers.append(gc)
        st = c.proc.wait(pid, 15)
        assert st["signal_name"] == "SIGKILL" and "wall time" in st["reason"]
        wait_for(lambda: not alive(gc), timeout=5)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_stop_and_cont_reach_the_whole_group(shared_kernel, tmp_path, leftovers):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(double_fork(tmp_path / "gc.pid"), "forker")
        gc = grandchild(tmp_path / "gc.pid")
        leftovers.append(gc)
        c.proc.kill(pid, "SIGSTOP")
        wait_for(lambda: _state(gc) == "T", timeout=5)
        c.proc.kill(pid, "SIGCONT")
        wait_for(lambda: _state(gc) == "S", timeout=5)
        c.proc.kill(pid, "SIGTERM")
        c.proc.wait(pid, 10)
        wait_for(lambda: not alive(gc), timeout=5)


def test_status_reports_the_containment_level(shared_kernel):
    with shared_kernel.client() as c:
        cont = c.sys.uname()["containment"]
    assert cont["level"] == AUTO_LEVEL
    assert cont["group"] == kernel_name(shared_kernel.run_dir)
    out = subprocess.run([sys.executable, "-m", "llmagentos.cli", "status"],
                         env=shared_kernel.env(), capture_output=True, text=True, timeout=30)
    assert f"containment {AUTO_LEVEL}" in out.stdout, out


def test_a_process_is_in_its_own_group(shared_kernel):
    if AUTO_LEVEL == "subreaper":
        pytest.skip("no cgroups here: the subreaper level has no group to look at")
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sleep", "30"])
        os_pid = c.proc.stat(pid)["os_pid"]
        name = kernel_name(shared_kernel.run_dir)
        lines = Path(f"/proc/{os_pid}/cgroup").read_text().splitlines()
        mine = [ln for ln in lines if ln.endswith(f"/{name}/p{pid}")]
        assert mine, lines
        c.proc.kill(pid, "KILL")
        c.proc.wait(pid, 10)


@pytest.mark.skipif(AUTO_LEVEL == "subreaper", reason="a crashed kernel's orphans are "
                    "nobody's without cgroups")
def test_next_boot_kills_what_a_crashed_kernel_left(tmp_path, leftovers):
    k = boot_kernel(tmp_path)
    with k.client() as c:
        c.proc.spawn(double_fork(tmp_path / "gc.pid"), "forker")
        gc = grandchild(tmp_path / "gc.pid")
        leftovers.append(gc)
    k.proc.kill()  # a crash: no shutdown, no sweep
    k.proc.wait()
    time.sleep(0.3)
    assert alive(gc)  # nothing killed it yet
    (tmp_path / "other").mkdir()
    other = boot_kernel(tmp_path / "other")  # another run dir: not its business
    try:
        time.sleep(0.3)
        assert alive(gc)
    finally:
        other.stop()
    k = boot_kernel(tmp_path)  # the same run dir: the leftovers are ours to clean
    try:
        wait_for(lambda: not alive(gc), timeout=5)
        with k.client() as c:
            assert c.sys.uname()["containment"]["level"] == AUTO_LEVEL
    finally:
        k.stop()
    name = kernel_name(tmp_path / "run")
    probe = Containment.probe(probe_name())
    probe.close()
    for base in probe.bases.values():  # the per-kernel parent group is gone at shutdown
        assert not os.path.exists(os.path.join(os.path.dirname(base), name))


FORK_RACE = r'''
import os, subprocess, sys, time
from llmagentos.kernel.cgroups import Containment

FORKER = """
import os, time
for _ in range(150):
    try:
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
    except OSError:
        time.sleep(0.01)
time.sleep(60)
"""


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


c = Containment.probe("llmagentos-testfork", sys.argv[1])
c.own_all_children = True  # this program starts nothing else
try:
    g = c.create("p1", pids_max=200)
    forker = subprocess.Popen([sys.executable, "-c", FORKER], preexec_fn=g.join_self,
                              start_new_session=True)
    g.add(forker.pid)
    time.sleep(0.2)  # mid-forking
    c.tick()
    members = g.pids()
    assert len(members) > 1, members
    g.kill()
    forker.wait(5)
    end = time.monotonic() + 5
    while any(alive(p) for p in members) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(alive(p) for p in members), [p for p in members if alive(p)]
    assert not g.pids()
    g.remove()
finally:
    c.close()
print("ok", len(members))
'''


@pytest.mark.parametrize("lv", [AUTO_LEVEL, *FORCED])
def test_a_forking_group_is_killed_entirely(lv):
    """Kill races a process that keeps forking; nothing of it is left. (In a
    program of its own: the subreaper level makes its caller a subreaper.)"""
    r = subprocess.run([PY, "-c", FORK_RACE, lv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stdout + r.stderr


SWEEP_SPARES = r'''
import subprocess, sys, time
from llmagentos.kernel.cgroups import Containment

c = Containment.probe("llmagentos-testspare", "subreaper")
bystander = subprocess.Popen(["sleep", "30"])  # ours, but in no group
g = c.create("p1")
member = subprocess.Popen(["sleep", "31"])
g.add(member.pid)
c.close()
time.sleep(0.2)
print(bystander.poll(), member.poll())
bystander.kill()
'''


def test_a_subreaper_sweep_spares_children_in_no_group():
    """Only the kernel (which starts nothing else) says every child of its own
    is an orphan of some group; a program using the module does not lose its
    other children to a sweep."""
    r = subprocess.run([PY, "-c", SWEEP_SPARES], capture_output=True, text=True, timeout=30)
    assert r.stdout.split() == ["None", "-9"], r.stdout + r.stderr


@pytest.mark.skipif(AUTO_LEVEL == "subreaper", reason="no cgroup dirs at the subreaper level")
def test_a_probe_whose_group_dir_another_removed_still_boots():
    """Two holders of one group name (test workers probing at once) could remove
    the parent dir while the other listed it for leftovers: FileNotFoundError
    out of probe. A dir gone means nothing is left to clear."""
    c = Containment.probe(probe_name("gone"))
    c._drop_bases()  # what the other holder's close does
    c._clear_leftovers()
    c.close()
    threads_err: list[BaseException] = []

    def probe_often():
        try:
            for _ in range(20):
                Containment.probe(probe_name("race")).close()
        except BaseException as e:  # noqa: BLE001 - reported below
            threads_err.append(e)

    import threading
    ts = [threading.Thread(target=probe_often) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not threads_err, threads_err


def test_a_signal_reaches_the_groups_root_before_its_children(monkeypatch):
    """The members were signalled in set order, so a child could die of SIGTERM
    before its parent got it; the parent (an MCP bridge) saw its server die,
    began to exit, and then died of the SIGTERM it handles."""
    from llmagentos.kernel import cgroups

    sent = []
    monkeypatch.setattr(cgroups, "_kill", lambda pid, sig: sent.append((pid, sig)))

    class Members:  # a group whose root (10) iterates after its child (1) in a set
        def pids(self):
            return {1, 10, 33}

    cgroups.Group.signal(Members(), signal.SIGTERM, also=10)
    assert sent == [(10, signal.SIGTERM), (1, signal.SIGTERM), (33, signal.SIGTERM)]
    sent.clear()
    cgroups.Group.signal(Members(), signal.SIGTERM, also=99)  # a root not yet joined
    assert [p for p, _ in sent] == [99, 1, 10, 33]


@pytest.mark.skipif(AUTO_LEVEL == "subreaper", reason="no cgroup dirs at the subreaper level")
def test_a_group_removed_while_it_is_read_has_no_members(monkeypatch):
    """Killing a process read its group's cgroup.procs while an exec run's own
    cleanup removed a subgroup: the read answered ENODEV and proc.kill was an
    EIO "internal error". A group that is gone has no members."""
    import errno

    from llmagentos.kernel import cgroups

    c = Containment.probe(probe_name("enodev"))
    try:
        g = c.create("p1")
        real_open = open

        def gone(path, *a, **kw):
            if str(path).endswith("cgroup.procs"):
                raise OSError(errno.ENODEV, "No such device")
            return real_open(path, *a, **kw)

        monkeypatch.setattr(cgroups, "open", gone, raising=False)
        assert g.pids() == set()
        g.kill()  # finds it empty at once
        monkeypatch.undo()
        g.remove()
    finally:
        c.close()
