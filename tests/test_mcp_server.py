"""The MCP server face with the official `mcp` client SDK: `llmos mcp serve
--key KEY` over stdio, and the same server as a streamable-HTTP ASGI app
served by Hypercorn's trio worker. The key is a process token (proc.attach)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mcp_types as mt
import pytest
import trio
from conftest import wait_for
from mcp import Client, StdioServerParameters

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
CALC_AND_FILES = ["tool:calc.*", "fs.read", "fs.write"]


def serve_params(kernel, key: str) -> StdioServerParameters:
    """`llmos mcp serve` as an MCP host starts it; the key comes by environment."""
    return StdioServerParameters(command=PY, args=["-m", "llmagentos.cli", "mcp", "serve"],
                                 env={"LLMAGENTOS_RUN_DIR": str(kernel.run_dir),
                                      "LLMAGENTOS_KEY": key})


def attach(kernel, name: str, caps: list[str]) -> dict:
    with kernel.client() as shell:
        return shell.proc.attach(name, caps)


def text(res: mt.CallToolResult) -> str:
    return "\n".join(b.text for b in res.content if b.type == "text")


async def test_tools_files_and_errors_through_stdio(shared_kernel):
    key = attach(shared_kernel, "mcp-face", CALC_AND_FILES)
    async with Client(serve_params(shared_kernel, key["token"])) as mcp:
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        # exactly what the process may call: its tools, and its files by its fs caps
        assert "calc.eval" in tools
        assert {"fs_read", "fs_write", "fs_list"} <= set(tools)
        assert not [n for n in tools if n.split(".")[0] in ("kv", "exec", "files", "clock")]
        with shared_kernel.client() as shell:
            kernel_schema = shell.tool.describe("calc.eval")["schema"]
        assert tools["calc.eval"].input_schema == kernel_schema

        res = await mcp.call_tool("calc.eval", {"expression": "2 + 3 * 4"})
        assert not res.is_error and res.structured_content["value"] == 14

        res = await mcp.call_tool("fs_write", {"path": "notes/todo.txt", "text": "milk\n"})
        assert not res.is_error and res.structured_content["bytes"] == 5
        res = await mcp.call_tool("fs_write", {"path": "notes/todo.txt", "text": "eggs\n",
                                               "append": True})
        assert not res.is_error
        res = await mcp.call_tool("fs_read", {"path": "notes/todo.txt"})
        assert not res.is_error and text(res) == "milk\neggs\n"
        res = await mcp.call_tool("fs_list", {"path": "notes"})
        assert [e["name"] for e in res.structured_content["entries"]] == ["todo.txt"]

        # bad input: each a tool error with its errno; the session goes on
        for name, args, errno in [
            ("calc.eval", {"expr": "1"}, "EINVAL"),  # the kernel's schema check
            ("calc.eval", {"expression": 10**30}, "EINVAL"),  # past what the wire carries
            ("fs_read", {"path": 3}, "EINVAL"),
            ("fs_write", {"path": "a", "text": "x", "mode": "w"}, "EINVAL"),  # unknown field
            ("fs_read", {"path": "../../etc/passwd"}, "EACCES"),  # out of the sandbox
            ("fs_read", {"path": "nope.txt"}, "ENOENT"),
            ("no.such_tool", {}, "ENOENT"),
        ]:
            res = await mcp.call_tool(name, args)
            assert res.is_error, (name, args)
            assert res.structured_content["errno"] == errno, (name, args, text(res))
            assert text(res).startswith(f"[{errno}] ")
        res = await mcp.call_tool("calc.eval", {"expression": "6*7"})
        assert res.structured_content["value"] == 42

    with shared_kernel.client() as shell:  # every call went through the audit log
        rows = shell.sys.audit(key["pid"], None, None, None, 1000)
    calls = [r["call"] for r in rows]
    assert "tool.call" in calls and "fs.write_file" in calls


async def test_a_tool_the_key_lacks_is_eacces(shared_kernel):
    key = attach(shared_kernel, "mcp-nocalc", ["fs.read"])
    async with Client(serve_params(shared_kernel, key["token"])) as mcp:
        names = {t.name for t in (await mcp.list_tools()).tools}
        assert "calc.eval" not in names and "fs_write" not in names
        assert {"fs_read", "fs_list"} <= names
        res = await mcp.call_tool("calc.eval", {"expression": "1 + 1"})
        assert res.is_error and res.structured_content["errno"] == "EACCES"
        assert "tool:calc.eval" in text(res)
        res = await mcp.call_tool("fs_write", {"path": "x.txt", "text": "no"})
        assert res.is_error and res.structured_content["errno"] == "EACCES"
    with shared_kernel.client() as shell:
        denied = shell.sys.audit(key["pid"], "tool.call", "EACCES", None, 10)
    assert denied and denied[-1]["detail"] == "calc.eval"


def test_a_bad_key_ends_the_server_with_eacces(shared_kernel):
    env = {**shared_kernel.env(), "LLMAGENTOS_KEY": "not-a-key"}
    out = subprocess.run([PY, "-m", "llmagentos.cli", "mcp", "serve"], env=env,
                         stdin=subprocess.PIPE, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "EACCES" in out.stderr and out.stdout == ""


def test_no_key_is_a_usage_error(monkeypatch, capsys):
    """Never the shell user's own token (init, every capability) by default."""
    from llmagentos.cli import main

    monkeypatch.delenv("LLMAGENTOS_KEY", raising=False)
    assert main(["mcp", "serve"]) == 2
    assert "needs a key" in capsys.readouterr().err
    assert main(["mcp", "serve", "--key", "k", "--timeout", "0"]) == 2


async def test_streamable_http_app_serves_the_same_process(shared_kernel):
    from llmagentos.mcp_server import streamable_http_app

    key = attach(shared_kernel, "mcp-http", ["tool:calc.*"])
    app = streamable_http_app(key["token"], run_dir=shared_kernel.run_dir)
    async with trio.open_nursery() as nursery:
        url = await serving(nursery, app) + "/mcp"
        async with Client(url) as mcp:
            names = {t.name for t in (await mcp.list_tools()).tools}
            assert "calc.eval" in names and "fs_read" not in names
            res = await mcp.call_tool("calc.eval", {"expression": "2 ** 10"})
            assert not res.is_error and res.structured_content["value"] == 1024
            res = await mcp.call_tool("kv.get", {"key": "k"})
            assert res.is_error and res.structured_content["errno"] == "EACCES"
        nursery.cancel_scope.cancel()


async def test_bridged_mcp_tools_are_served_with_their_errnos(shared_kernel):
    """Drivers and bridged MCP servers are tools like any other: a host reaches
    examples/mcp_server.py through the face, the kernel and the MCP bridge, and
    an errno the far server names comes back to it as that errno."""
    with shared_kernel.client() as shell:
        bridge = shell.proc.spawn([PY, "-m", "llmagentos.mcp_bridge", "--namespace", "far",
                                   "--", PY, str(ROOT / "examples" / "mcp_server.py")],
                                  name="mcp:far")
        try:
            wait_for(lambda: shell.tool.list("far") or
                     shell.proc.stat(bridge)["state"] == "ZOMBIE", 30)
            assert shell.tool.list("far"), shell.proc.logs(bridge)["data"].decode()[-3000:]
            key = shell.proc.attach("mcp-far", ["tool:far.*"])
            async with Client(serve_params(shared_kernel, key["token"])) as mcp:
                tools = {t.name: t for t in (await mcp.list_tools()).tools}
                assert {"far.add", "far.capital"} <= set(tools) and "calc.eval" not in tools
                assert tools["far.add"].input_schema["required"] == ["a", "b"]
                res = await mcp.call_tool("far.add", {"a": 2, "b": 40})
                assert not res.is_error and res.structured_content == {"result": 42}
                res = await mcp.call_tool("far.capital", {"country": "Mars"})
                assert res.is_error and res.structured_content["errno"] == "ENOENT"
        finally:
            shell.proc.kill(bridge, "SIGTERM")
            shell.proc.wait(bridge, 15)


async def serving(nursery: trio.Nursery, app) -> str:
    """Serve an ASGI app with Hypercorn's trio worker on a free port; its URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    binds = await nursery.start(serve, app, config)
    return binds[0]


async def test_streamable_http_bearer_key_picks_the_process(shared_kernel):
    """Without a fixed key, each HTTP request runs as the process its bearer
    key names: what a gateway mounts at /mcp. No key or an unknown one is 401
    before the MCP layer sees the request; a killed process's key stops working."""
    import httpx
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from llmagentos.mcp_server import streamable_http_app

    calc = attach(shared_kernel, "mcp-bearer-calc", ["tool:calc.*"])
    files = attach(shared_kernel, "mcp-bearer-files", ["fs.read"])
    app = streamable_http_app(run_dir=shared_kernel.run_dir)

    async def session(url: str, key: str):
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
        return http, Client(streamable_http_client(url, http_client=http))

    async with trio.open_nursery() as nursery:
        url = await serving(nursery, app) + "/mcp"
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}}
        hdrs = {"accept": "application/json, text/event-stream"}
        async with httpx.AsyncClient() as raw:
            for auth in (None, "Bearer not-a-key", "Basic abc", "Bearer", "bearer  x y"):
                h = hdrs if auth is None else {**hdrs, "authorization": auth}
                r = await raw.post(url, json=init, headers=h)
                assert r.status_code == 401, (auth, r.text)
                assert r.json()["error"]["errno"] == "EACCES"

        for key, allowed, denied in ((calc, "calc.eval", "fs_read"),
                                     (files, "fs_read", "calc.eval")):
            http, client = await session(url, key["token"])
            async with http, client as mcp:
                names = {t.name for t in (await mcp.list_tools()).tools}
                assert allowed in names and denied not in names
                res = await mcp.call_tool(denied, {"expression": "1", "path": "x"}
                                          if denied == "calc.eval" else {"path": "x"})
                assert res.is_error and res.structured_content["errno"] == "EACCES"

        http, client = await session(url, calc["token"])
        async with http, client as mcp:
            res = await mcp.call_tool("calc.eval", {"expression": "7 * 6"})
            assert res.structured_content["value"] == 42
            with shared_kernel.client() as shell:  # revoke: the key's process ends
                shell.proc.kill(calc["pid"], "SIGKILL")
            res = await mcp.call_tool("calc.eval", {"expression": "1"})
            assert res.is_error and res.structured_content["errno"] == "ESRCH"
        async with httpx.AsyncClient() as raw:
            r = await raw.post(url, json=init,
                               headers={**hdrs, "authorization": f"Bearer {calc['token']}"})
            assert r.status_code == 401
        nursery.cancel_scope.cancel()


def test_the_server_ends_when_the_kernel_goes_away(tmp_path):
    """A host is not left talking to a server whose kernel is gone: it exits 1."""
    import json

    from conftest import boot_kernel

    k = boot_kernel(tmp_path)
    try:
        key = attach(k, "mcp-orphan", ["tool:calc.*"])
        server = subprocess.Popen([PY, "-m", "llmagentos.cli", "mcp", "serve",
                                   "--key", key["token"]], env=k.env(), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}}
        server.stdin.write(json.dumps(init) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        if not line:  # it ended before serving: say how
            server.wait(10)
            pytest.fail(f"mcp serve exited {server.returncode}: {server.stderr.read()[-2000:]}")
        assert json.loads(line)["id"] == 1  # serving, as the key
    finally:
        k.stop()
    try:
        assert server.wait(15) == 1
    finally:
        server.kill()
    assert "kernel closed the connection" in server.stderr.read()
