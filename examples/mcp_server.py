"""A tiny MCP server over stdio, for the MCP bridge (and its tests).

Mount its tools in a running kernel as ``demo.add``, ``demo.echo``, ...:

    llmos spawn --name mcp:demo --cap drv.register -- \\
        python -m llmagentos.mcp_bridge --namespace demo -- python examples/mcp_server.py

mcp 2.x renamed ``FastMCP`` to ``MCPServer``; the decorator API is the same.
"""

from __future__ import annotations

from mcp import MCPError
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import INVALID_PARAMS
from pydantic import BaseModel

server = MCPServer("llmagentos-demo")


class Point(BaseModel):
    x: float
    y: float


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(text: str, times: int = 1) -> str:
    """Repeat a text, separated by spaces."""
    return " ".join([text] * times)


@server.tool()
def midpoint(a: Point, b: Point) -> Point:
    """The point halfway between two points (a structured result)."""
    return Point(x=(a.x + b.x) / 2, y=(a.y + b.y) / 2)


@server.tool()
def divide(a: float, b: float) -> float:
    """Divide a by b; dividing by zero is a tool error."""
    if b == 0:
        raise ToolError("division by zero")
    return a / b


@server.tool()
def capital(country: str) -> str:
    """The capital of a country (a few only). An unknown country is a tool error
    whose text names an errno, "[ENOENT]", which the bridge passes on."""
    capitals = {"france": "Paris", "norway": "Oslo", "japan": "Tokyo", "peru": "Lima"}
    try:
        return capitals[country.strip().lower()]
    except KeyError:
        raise ToolError(f"[ENOENT] no capital known for {country!r}") from None


@server.tool()
def even(n: int) -> int:
    """Half of an even number; an odd one is refused with a JSON-RPC error
    (invalid params), not a tool result."""
    if n % 2:
        raise MCPError(INVALID_PARAMS, f"{n} is odd")
    return n // 2


@server.tool()
def fail(message: str = "something broke") -> str:
    """Always raises: an unexpected exception inside the tool."""
    raise RuntimeError(message)


if __name__ == "__main__":
    server.run()  # stdio
