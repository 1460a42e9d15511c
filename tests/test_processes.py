"""Processes are real OS processes: spawn, ps, stat, signals, wait, zombies, orphans."""

import os
import signal
import sys
import textwrap
import time

import psutil
import pytest
from conftest import PY, wait_for

import llmagentos


def script(body: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(body)]


def test_spawn_ps_stat_wait(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(script("""
            import llmagentos, sys
            c = llmagentos.connect()
            print("I am", c.proc.getpid(), flush=True)
            c.proc.exit(7)
        """), "child")
        st = c.proc.wait(pid, 30)
        assert st == {"pid": pid, "exit_code": 7, "signal": None, "signal_name": None,
                      "reason": "proc.exit(7)"}
        log = c.proc.logs(pid)
        assert log["data"] == f"I am {pid}\n".encode()
        # The shell's child stays visible a while after wait (stat may follow it).
        assert log["state"] == "ZOMBIE" and c.proc.stat(pid)["exit"]["exit_code"] == 7


def test_stat_shows_control_block_and_psutil(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sleep", "30"], "sleeper", None, None, None, None, 5)
        st = c.proc.stat(pid)
        assert st["pid"] == pid and st["ppid"] == 1 and st["name"] == "sleeper"
        assert st["nice"] == 5 and st["state"] == "READY"
        assert st["rss"] > 0 and st["cpu_user"] is not None
        assert psutil.Process(st["os_pid"]).cmdline() == ["sleep", "30"]
        row = next(r for r in c.proc.ps() if r["pid"] == pid)
        assert row["state"] == "READY"
        c.proc.kill(pid, "SIGKILL")
        assert c.proc.wait(pid, 10)["signal_name"] == "SIGKILL"


def test_stop_and_cont_really_suspend_the_os_process(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sleep", "30"])
        os_pid = c.proc.stat(pid)["os_pid"]
        c.proc.kill(pid, "SIGSTOP")
        assert c.proc.stat(pid)["state"] == "STOPPED"
        wait_for(lambda: psutil.Process(os_pid).status() == psutil.STATUS_STOPPED)
        time.sleep(1.3)  # longer than the watcher's poll: the state stays true
        assert c.proc.stat(pid)["state"] == "STOPPED"
        c.proc.kill(pid, signal.SIGCONT)
        assert c.proc.stat(pid)["state"] == "READY"
        wait_for(lambda: psutil.Process(os_pid).status() != psutil.STATUS_STOPPED)
        c.proc.kill(pid, "TERM")
        assert c.proc.wait(pid, 10)["signal_name"] == "SIGTERM"


def test_external_stop_is_seen_by_the_watcher(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sleep", "30"])
        os.kill(c.proc.stat(pid)["os_pid"], signal.SIGSTOP)
        wait_for(lambda: c.proc.stat(pid)["state"] == "STOPPED", timeout=5)
        c.proc.kill(pid, "KILL")
        c.proc.wait(pid, 10)


def test_term_is_catchable(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(script("""
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
            print("ready", flush=True)
            time.sleep(30)
        """))
        wait_for(lambda: c.proc.logs(pid)["data"] == b"ready\n")
        c.proc.kill(pid, "SIGTERM")
        assert c.proc.wait(pid, 10)["exit_code"] == 42


def test_sigkill_kills_the_whole_os_tree(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sh", "-c", "sleep 60 & sleep 60 & setsid sleep 60 & wait"])
        os_pid = c.proc.stat(pid)["os_pid"]
        kids = wait_for(lambda: len(psutil.Process(os_pid).children(recursive=True)) == 3
                        and psutil.Process(os_pid).children(recursive=True))
        c.proc.kill(pid, "SIGKILL")
        c.proc.wait(pid, 10)
        gone, alive = psutil.wait_procs(kids, timeout=5)
        assert not alive


def test_zombie_until_waited(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["true"])
        wait_for(lambda: c.proc.stat(pid)["state"] == "ZOMBIE")
        time.sleep(0.3)
        assert c.proc.stat(pid)["exit"]["exit_code"] == 0  # still there: not reaped
        assert c.proc.wait(pid)["exit_code"] == 0
        with pytest.raises(ChildProcessError):  # waited for once; stat still finds it
            c.proc.wait(pid)


def test_wait_timeout_and_wait_any(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sleep", "30"])
        with pytest.raises(TimeoutError):
            c.proc.wait(pid, 0.2)
        assert c.proc.stat(pid)["state"] == "READY"  # a timed-out wait reaps nothing
        c.proc.kill(pid, "KILL")
        assert c.proc.wait(-1, 10)["pid"] == pid


def test_wait_for_someone_elses_child_is_echild(shared_kernel):
    with shared_kernel.client() as c:
        parent = c.proc.spawn(script("""
            import llmagentos, sys, time
            c = llmagentos.connect()
            kid = c.proc.spawn(["sleep", "30"])
            print(kid, flush=True)
            time.sleep(30)
        """))
        kid = int(wait_for(lambda: c.proc.logs(parent)["data"]).decode())
        with pytest.raises(ChildProcessError):
            c.proc.wait(kid, 1)
        c.proc.kill(parent, "KILL")  # kill_any: init may signal anyone
        c.proc.kill(kid, "KILL")
        c.proc.wait(parent, 10)


def test_orphans_are_adopted_by_init_and_reaped(shared_kernel):
    with shared_kernel.client() as c:
        parent = c.proc.spawn(script("""
            import llmagentos
            c = llmagentos.connect()
            print(c.proc.spawn(["sleep", "0.5"]), flush=True)
        """))
        c.proc.wait(parent, 20)
        kid = int(c.proc.logs(parent)["data"].decode())
        try:
            st = c.proc.stat(kid)
            assert st["ppid"] == 1
        except ProcessLookupError:
            pass  # already exited and reaped by init
        wait_for(lambda: all(r["pid"] != kid for r in c.proc.ps()), timeout=10)


def test_process_may_signal_itself_and_descendants_only(shared_kernel):
    with shared_kernel.client() as c:
        other = c.proc.spawn(["sleep", "30"])
        prog = c.proc.spawn(script(f"""
            import llmagentos, sys
            c = llmagentos.connect()
            kid = c.proc.spawn(["sleep", "30"])
            c.proc.kill(kid, "KILL")
            print("kid", c.proc.wait(kid, 10)["signal_name"])
            try:
                c.proc.kill({other}, "KILL")
            except PermissionError as e:
                print("other", e.name)
            try:
                c.proc.kill(1, "KILL")
            except PermissionError as e:
                print("init", e.name)
        """))
        assert c.proc.wait(prog, 20)["exit_code"] == 0
        assert c.proc.logs(prog)["data"].decode().split("\n")[:3] == [
            "kid SIGKILL", "other EPERM", "init EPERM"]
        assert c.proc.stat(other)["state"] == "READY"
        c.proc.kill(other, "KILL")
        c.proc.wait(other)


def test_nice_raises_freely_and_lowers_only_with_proc_renice(shared_kernel):
    with shared_kernel.client() as c:
        other = c.proc.spawn(["sleep", "30"])
        agent = c.proc.attach()  # inherits no privileged capability: not proc.renice
        try:
            with shared_kernel.client(token=agent["token"]) as a:
                me = agent["pid"]
                assert a.proc.nice(me, 7) == 7 and c.proc.stat(me)["nice"] == 7
                for pid, value, errno in [(me, 6, "EACCES"),  # lower: needs proc.renice
                                          (other, 10, "EPERM"),  # not a descendant
                                          (1, 19, "EPERM"),  # never init
                                          (10**9, 1, "ESRCH")]:
                    with pytest.raises(llmagentos.KernelError) as e:
                        a.proc.nice(pid, value)
                    assert e.value.name == errno, (pid, value)
                assert c.proc.stat(me)["nice"] == 7 and c.proc.stat(other)["nice"] == 0
            assert c.proc.nice(other, -5) == -5 and c.proc.stat(other)["nice"] == -5
            with pytest.raises(llmagentos.KernelError, match="EPERM|may not renice"):
                c.proc.nice(1, 0)
        finally:
            c.proc.kill(other, "KILL")
            c.proc.wait(other)


def test_child_cannot_get_more_caps_than_parent(shared_kernel):
    with shared_kernel.client() as c:
        prog = c.proc.spawn(script("""
            import llmagentos
            c = llmagentos.connect()
            print(sorted(c.proc.stat()["caps"]))
            try:
                c.proc.spawn(["true"], None, None, None, ["fs.read", "exec"])
            except PermissionError as e:
                print(e.name, e.message)
            try:
                c.proc.kill(1, "TERM")
            except PermissionError as e:
                print(e.name)
        """), "bounded", None, None, ["proc.spawn", "fs.read"])
        assert c.proc.wait(prog, 20)["exit_code"] == 0
        out = c.proc.logs(prog)["data"].decode().splitlines()
        assert out[0] == "['fs.read', 'proc.spawn']"
        assert out[1].startswith("EACCES") and "exec" in out[1]


def test_spawn_needs_proc_spawn_cap(shared_kernel):
    with shared_kernel.client() as c:
        prog = c.proc.spawn(script("""
            import llmagentos
            c = llmagentos.connect()
            try:
                c.proc.spawn(["true"])
            except PermissionError as e:
                print(e.name, e.message)
        """), None, None, None, ["llm"])
        c.proc.wait(prog, 20)
        assert c.proc.logs(prog)["data"].startswith(b"EACCES proc.spawn needs capability")


def test_wall_time_limit(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sleep", "30"], None, None, None, None, {"wall_time": 0.5})
        st = c.proc.wait(pid, 10)
        assert st["signal_name"] == "SIGKILL" and "wall time" in st["reason"]


def test_max_children_limit(shared_kernel):
    with shared_kernel.client() as c:
        prog = c.proc.spawn(script("""
            import llmagentos
            c = llmagentos.connect()
            a = c.proc.spawn(["sleep", "30"]); b = c.proc.spawn(["sleep", "30"])
            try:
                c.proc.spawn(["sleep", "30"])
            except BlockingIOError as e:
                print(e.name)
            for p in (a, b):
                c.proc.kill(p, "KILL"); c.proc.wait(p)
            c.proc.wait(c.proc.spawn(["true"]))  # room again
            print("ok")
        """), None, None, None, None, {"max_children": 2})
        c.proc.wait(prog, 20)
        assert c.proc.logs(prog)["data"].decode().split() == ["EAGAIN", "ok"]


def test_spawn_errors(shared_kernel):
    with shared_kernel.client() as c:
        with pytest.raises(FileNotFoundError, match="no such executable"):
            c.proc.spawn(["/no/such/binary"])
        with pytest.raises(ValueError):
            c.proc.spawn([])
        with pytest.raises(ValueError, match="unknown limit"):
            c.proc.spawn(["true"], None, None, None, None, {"bogus": 1})
        with pytest.raises(FileNotFoundError):
            c.proc.spawn(["true"], None, None, "/no/such/dir")
        with pytest.raises(ValueError):
            c.proc.spawn(["true"], None, None, None, None, None, 99)
        with pytest.raises(ProcessLookupError):
            c.proc.kill(99999, "TERM")
        with pytest.raises(ValueError, match="unknown signal"):
            c.proc.kill(1, "SIGBOGUS")


def test_async_client_many_calls_in_flight(shared_kernel):
    import trio

    async def main():
        async with llmagentos.aconnect(run_dir=shared_kernel.run_dir) as c:
            pid = await c.proc.spawn(["sleep", "0.3"])
            results = {}

            async def w():
                results["wait"] = await c.proc.wait(pid, 10)

            async with trio.open_nursery() as n:
                n.start_soon(w)
                # while wait blocks, the same connection keeps answering
                for _ in range(20):
                    assert await c.proc.getpid() == 1
            assert results["wait"]["exit_code"] == 0

    trio.run(main)


def test_env_and_cwd(shared_kernel, tmp_path):
    with shared_kernel.client() as c:
        pid = c.proc.spawn(["sh", "-c", 'echo "$FOO $LLMAGENTOS_PID $(pwd)"'],
                           None, {"FOO": "bar"}, str(tmp_path))
        c.proc.wait(pid, 10)
        assert c.proc.logs(pid)["data"].decode().split() == ["bar", str(pid), str(tmp_path)]


def test_python_exception_classes_match_errno():
    from llmagentos.errors import ERRORS
    assert issubclass(ERRORS["ENOENT"], FileNotFoundError)
    assert issubclass(ERRORS["ESRCH"], ProcessLookupError)
    e = ERRORS["EACCES"]("no")
    assert (e.name, e.errno, str(e)) == ("EACCES", 13, "[EACCES] no")
    assert sys.modules["llmagentos.errors"]


def test_logs_of_another_process_need_the_right_to_signal_it(shared_kernel):
    with shared_kernel.client() as c:
        other = c.proc.spawn(script("""
            import time
            print("secret of another process", flush=True)
            time.sleep(30)
        """))
        try:
            wait_for(lambda: c.proc.logs(other)["data"])  # init reads every log
            prog = c.proc.spawn(script(f"""
                import llmagentos, sys
                c = llmagentos.connect()
                def attempt(pid):
                    try:
                        return c.proc.logs(pid)["data"].decode().strip()
                    except llmagentos.KernelError as e:
                        return e.name
                print("me", flush=True)
                kid = c.proc.spawn([sys.executable, "-c", "print('from the child')"])
                c.proc.wait(kid, 30)  # reaped: its parent may still read it
                print(attempt({other}), attempt(c.proc.getpid()), attempt(kid), attempt(1),
                      sep="|")
            """))
            c.proc.wait(prog, 30)
            out = c.proc.logs(prog)["data"].decode().splitlines()
            assert out[1].split("|") == ["EPERM", "me", "from the child", "ESRCH"]
            # proc.kill_any reads any log, as it signals any process
            spy = c.proc.spawn(script(f"""
                import llmagentos
                print(llmagentos.connect().proc.logs({other})["data"].decode().strip())
            """), None, None, None, ["proc.kill_any"])
            c.proc.wait(spy, 30)
            assert c.proc.logs(spy)["data"] == b"secret of another process\n"
            # and a reaped process's log is not readable by a sibling either
            sib = c.proc.spawn(script(f"""
                import llmagentos
                try:
                    llmagentos.connect().proc.logs({spy})
                except llmagentos.KernelError as e:
                    print(e.name)
            """))
            c.proc.wait(sib, 30)
            assert c.proc.logs(sib)["data"] == b"EPERM\n"
        finally:
            c.proc.kill(other, "SIGKILL")
            c.proc.wait(other, 30)


def test_no_token_reads_as_a_command_line_option(tmp_path):
    """A process token is passed as `llmos mcp serve --key TOKEN`; one in 64
    began with "-" and argparse took it for an option ("expected one
    argument"), so the server did not start."""
    from llmagentos.kernel.proc.table import ProcessTable

    table = ProcessTable(tmp_path / "logs")
    tokens = [table._new_pcb(ppid=1, name="t", argv=[], caps=[]).token for _ in range(3000)]
    assert not [t for t in tokens if t.startswith("-")]
    assert len(set(tokens)) == len(tokens) and {len(t) for t in tokens} == {32}
