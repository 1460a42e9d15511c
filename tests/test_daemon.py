"""The daemon's life: boot, one kernel per run dir, stale sockets, TCP, shutdown, CLI."""

import json
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest
from conftest import PY, boot_kernel, wait_for

import llmagentos

LLMOS = [PY, "-m", "llmagentos.cli"]


def llmos(k, *args, check=None):
    r = subprocess.run([*LLMOS, *args], env=k.env(), capture_output=True, text=True, timeout=60)
    if check is not None:
        assert r.returncode == check, r.stdout + r.stderr
    return r


def test_boot_twice_fails_clearly(kernel):
    r = subprocess.run([PY, "-m", "llmagentos.kernel", "--run-dir", str(kernel.run_dir),
                        "--state-dir", str(kernel.state_dir)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "already running" in r.stderr and str(kernel.proc.pid) in r.stderr
    with kernel.client() as c:
        assert c.proc.getpid() == 1


def test_stale_socket_is_replaced(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(run / "kernel.sock"))  # a crashed kernel's leftover: bound, not listening
    s.close()
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            assert c.proc.getpid() == 1
    finally:
        k.stop()


def test_crashed_kernel_then_reboot(tmp_path):
    k = boot_kernel(tmp_path)
    k.proc.kill()  # SIGKILL: no cleanup at all
    k.proc.wait()
    assert (k.run_dir / "kernel.sock").exists()
    k2 = boot_kernel(tmp_path)
    try:
        with k2.client() as c:
            assert c.proc.getpid() == 1
    finally:
        k2.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shutdown_terms_then_kills_children(tmp_path, sig):
    k = boot_kernel(tmp_path)
    with k.client() as c:
        polite = c.proc.spawn(["sleep", "60"])
        stubborn = c.proc.spawn([PY, "-c", "import signal,time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                 "print('x', flush=True); time.sleep(60)"])
        wait_for(lambda: c.proc.logs(stubborn)["data"])
        os_pids = [c.proc.stat(p)["os_pid"] for p in (polite, stubborn)]
    k.proc.send_signal(sig)
    assert k.proc.wait(20) == 0
    for p in os_pids:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
    assert not (k.run_dir / "kernel.sock").exists()
    assert not (k.run_dir / "kernel.pid").exists()


def test_tcp_listener_requires_token(tmp_path):
    k = boot_kernel(tmp_path, "--tcp", "127.0.0.1:0")
    try:
        addr = (k.run_dir / "tcp").read_text().strip()
        assert addr.startswith("tcp://127.0.0.1:")
        with llmagentos.connect(addr, k.token) as c:
            assert c.proc.getpid() == 1
        with pytest.raises(PermissionError):
            llmagentos.connect(addr, "not-the-token")
    finally:
        k.stop()


def test_tcp_refuses_non_loopback(tmp_path):
    r = subprocess.run([PY, "-m", "llmagentos.kernel", "--run-dir", str(tmp_path / "r"),
                        "--state-dir", str(tmp_path / "s"), "--tcp", "0.0.0.0:0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "loopback" in r.stderr  # a usage error, before any model loads


def test_cli_end_to_end(tmp_path):
    env = dict(os.environ, LLMAGENTOS_RUN_DIR=str(tmp_path / "run"))
    env.pop("LLMAGENTOS_SOCKET", None)
    env.pop("LLMAGENTOS_TOKEN", None)

    def run(*args):
        return subprocess.run([*LLMOS, *args], env=env, capture_output=True, text=True,
                              timeout=60)

    assert run("ps").returncode == 3  # no kernel yet
    r = run("boot", "--detach", "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 0 and "kernel up" in r.stdout, r.stderr
    try:
        pid = int(run("spawn", "--name", "sl", "--", "sleep", "30").stdout)
        ps = json.loads(run("ps", "--json").stdout)
        assert any(p["pid"] == pid and p["name"] == "sl" for p in ps)
        assert run("kill", "-STOP", str(pid)).returncode == 0
        assert json.loads(run("stat", str(pid), "--json").stdout)["state"] == "STOPPED"
        assert run("kill", "-CONT", str(pid)).returncode == 0
        assert run("kill", "-9", str(pid)).returncode == 0
        assert run("wait", str(pid)).returncode == 128 + 9
        echo = int(run("spawn", "--", "sh", "-c", "echo hi; exit 5").stdout)
        assert run("wait", str(echo)).returncode == 5
        assert run("logs", str(echo)).stdout == "hi\n"
        r = run("kill", "424242")
        assert r.returncode == 1 and "ESRCH" in r.stderr
        r = run("call", "proc.stat", "424242", "--json")
        assert r.returncode == 1 and json.loads(r.stdout)["error"]["name"] == "ESRCH"
        assert json.loads(run("call", "proc.getpid").stdout) == 1
        assert "proc.spawn" in run("syscalls").stdout
        st = run("status")
        assert st.returncode == 0 and "processes" in st.stdout
        assert run("spawn").returncode == 2
        assert run("wait", "1", "--timeout", "0.1").returncode == 1  # ECHILD: init is no child
    finally:
        r = run("shutdown")
    assert r.returncode == 0 and "kernel down" in r.stdout
    assert run("ps").returncode == 3


def test_detach_reports_boot_failure(tmp_path, kernel):
    env = kernel.env()
    r = subprocess.run([*LLMOS, "boot", "--detach"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "already running" in r.stderr


def test_sys_shutdown_syscall(tmp_path):
    k = boot_kernel(tmp_path)
    with k.client() as c:
        kid = c.proc.spawn(["sleep", "60"])
        os_pid = c.proc.stat(kid)["os_pid"]
        c.sys.shutdown(0.5)
    assert k.proc.wait(20) == 0
    wait_for(lambda: not psutil.pid_exists(os_pid)
             or psutil.Process(os_pid).status() == psutil.STATUS_ZOMBIE)
    assert sys.modules["llmagentos"]


def test_audit_log_records_state_changes(tmp_path):
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            pid = c.proc.spawn(["sleep", "30"])
            with pytest.raises(ProcessLookupError):
                c.proc.kill(424242, "KILL")
            c.proc.kill(pid, "KILL")
            c.proc.wait(pid)
            c.proc.getpid()  # reads are not audited
            rows = c.sys.audit(None, "proc.*")
            assert [(r["call"], r["errno"]) for r in rows] == [
                ("proc.spawn", None), ("proc.kill", "ESRCH"), ("proc.kill", None)]
            assert all(r["pid"] == 1 and len(r["digest"]) == 16 for r in rows)
            assert [r["call"] for r in c.sys.audit(None, None, "any")] == ["proc.kill"]
        r = llmos(k, "audit", "--call", "proc.kill", "--json", check=0)
        assert len(json.loads(r.stdout)) == 2
    finally:
        k.stop()
    # durable: the rows are in the state dir's database after shutdown
    import sqlite3
    db = sqlite3.connect(k.state_dir / "audit.db")
    assert db.execute("SELECT count(*) FROM audit").fetchone()[0] == 3


def test_every_acknowledged_call_is_in_the_audit_log_after_sigkill(tmp_path):
    """Many clients make state-changing calls; the kernel is SIGKILLed mid-flight;
    every call that was answered is in the log."""
    import sqlite3
    import threading

    from llmagentos.kernel.audit import digest
    from llmagentos.syscalls.table import TABLE

    k = boot_kernel(tmp_path)
    with k.client() as c:
        target = c.proc.attach("audited")["pid"]
    acked: list[list[int]] = [[] for _ in range(8)]
    go = threading.Event()

    def client(t: int) -> None:
        with k.client() as c:
            go.wait()
            for i in range(1_000_000):
                v = t * 1_000_000 + i  # unique: each call has its own digest
                try:
                    c.proc.setlimit(target, "tokens", v)
                except (llmagentos.KernelError, OSError):
                    return  # the kernel is gone
                acked[t].append(v)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    try:
        go.set()
        wait_for(lambda: sum(map(len, acked)) > 500, timeout=20)
        k.proc.send_signal(signal.SIGKILL)
        k.proc.wait()
    finally:
        for th in threads:
            th.join(30)
        k.stop()
    db = sqlite3.connect(k.state_dir / "audit.db")
    logged = {d for (d,) in db.execute("SELECT digest FROM audit WHERE call = 'proc.setlimit'")}
    sc = TABLE["proc.setlimit"]
    want = {digest(sc.bind([target, "tokens", v], {})) for vs in acked for v in vs}
    assert len(want) == sum(map(len, acked)) > 500
    missing = want - logged
    assert not missing, f"{len(missing)} of {len(want)} acknowledged calls are not in the log"


def test_state_and_run_dirs_are_private(tmp_path):
    """Dirs the kernel makes are 0700 and its files 0600, and what an older
    kernel left open is closed at boot."""
    import stat

    state = tmp_path / "state"
    old_root = state / "fs" / "agent_old"
    old_root.mkdir(parents=True, mode=0o755)
    (state / "logs").mkdir(mode=0o755)
    (state / "logs" / "99.log").write_text("old")
    os.chmod(state / "logs" / "99.log", 0o644)
    os.chmod(state, 0o755)
    os.chmod(state / "fs", 0o755)
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            body = ("import llmagentos; c = llmagentos.connect(); c.mem.put('k', 'v'); "
                    "c.ctx.append('user', 'hi'); c.fs.mkdir('/d'); "
                    "c.fs.write_file('/d/f.txt', 'x'); "
                    "c.tool.call('kv.set', {'key': 'k', 'value': 1}); "
                    "c.traj.begin('a task'); print('done')")
            for name in ("private", None):
                pid = c.proc.spawn([PY, "-c", body], name)
                c.proc.wait(pid, 30)
                assert c.proc.logs(pid)["data"] == b"done\n"
            c.proc.setlimit(c.proc.attach("x")["pid"], "tokens", 5)  # an audit row
            bad = []
            for top in (k.state_dir, k.run_dir):
                for dirpath, dirnames, filenames in os.walk(top):
                    if stat.S_IMODE(os.stat(dirpath).st_mode) != 0o700:
                        bad.append((dirpath, oct(os.stat(dirpath).st_mode)))
                    for f in filenames:
                        mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, f)).st_mode)
                        if mode != 0o600:
                            bad.append((os.path.join(dirpath, f), oct(mode)))
            assert not bad
            made = {os.path.relpath(os.path.join(d, f), k.state_dir)
                    for d, _, fs in os.walk(k.state_dir) for f in fs}
            assert {"memory.db", "audit.db", "kv.db", "trajectories.db",
                    "fs/agent%3Aprivate/d/f.txt"} <= made  # the walk saw the real thing
    finally:
        k.stop()


# --- boot options: declared once (syscalls/bootopts.py) ------------------------------------

def _flags(argv: list[str]) -> set[str]:
    import re
    r = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "COLUMNS": "200"})
    return set(re.findall(r"(--[a-z][a-z-]+)", r.stdout))


def test_llmos_boot_takes_every_kernel_option():
    kernel = _flags(["-m", "llmagentos.kernel"])
    boot = _flags(["-m", "llmagentos.cli", "boot"])
    assert kernel - {"--help"} <= boot, kernel - boot
    # the flags the README documents, which llmos boot used to reject
    for f in ("--embed-memory", "--max-frame", "--gpu-layers", "--snapshot-ram", "--device-cpus",
              "--device-gpus", "--device-restarts", "--isolation", "--containment"):
        assert f in boot, f


def test_a_config_file_sets_any_option_and_flags_win(tmp_path):
    from conftest import boot_kernel
    cfg = tmp_path / "kernel.toml"
    cfg.write_text('policy = "priority"\nquantum = 4\nmax-connections = 77\n'
                   '[models.other]\npath = "other.gguf"\n')
    k = boot_kernel(tmp_path, "--config", str(cfg), "--quantum", "5")
    try:
        with k.client() as c:
            u = c.sys.uname()
            assert u["policy"] == "priority"  # from the file
            assert {m["name"] for m in c.llm.models()} >= {"gemma3-270m", "other"}
        r = subprocess.run([sys.executable, "-m", "llmagentos.kernel", "--config", str(cfg),
                            "--help"], capture_output=True, timeout=30)
        assert r.returncode == 0
    finally:
        k.stop()


@pytest.mark.parametrize("text, says", [
    ("polcy = 'rr'\n", "unknown option 'polcy'"),
    ("slots = 'many'\n", "slots must be int"),
    ("policy = 'lottery'\n", "policy must be one of"),
    ("slots = 0\n", "slots must be positive"),
    ("kv-memory = 0\n", "kv_memory must be positive"),
    ("kv_memory = 1.5\n", "kv_memory must be int"),
])
def test_a_bad_config_file_is_a_clear_boot_error(tmp_path, text, says):
    cfg = tmp_path / "kernel.toml"
    cfg.write_text(text)
    r = subprocess.run([sys.executable, "-m", "llmagentos.kernel", "--config", str(cfg),
                        "--run-dir", str(tmp_path / "run"), "--model", "none"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and says in r.stderr, r.stderr


def test_gpu_layers_take_a_count_or_all_from_flags_and_file(tmp_path):
    from llmagentos.syscalls import bootopts
    ap = __import__("argparse").ArgumentParser()
    bootopts.add_arguments(ap)
    for text, n in (("all", -1), ("ALL", -1), ("0", 0), ("12", 12), ("-1", -1)):
        assert bootopts.given(ap.parse_args(["--gpu-layers", text]))["n_gpu_layers"] == n
    # what llmos boot passes on reads back the same
    again = ap.parse_args(bootopts.as_flags({"n_gpu_layers": -1}))
    assert bootopts.given(again)["n_gpu_layers"] == -1
    for bad in ("lots", "-2", "1.5", ""):
        r = subprocess.run([sys.executable, "-m", "llmagentos.kernel", "--gpu-layers", bad,
                            "--model", "none", "--run-dir", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "count or 'all'" in r.stderr, (bad, r.stderr)
    cfg = tmp_path / "k.toml"
    for value, want in (('"all"', -1), ("3", 3)):
        cfg.write_text(f"gpu-layers = {value}\n")
        assert bootopts.read_file(cfg) == {"n_gpu_layers": want}
    for value in ('"many"', "true", "-5"):
        cfg.write_text(f"n_gpu_layers = {value}\n")
        with pytest.raises(bootopts.ConfigError, match="count or 'all'"):
            bootopts.read_file(cfg)


def test_a_reader_that_leaves_early_is_no_traceback(tmp_path):
    """`llmos syscalls | head -0`: the reader has closed the pipe before the
    table comes; llmos ends as Unix tools do (128 + SIGPIPE), with nothing on
    stderr (it printed a traceback)."""
    p = subprocess.Popen([*LLMOS, "syscalls"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "LLMAGENTOS_RUN_DIR": str(tmp_path)})
    p.stdout.close()  # gone before the first write: that write is EPIPE, whatever the timing
    err = p.stderr.read().decode()
    assert p.wait(60) == 128 + signal.SIGPIPE and "Traceback" not in err, err
