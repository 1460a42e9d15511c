"""Supervised services: commands the kernel keeps running as processes of init,
restarted with exponential backoff when they die; drivers and MCP bridges
among them, whose callers see EIO while they are down and success once they
have registered again."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import boot_kernel, wait_for

import llmagentos
from llmagentos import ERRORS

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

DRIVER = '''
import trio
from pathlib import Path
from llmagentos import Driver, tool


class Flaky(Driver):
    namespace = "flaky"

    @tool
    def add(self, a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @tool
    async def hold(self, marker: str) -> str:
        """Say it has started (a file), then take a minute."""
        Path(marker).write_text("started")
        await trio.sleep(60)
        return "late"
'''


def row(c, name: str) -> dict:
    return next(r for r in c.svc.list() if r["name"] == name)


def running(c, name: str, other_than: int | None = None) -> dict | None:
    r = row(c, name)
    return r if r["state"] == "running" and r["pid"] not in (None, other_than) else None


def test_a_killed_driver_is_restarted_its_callers_see_eio_then_success(shared_kernel,
                                                                          tmp_path):
    drv = tmp_path / "flaky_driver.py"
    drv.write_text(DRIVER)
    marker = tmp_path / "started"
    with shared_kernel.client() as c:
        first = c.svc.add("flaky", [PY, "-m", "llmagentos.driver", str(drv)])
        pid = first["pid"]
        assert first["state"] == "running" and first["restarts"] == 0
        wait_for(lambda: c.tool.list("flaky"), timeout=20)
        assert c.tool.list("flaky")[0]["driver"] == pid  # the service process serves them
        ps = {p["pid"]: p for p in c.proc.ps()}
        assert ps[pid]["name"] == "svc:flaky" and ps[pid]["ppid"] == 1
        assert c.tool.call("flaky.add", {"a": 2, "b": 3}) == 5

        failed: list = []

        def caller() -> None:
            with shared_kernel.client() as cc:
                try:
                    cc.tool.call("flaky.hold", {"marker": str(marker)}, 30)
                except llmagentos.KernelError as e:
                    failed.append(e)

        t = threading.Thread(target=caller)
        t.start()
        wait_for(marker.exists, timeout=20)  # the call is in the driver's hands
        c.proc.kill(pid, "SIGKILL")
        t.join(20)
        assert len(failed) == 1 and failed[0].name == "EIO" and "flaky" in failed[0].message

        again = wait_for(lambda: running(c, "flaky", other_than=pid), timeout=20)
        assert again["restarts"] == 1 and again["last_exit"]["signal_name"] == "SIGKILL"
        wait_for(lambda: c.tool.list("flaky"), timeout=20)  # registered again
        assert c.tool.call("flaky.add", {"a": 20, "b": 22}) == 42
        assert c.tool.list("flaky")[0]["driver"] == again["pid"]
        c.svc.remove("flaky", 1.0)
        assert not any(r["name"] == "flaky" for r in c.svc.list())
        assert c.tool.list("flaky") == []


def test_backoff_doubles_on_repeated_crashes_up_to_its_cap(shared_kernel):
    with shared_kernel.client() as c:
        t0 = time.monotonic()
        c.svc.add("crashy", ["sh", "-c", "exit 3"], "always", None, None, None, 0.2, 0.8, 10.0)
        seen = []

        def restarted_four_times() -> bool:
            r = row(c, "crashy")
            if r["state"] == "backoff" and (not seen or seen[-1] != (r["restarts"], r["backoff"])):
                seen.append((r["restarts"], r["backoff"]))
            return r["restarts"] >= 4

        wait_for(restarted_four_times, timeout=20, interval=0.02)
        elapsed = time.monotonic() - t0
        r = c.svc.stop("crashy", 1.0)
        # Four waits of 0.2, 0.4, 0.8 and 0.8 (the cap) seconds came before the 4th restart:
        # with a constant delay they would take 0.8 s.
        assert elapsed >= 0.2 + 0.4 + 0.8 + 0.8
        assert r["backoff"] == 0.8
        delays = [d for _, d in seen]
        assert delays == sorted(delays) and set(delays) <= {0.2, 0.4, 0.8}
        assert 0.8 in delays
        assert r["state"] == "stopped" and r["pid"] is None
        c.svc.remove("crashy", 1.0)


def test_the_delay_starts_over_once_a_run_lasted_stable_seconds(shared_kernel):
    with shared_kernel.client() as c:
        c.svc.add("steady", ["sh", "-c", "sleep 0.7; exit 1"], "always", None, None, None,
                  0.1, 5.0, 0.3)
        wait_for(lambda: row(c, "steady")["restarts"] >= 3, timeout=20)
        assert row(c, "steady")["backoff"] == 0.1  # every run outlasted `stable`
        c.svc.remove("steady", 1.0)


def test_stop_ends_it_for_good_and_restart_starts_it_again(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.svc.add("sleeper", ["sleep", "60"])["pid"]
        assert c.proc.stat(pid)["state"] in ("READY", "RUNNING")
        r = c.svc.stop("sleeper", 1.0)
        assert r["state"] == "stopped" and r["pid"] is None
        assert r["last_exit"]["signal_name"] == "SIGTERM"
        time.sleep(0.5)  # a supervisor that restarted it would have by now
        r = row(c, "sleeper")
        assert r["state"] == "stopped" and r["restarts"] == 0
        assert not any(p["name"] == "svc:sleeper" and p["state"] != "ZOMBIE"
                       for p in c.proc.ps())
        again = c.svc.restart("sleeper", 1.0)
        assert again["state"] == "running" and again["pid"] not in (None, pid)
        assert again["restarts"] == 1
        third = c.svc.restart("sleeper", 1.0)  # a running one: ended and started at once
        assert third["pid"] not in (None, again["pid"]) and third["restarts"] == 2
        c.svc.remove("sleeper", 1.0)


def test_on_failure_leaves_a_clean_exit_alone(shared_kernel):
    with shared_kernel.client() as c:
        c.svc.add("oneshot", ["true"], "on-failure")
        wait_for(lambda: row(c, "oneshot")["state"] == "exited", timeout=10)
        r = row(c, "oneshot")
        assert r["restarts"] == 0 and r["last_exit"]["exit_code"] == 0
        c.svc.add("failing", ["false"], "on-failure", None, None, None, 0.05, 0.1, 10.0)
        wait_for(lambda: row(c, "failing")["restarts"] >= 2, timeout=10)
        for name in ("oneshot", "failing"):
            c.svc.remove(name, 1.0)


def test_bad_requests_get_errnos(shared_kernel):
    with shared_kernel.client() as c:
        for name in ("", "has space", "a/b", "-dash", "x" * 65, "star*"):
            with pytest.raises(ERRORS["EINVAL"]):
                c.svc.add(name, ["true"])
        with pytest.raises(ERRORS["EINVAL"]):
            c.svc.add("x", [])
        with pytest.raises(ERRORS["EINVAL"]):
            c.svc.add("x", ["true"], "sometimes")
        with pytest.raises(ERRORS["EINVAL"]):  # the first delay beyond the cap
            c.svc.add("x", ["true"], "always", None, None, None, 5.0, 1.0, 10.0)
        with pytest.raises(ERRORS["ENOENT"], match="no such executable"):
            c.svc.add("ghost", ["/no/such/program"])
        assert not any(r["name"] == "ghost" for r in c.svc.list())  # nothing half-added
        for call in (c.svc.stop, c.svc.restart, c.svc.remove):
            with pytest.raises(ERRORS["ENOENT"]):
                call("nobody")
        c.svc.add("twice", ["sleep", "60"])
        with pytest.raises(ERRORS["EEXIST"]):
            c.svc.add("twice", ["sleep", "60"])
        c.svc.remove("twice", 1.0)


def test_services_need_svc_admin_and_stay_within_the_callers_rights(shared_kernel):
    with shared_kernel.client() as c:
        plain = c.proc.attach(None, ["llm", "ctx", "proc.spawn"])
        admin = c.proc.attach(None, ["svc.admin", "drv.register"])
        with llmagentos.connect(token=plain["token"], run_dir=shared_kernel.run_dir) as p:
            assert p.svc.list() is not None  # listing is open to all
            for call in (lambda: p.svc.add("mine", ["true"]), lambda: p.svc.stop("x"),
                         lambda: p.svc.restart("x"), lambda: p.svc.remove("x")):
                with pytest.raises(ERRORS["EACCES"], match="svc.admin"):
                    call()
        with llmagentos.connect(token=admin["token"], run_dir=shared_kernel.run_dir) as a:
            with pytest.raises(ERRORS["EACCES"], match="exec"):
                a.svc.add("escalate", ["true"], "always", ["exec"])
            r = a.svc.add("bounded", ["sleep", "60"])
            # by default what a child of the caller gets: its set less the privileged
            assert set(c.proc.stat(r["pid"])["caps"]) == {"drv.register"}
            a.svc.remove("bounded", 1.0)


def test_config_file_services_start_at_boot(tmp_path):
    conf = tmp_path / "kernel.toml"
    conf.write_text(textwrap.dedent("""
        [services.ticker]
        argv = ["sleep", "60"]

        [services.once]
        argv = "sh -c 'exit 0'"
        restart = "on-failure"
    """))
    k = boot_kernel(tmp_path, "--config", str(conf))
    try:
        with k.client() as c:
            ticker = wait_for(lambda: running(c, "ticker"), timeout=10)
            assert ticker["origin"] == "config" and ticker["argv"] == ["sleep", "60"]
            assert c.proc.stat(ticker["pid"])["name"] == "svc:ticker"
            wait_for(lambda: row(c, "once")["state"] == "exited", timeout=10)
            c.proc.kill(ticker["pid"], "SIGKILL")  # killable, and restarted
            wait_for(lambda: running(c, "ticker", other_than=ticker["pid"]), timeout=10)
    finally:
        k.stop()


@pytest.mark.parametrize("text, message", [
    ("[services.a]\nrestart = 'always'\n", "needs argv"),
    ("[services.a]\nargv = ['true']\nrestrat = 'always'\n", "unknown keys ['restrat']"),
    ("[services.a]\nargv = ['true']\nrestart = 'sometimes'\n", "restart must be one of"),
    ("[services.a]\nargv = ['true']\nbackoff = 'soon'\n", "backoff must be a number"),
    ("[services.'a b']\nargv = ['true']\n", "service name"),
    ("services = 3\n", "[services] must be a table"),
])
def test_a_bad_services_table_is_refused_naming_the_key(tmp_path, text, message):
    from llmagentos.kernel.supervisor import specs_from_config
    from llmagentos.syscalls.errno import SyscallError
    conf = tmp_path / "kernel.toml"
    conf.write_text(text)
    with pytest.raises(SyscallError) as e:
        specs_from_config(conf)
    assert e.value.name == "EINVAL" and message in e.value.message and str(conf) in e.value.message


def test_a_bad_services_table_is_a_boot_error(tmp_path):
    conf = tmp_path / "kernel.toml"
    conf.write_text("[services.a]\nargv = ['true']\nrestrat = 'always'\n")
    r = subprocess.run([PY, "-m", "llmagentos.kernel", "--run-dir", str(tmp_path / "run"),
                        "--state-dir", str(tmp_path / "state"), "--model", "none",
                        "--config", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown keys ['restrat']" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_service_commands(shared_kernel, capsys):
    from llmagentos.cli import main

    def llmos(*args: str) -> tuple[int, str, str]:
        rc = main([*args[:2], "--run-dir", str(shared_kernel.run_dir), *args[2:]])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = llmos("service", "add", "--json", "clock", "--", "sleep", "60")
    assert rc == 0, err
    pid = json.loads(out)["pid"]
    with shared_kernel.client() as c:
        c.proc.kill(pid, "SIGKILL")
        wait_for(lambda: running(c, "clock", other_than=pid), timeout=10)
    rc, out, _ = llmos("service", "ls")
    line = next(ln for ln in out.splitlines() if "clock" in ln)
    assert rc == 0 and "running" in line and "SIGKILL" in line and "sleep 60" in line
    clock = next(s for s in json.loads(llmos("service", "ls", "--json")[1])
                 if s["name"] == "clock")
    assert clock["restarts"] == 1 and clock["last_exit"]["signal_name"] == "SIGKILL"
    rc, out, _ = llmos("service", "restart", "clock")
    assert rc == 0 and str(clock["pid"]) not in out
    rc, out, _ = llmos("service", "stop", "clock", "--grace", "1")
    assert rc == 0 and "stopped" in out
    assert llmos("service", "rm", "clock")[0] == 0
    rc, _, err = llmos("service", "stop", "clock")
    assert rc == 1 and "ENOENT" in err
    assert llmos("service", "add", "nocmd")[0] == 2
