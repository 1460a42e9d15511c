"""Tools, files and exec through the kernel: capabilities, schemas, quotas,
the sandbox seen from real processes, the audit trail."""

import json
import os
import textwrap

import pytest
from conftest import PY, boot_kernel

import llmagentos
from llmagentos.drivers.execbox import exec_uid


def run(c, body, *, name=None, caps=None, limits=None):
    pid = c.proc.spawn([PY, "-c", textwrap.dedent(body)], name, None, None, caps, limits)
    st = c.proc.wait(pid, 60)
    out = c.proc.logs(pid)["data"].decode()
    assert st["exit_code"] == 0, out
    return out


ERR = """
import json, llmagentos
c = llmagentos.connect()
def err(fn, *a):
    try:
        return fn(*a)
    except llmagentos.KernelError as e:
        return e.name
"""


def test_tool_list_has_schemas_and_calls_work(shared_kernel):
    with shared_kernel.client() as c:
        tools = {t["name"]: t for t in c.tool.list()}
        assert {"calc.eval", "clock.now", "kv.get", "files.read", "exec.run"} <= set(tools)
        assert tools["calc.eval"]["schema"]["required"] == ["expression"]
        assert c.tool.call("calc.eval", {"expression": "(2 + 3) * 7"})["value"] == 35
        assert c.tool.describe("kv.set")["schema"]["type"] == "object"
        with pytest.raises(FileNotFoundError):
            c.tool.call("no.such", {})
        with pytest.raises(ValueError, match="'expression' is a required property"):
            c.tool.call("calc.eval", {"expr": "1"})
        with pytest.raises(ValueError, match="expression: 5 is not of type 'string'"):
            c.tool.call("calc.eval", {"expression": 5})
        with pytest.raises(ValueError, match="division by zero"):
            c.tool.call("calc.eval", {"expression": "1/0"})


def test_tool_capabilities(shared_kernel):
    body = ERR + """
print(sorted(t["name"] for t in c.tool.list()))
print(err(c.tool.call, "calc.eval", {"expression": "1+1"})["value"])
print(err(c.tool.call, "kv.set", {"key": "a", "value": 1}))
"""
    with shared_kernel.client() as c:
        out = run(c, body, caps=["tool:calc.*"]).splitlines()
    assert out == ["['calc.eval']", "2", "EACCES"]


def test_exec_needs_exec_capability_besides_the_tool(shared_kernel):
    body = ERR + """
print(err(c.tool.call, "exec.run", {"lang": "python", "code": "print(1)"}))
"""
    with shared_kernel.client() as c:
        assert run(c, body, caps=["tool:*", "fs.read", "fs.write"]).strip() == "EACCES"


def test_tool_call_quota(shared_kernel):
    body = ERR + """
for i in range(4):
    r = err(c.tool.call, "clock.now", {})
    print(r if isinstance(r, str) else "ok")
print(c.proc.stat()["usage"]["tool_calls"])
"""
    with shared_kernel.client() as c:
        out = run(c, body, limits={"tool_calls": 3}).split()
    assert out == ["ok", "ok", "ok", "EDQUOT", "3"]


def test_exec_runs_isolated_in_the_sandbox(shared_kernel):
    body = ERR + """
c.fs.write_file("/data.txt", "41")
r = c.tool.call("exec.run", {"lang": "python", "code": "n = int(open('data.txt').read())\\n"
                               "open('out.txt', 'w').write(str(n + 1))\\nimport os\\n"
                               "print(os.getuid(), os.path.exists('/work'))"})
print(json.dumps(r))
print(c.fs.read_file("/out.txt").decode())
r = c.tool.call("exec.run", {"lang": "python", "code": "while True: pass", "timeout": 1})
print(r["timed_out"] or r["signal"] is not None)
print(c.proc.getpid())
"""
    with shared_kernel.client() as c:
        out = run(c, body).splitlines()
    r = json.loads(out[0])
    # the process's own uid, not one shared by every agent
    assert r["exit_code"] == 0 and r["stdout"].split()[0] == str(exec_uid(int(out[3])))
    if r["isolation"] == "container":
        assert r["stdout"].split()[1] == "False"  # the host tree is not visible
    assert out[1] == "42" and out[2] == "True"


def test_each_process_has_its_own_root_and_shared_is_by_capability(shared_kernel):
    writer = ERR + """
c.fs.write_file("/secret.txt", "mine")
print(err(c.fs.write_file, "/shared/x.txt", "no"))
print(sorted(e["name"] for e in c.fs.listdir("/")))
"""
    reader = ERR + """
print(err(c.fs.read_file, "/secret.txt"))
print(err(c.fs.write_file, "/shared/team.txt", "hello team"))
"""
    with shared_kernel.client() as c:
        assert run(c, writer).split() == ["EROFS", "['secret.txt',", "'shared']"]
        assert run(c, reader, caps=["fs.read", "fs.write", "fs.shared"]).split() == \
            ["ENOENT", "10"]


def test_fs_needs_capabilities(shared_kernel):
    body = ERR + """
print([e["name"] for e in c.fs.listdir("/")])
print(err(c.fs.write_file, "/a", "x"))
print(err(c.fs.open, "/a", "w"))
"""
    with shared_kernel.client() as c:
        assert run(c, body, caps=["fs.read"]).split() == ["['shared']", "EACCES", "EACCES"]


def test_escapes_through_the_kernel(shared_kernel, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("top secret")
    body = ERR + f"""
for p in ["../x", "/../../etc/passwd", {str(secret)!r}, "a/../../b", "/shared/../../x",
          "evil-link/secret", "evil-link"]:
    print(err(c.fs.read_file, p))
print(err(c.fs.rename, "/ok.txt", "../ok.txt"))
"""
    with shared_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", "import time; time.sleep(0.5)\n" + textwrap.dedent(body)],
                           "escaper")
        root = shared_kernel.state_dir / "fs" / "agent_escaper"
        root.mkdir(parents=True, exist_ok=True)
        os.symlink(tmp_path, root / "evil-link")  # planted by a hostile co-tenant
        c.proc.wait(pid, 30)
        out = c.proc.logs(pid)["data"].decode().split()
    assert len(out) == 8 and all(e in ("EACCES", "ENOENT", "ELOOP", "ENOTDIR") for e in out)
    assert "top" not in " ".join(out) and secret.read_text() == "top secret"


def test_named_agent_files_survive_restart_unnamed_do_not(tmp_path):
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            run(c, ERR + 'c.fs.write_file("/diary.txt", "day 1")', name="diarist")
            run(c, ERR + 'c.fs.write_file("/tmp.txt", "gone")')
    finally:
        k.stop()
    names = sorted(p.name for p in (k.state_dir / "fs").iterdir())
    assert names == ["agent%3Adiarist"]  # names.path_name("agent:diarist")
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            assert run(c, ERR + 'print(c.fs.read_file("/diary.txt").decode())',
                       name="diarist").strip() == "day 1"
    finally:
        k.stop()


def test_tool_calls_are_audited(shared_kernel):
    with shared_kernel.client() as c:
        c.tool.call("clock.now", {})
        with pytest.raises(ValueError):
            c.tool.call("calc.eval", {})
        rows = c.sys.audit(1, "tool.call", None, None, 2)
    assert [(r["detail"], r["errno"]) for r in rows] == [("clock.now", None),
                                                         ("calc.eval", "EINVAL")]
    assert llmagentos
