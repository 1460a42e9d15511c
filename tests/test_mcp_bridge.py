"""The MCP bridge: an MCP server's tools (examples/mcp_server.py, over stdio
with the official SDK) mounted in a real kernel as a namespace, served by the
bridge as a kernel process."""

from __future__ import annotations

import sys
from pathlib import Path

import mcp_types as mt
import psutil
import pytest
from conftest import wait_for
from mcp import MCPError

from llmagentos import ERRORS
from llmagentos.mcp_bridge import (
    exception_to_reply,
    kernel_tool_names,
    parse_args,
    result_to_reply,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SERVER = str(ROOT / "examples" / "mcp_server.py")


def _text(t: str) -> mt.TextContent:
    return mt.TextContent(type="text", text=t)


# --- mapping, no kernel ------------------------------------------------------------------

def test_mcp_tool_names_become_kernel_names():
    assert kernel_tool_names(["add", "getWeather", "files.read", "files_read", "9lives"]) == {
        "add": "add", "getweather": "getWeather", "files_read": "files.read",
        "files_read_2": "files_read", "t_9lives": "9lives"}


def test_results_map_to_replies():
    structured = mt.CallToolResult(content=[_text("5")], structured_content={"result": 5})
    assert result_to_reply(structured) == ({"result": 5}, None)
    text = mt.CallToolResult(content=[_text("one"), _text("two")])
    assert result_to_reply(text) == ("one\ntwo", None)
    image = mt.CallToolResult(content=[mt.ImageContent(type="image", data="AAAA",
                                                       mime_type="image/png")])
    assert result_to_reply(image)[0] == [{"type": "image", "data": "AAAA",
                                          "mimeType": "image/png"}]


def test_tool_errors_map_to_errnos():
    def err(text: str) -> dict:
        return result_to_reply(mt.CallToolResult(content=[_text(text)], is_error=True))[1]

    assert err("Error executing tool x: division by zero") == {
        "name": "EIO", "message": "Error executing tool x: division by zero"}
    assert err("Error executing tool x: 1 validation error for xArguments")["name"] == "EINVAL"
    assert err("Unknown tool: nope")["name"] == "ENOENT"
    assert err("Error executing tool x: [EACCES] not yours")["name"] == "EACCES"
    assert err("[EBOGUS] unknown tag")["name"] == "EIO"


def test_protocol_errors_map_to_errnos():
    assert exception_to_reply(MCPError(mt.INVALID_PARAMS, "odd")) == {
        "name": "EINVAL", "message": "MCP error -32602: odd"}
    assert exception_to_reply(MCPError(mt.METHOD_NOT_FOUND, "x"))["name"] == "ENOSYS"
    assert exception_to_reply(MCPError(mt.REQUEST_TIMEOUT, "x"))["name"] == "ETIMEDOUT"
    assert exception_to_reply(MCPError(mt.CONNECTION_CLOSED, "x"))["name"] == "EIO"
    assert exception_to_reply(RuntimeError("x"))["name"] == "EIO"


def test_command_line():
    ns = parse_args(["--namespace", "demo", "--env", "A=1", "--", "python", "s.py", "--flag"])
    assert ns.namespace == "demo" and ns.command == ["python", "s.py", "--flag"]
    assert ns.env == ["A=1"]
    with pytest.raises(SystemExit):
        parse_args(["--namespace", "demo"])


# --- the bridge as a kernel process -------------------------------------------------------

def _spawn_bridge(c, namespace: str, server: str = SERVER) -> int:
    pid = c.proc.spawn([PY, "-m", "llmagentos.mcp_bridge", "--namespace", namespace, "--",
                        PY, server], name=f"mcp:{namespace}")
    try:
        wait_for(lambda: c.tool.list(namespace) or c.proc.stat(pid)["state"] == "ZOMBIE", 30)
    except AssertionError:
        pass
    assert c.tool.list(namespace), c.proc.logs(pid)["data"].decode()[-3000:]
    return pid


@pytest.fixture(scope="module")
def demo(shared_kernel):
    c = shared_kernel.client()
    pid = _spawn_bridge(c, "demo")
    yield c, pid
    c.close()


def test_the_servers_tools_are_listed_with_their_schemas(demo):
    c, pid = demo
    tools = {t["name"]: t for t in c.tool.list("demo")}
    assert set(tools) == {"demo.add", "demo.echo", "demo.midpoint", "demo.divide",
                          "demo.capital", "demo.even", "demo.fail"}
    add = tools["demo.add"]
    assert add["driver"] == pid and add["description"] == "Add two integers."
    assert add["schema"]["required"] == ["a", "b"]
    assert add["schema"]["properties"]["a"]["type"] == "integer"
    assert tools["demo.echo"]["schema"]["required"] == ["text"]  # times has a default
    assert "$defs" in tools["demo.midpoint"]["schema"]


def test_a_call_round_trip(demo):
    c, _ = demo
    assert c.tool.call("demo.add", {"a": 2, "b": 3}) == {"result": 5}
    assert c.tool.call("demo.echo", {"text": "hi", "times": 3}) == {"result": "hi hi hi"}
    assert c.tool.call("demo.midpoint", {"a": {"x": 0, "y": 0}, "b": {"x": 2, "y": 4}}) \
        == {"x": 1.0, "y": 2.0}


def test_errors_are_mapped_both_ways(demo):
    c, _ = demo
    # the kernel checks the MCP schema before the server sees the call
    with pytest.raises(ERRORS["EINVAL"], match="'x' is not of type 'integer'"):
        c.tool.call("demo.add", {"a": "x", "b": 1})
    # a tool error (isError) from the server
    with pytest.raises(ERRORS["EIO"], match="division by zero"):
        c.tool.call("demo.divide", {"a": 1, "b": 0})
    with pytest.raises(ERRORS["EIO"], match="Error executing tool fail"):
        c.tool.call("demo.fail")
    # ... naming its errno
    with pytest.raises(FileNotFoundError, match="no capital known for 'Mars'"):
        c.tool.call("demo.capital", {"country": "Mars"})
    assert c.tool.call("demo.capital", {"country": "Peru"}) == {"result": "Lima"}
    # a JSON-RPC error (invalid params) from the server
    with pytest.raises(ERRORS["EINVAL"], match="MCP error -32602: 3 is odd"):
        c.tool.call("demo.even", {"n": 3})
    assert c.tool.call("demo.even", {"n": 4}) == {"result": 2}


def test_when_the_server_dies_the_namespace_goes(shared_kernel):
    c = shared_kernel.client()
    pid = _spawn_bridge(c, "doomed")
    bridge = psutil.Process(c.proc.stat(pid)["os_pid"])
    (server,) = bridge.children()
    server.kill()
    assert c.proc.wait(pid, 20)["exit_code"] == 1
    assert c.tool.list("doomed") == []
    assert "the MCP server exited" in c.proc.logs(pid)["data"].decode()
    c.close()


def test_sigterm_stops_the_bridge_and_its_server(shared_kernel):
    c = shared_kernel.client()
    pid = _spawn_bridge(c, "brief")
    bridge = psutil.Process(c.proc.stat(pid)["os_pid"])
    (server,) = bridge.children()
    c.proc.kill(pid, "SIGTERM")
    status = c.proc.wait(pid, 20)
    assert status["exit_code"] == 0, (status, c.proc.logs(pid)["data"].decode()[-2000:])
    assert c.tool.list("brief") == []
    server.wait(10)  # gone too (psutil raises TimeoutExpired otherwise)
    c.close()


BULKY_SERVER = """
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult

server = MCPServer("bulky")


@server.tool()
def text(n: int) -> CallToolResult:
    \"\"\"n characters, as structured content only (half the bytes of text and structure).\"\"\"
    return CallToolResult(content=[], structured_content={"text": "x" * n})


@server.tool()
def add(a: int, b: int) -> int:
    \"\"\"Add two integers.\"\"\"
    return a + b


server.run()
"""


def test_an_oversized_result_is_emsgsize_and_the_bridge_keeps_serving(shared_kernel, tmp_path):
    # A result over the kernel's frame limit (16 MiB) must not go out as a reply:
    # the kernel would close the bridge's connection and unregister every tool.
    server = tmp_path / "bulky_server.py"
    server.write_text(BULKY_SERVER)
    c = shared_kernel.client()
    pid = _spawn_bridge(c, "bulky", str(server))
    with pytest.raises(ERRORS["EMSGSIZE"], match="the limit is"):
        c.tool.call("bulky.text", {"n": 17_000_000})
    assert c.tool.call("bulky.add", {"a": 2, "b": 3}) == {"result": 5}
    c.proc.kill(pid, "SIGTERM")
    status = c.proc.wait(pid, 20)
    assert status["exit_code"] == 0, (status, c.proc.logs(pid)["data"].decode()[-2000:])
    c.close()
