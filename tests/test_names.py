"""Identities: a name is owned and held by one process at a time, distinct names
never share storage, and an unnamed process's state dies with it, across boots."""

import json
import os
import signal
import textwrap

import psutil
import pytest
from conftest import PY, boot_kernel, wait_for

import llmagentos
from llmagentos.kernel.names import path_name
from llmagentos.syscalls import caps as capmod

# Printed by the scripts below: what each attempt gave, "ok" or the errno name.
TRY = """
import json, llmagentos
c = llmagentos.connect()
def attempt(fn, *args):
    try:
        fn(*args)
        return "ok"
    except llmagentos.KernelError as e:
        return e.name
def spawn(name):
    pid = c.proc.spawn(["true"], name)
    c.proc.wait(pid, 30)
"""


def run(c, body: str, name: str | None = None, caps: list | None = None) -> str:
    pid = c.proc.spawn([PY, "-c", TRY + textwrap.dedent(body)], name, None, None, caps)
    st = c.proc.wait(pid, 60)
    out = c.proc.logs(pid)["data"].decode()
    assert st["exit_code"] == 0, out
    return out.strip()


def errno_of(fn, *args) -> str:
    try:
        fn(*args)
    except llmagentos.KernelError as e:
        return e.name
    return "ok"


def test_a_name_is_taken_up_only_by_its_owner_init_or_agent_adopt(shared_kernel):
    with shared_kernel.client() as c:
        # init's agent stores a secret under its name
        pid = c.proc.spawn([PY, "-c", TRY + "c.mem.put('secret', 's3cr3t')\n"
                                            "c.fs.write_file('/secret.txt', 's3cr3t')"],
                           "own-alice")
        assert c.proc.wait(pid, 30)["exit_code"] == 0
        # an unnamed process (spawned by init, with proc.spawn) may not become it,
        # by spawn or by attach; a new name becomes its own, for its own life
        out = run(c, """
            print(attempt(spawn, "own-alice"), attempt(c.proc.attach, "own-alice"),
                  attempt(spawn, "own-bob"), attempt(spawn, "own-bob"))
        """)
        assert out.split() == ["EACCES", "EACCES", "ok", "ok"]
        # that spawner is gone: another unnamed process cannot pick up its name
        assert run(c, 'print(attempt(spawn, "own-bob"))') == "EACCES"
        # init may always; so may a holder of agent.adopt, which init grants by name
        assert errno_of(lambda: c.proc.wait(c.proc.spawn(["true"], "own-bob"), 30)) == "ok"
        caps = capmod.default_child(["*"]) + ["agent.adopt"]
        assert run(c, """
            import sys
            pid = c.proc.spawn([sys.executable, "-c", "import llmagentos; "
                                "print(llmagentos.connect().mem.get('secret')['value'])"],
                               "own-alice")
            c.proc.wait(pid, 30)
            print(c.proc.logs(pid)["data"].decode().strip())
        """, caps=caps) == "s3cr3t"


def test_a_named_agent_owns_the_names_it_creates(shared_kernel):
    with shared_kernel.client() as c:
        body = 'print(attempt(spawn, "own-dave"))'
        assert run(c, body, name="own-carol") == "ok"  # new: owned by agent:own-carol
        assert run(c, body, name="own-carol") == "ok"  # a later own-carol is that owner
        assert run(c, body) == "EACCES"  # an unnamed process is not
        assert run(c, body, name="own-erin") == "EACCES"  # nor another agent


def test_agent_adopt_is_privileged_and_known():
    assert "agent.adopt" in capmod.KNOWN and "agent.adopt" in capmod.PRIVILEGED
    assert "agent.adopt" not in capmod.default_child(["*"])
    assert "agent.adopt" not in capmod.default_child(["agent.adopt", "proc.spawn"])


def test_a_held_name_is_busy_for_everyone(shared_kernel):
    with shared_kernel.client() as c:
        holder = c.proc.spawn(["sleep", "30"], "busy-x")
        try:
            for fn, args in ((c.proc.spawn, (["true"], "busy-x")), (c.proc.attach, ("busy-x",))):
                with pytest.raises(llmagentos.KernelError) as e:
                    fn(*args)
                assert e.value.name == "EBUSY" and f"pid {holder}" in e.value.message
            # not even the holder with agent.adopt can make a second process with its name
            adopt = capmod.default_child(["*"]) + ["agent.adopt"]
            assert run(c, 'print(attempt(spawn, "busy-y"))', name="busy-y",
                       caps=adopt) == "EBUSY"
        finally:
            c.proc.kill(holder, "SIGKILL")
            c.proc.wait(holder, 30)
        # once it has exited, the name is free again (for its owner)
        kid = c.proc.spawn(["true"], "busy-x")
        assert c.proc.wait(kid, 30)["exit_code"] == 0
        # an attached holder counts too
        agent = c.proc.attach("busy-z")
        assert errno_of(c.proc.spawn, ["true"], "busy-z") == "EBUSY"
        c.proc.kill(agent["pid"], "SIGKILL")
        assert errno_of(lambda: c.proc.wait(c.proc.spawn(["true"], "busy-z"), 30)) == "ok"


@pytest.mark.parametrize("bad", ["", "a\x00b", "line\nbreak", "tab\there", "\x7f",
                                 "zero\u200bwidth", "bidi\u202eflip", "x" * 129, 7, ["a"]])
def test_one_rule_for_names(shared_kernel, bad):
    with shared_kernel.client() as c:
        assert errno_of(c.proc.spawn, ["true"], bad) == "EINVAL"
        assert errno_of(c.proc.attach, bad) == "EINVAL"


@pytest.mark.parametrize("good", ["x" * 128, "équipe 7", "名前", "a:b/c..d%e"])
def test_names_next_to_the_rule_are_fine(shared_kernel, good):
    with shared_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", TRY + "c.fs.write_file('/me', 'here')"], good)
        assert c.proc.wait(pid, 30)["exit_code"] == 0
        assert c.proc.stat(c.proc.attach(good)["pid"])["agent"] == good


def test_distinct_names_never_share_storage(shared_kernel):
    names = ["team lead", "team_lead", "team%20lead", "team.lead", "team-lead", "team/lead",
             "..", "."]
    write = """
        import sys
        me = sys.argv[1]
        c.fs.write_file("/who.txt", me)
        c.mem.put("who", me)
        c.tool.call("kv.set", {"key": "who", "value": me})
        c.ctx.append("user", me)
    """
    read = """
        print(json.dumps([c.fs.read_file("/who.txt").decode(), c.mem.get("who")["value"],
                          c.tool.call("kv.get", {"key": "who"})["value"],
                          [m["content"] for m in c.ctx.read(0, None, True)]]))
    """
    with shared_kernel.client() as c:
        for phase in (write, read):
            for n in names:
                pid = c.proc.spawn([PY, "-c", TRY + textwrap.dedent(phase), n], n)
                st = c.proc.wait(pid, 30)
                out = c.proc.logs(pid)["data"].decode()
                assert st["exit_code"] == 0, out
                if phase is read:
                    assert json.loads(out) == [n, n, n, [n]]
    roots = os.listdir(shared_kernel.state_dir / "fs")
    assert all(path_name(f"agent:{n}") in roots for n in names)


def test_path_name_is_injective_and_safe():
    texts = ["agent:team lead", "agent:team_lead", "agent:team%20lead", "agent:team%2520lead",
             "agent:.", "agent:..", "agent:/", "agent:a/b", "agent:A", "agent:a", "pid:3",
             "agent:pid:3", "agent:\u00e9", "agent:e\u0301", "agent:~", "agent:%7E", "",
             "agent:" + "x" * 194, "agent:" + "x" * 195, "agent:" + "é" * 128,
             "agent:" + "é" * 127 + "e", "agent:" + "x" * 128, "agent:" + "y" * 128]
    out = [path_name(t) for t in texts]
    assert len(set(out)) == len(texts)
    for t, p in zip(texts, out):
        assert len(p.encode()) <= 255 and p not in (".", "..")
        assert set(p) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                             "0123456789_-%~")
    assert path_name("agent:team lead") == "agent%3Ateam%20lead"
    # apart on a case-insensitive file system too
    assert len({p.lower() for p in out}) == len(texts)
    assert path_name("pid:3").startswith(path_name("pid:"))
    assert not path_name("agent:pid:3").startswith(path_name("pid:"))


WRITER = TRY + """
import time
c.ctx.append("user", "secret ctx")
c.mem.put("k", "secret mem")
c.tool.call("kv.set", {"key": "k", "value": "secret kv"})
c.fs.write_file("/f.txt", "secret file")
ep = c.traj.begin("secret task")
print(json.dumps([c.proc.getpid(), ep]), flush=True)
time.sleep(60)
"""

READER = TRY + """
import sys
ep = int(sys.argv[1])
print(json.dumps([c.proc.getpid(), [m["content"] for m in c.ctx.read(0, None, True)],
                  attempt(c.mem.get, "k"), c.mem.list(),
                  attempt(c.tool.call, "kv.get", {"key": "k"}),
                  c.tool.call("kv.list", {})["keys"],
                  attempt(c.fs.read_file, "/f.txt"), c.fs.listdir("/"),
                  attempt(c.traj.step, ep, "o", "a", 1.0)]))
"""


@pytest.mark.parametrize("how", ["crash", "clean"])
def test_unnamed_state_is_gone_for_the_next_pid_n(tmp_path, how):
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            pid = c.proc.spawn([PY, "-c", WRITER])
            out = wait_for(lambda: c.proc.logs(pid)["data"], timeout=30)
            assert json.loads(out)[0] == pid
            ep = json.loads(out)[1]
            os_pid = c.proc.stat(pid)["os_pid"]
        if how == "crash":  # no exit hooks run: the next boot must clean up
            k.proc.send_signal(signal.SIGKILL)
            k.proc.wait()
            psutil.Process(os_pid).kill()  # the orphan outlives its kernel
        else:
            k.stop()
    finally:
        k.stop()
    k2 = boot_kernel(tmp_path)
    try:
        with k2.client() as c:
            new = c.proc.spawn([PY, "-c", READER, str(ep)])
            assert new == pid  # pids restart each boot: the same pid N
            c.proc.wait(new, 30)
            got = json.loads(c.proc.logs(new)["data"])
        assert got[0] == pid
        assert got[1] == []  # no old context
        assert got[2:4] == ["ENOENT", []]  # no old long-term memory
        assert got[4:6] == ["ENOENT", []]  # no old kv keys
        assert got[6] == "ENOENT" and [e["name"] for e in got[7]] == ["shared"]  # no old files
        assert got[8] in ("EINVAL", "EACCES")  # the old episode is not its to write
        # and the reader's own state went with it (released by a background task)
        wait_for(lambda: not any(n.startswith(path_name("pid:"))
                                 for n in os.listdir(k2.state_dir / "fs")))
    finally:
        k2.stop()
