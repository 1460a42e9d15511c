"""The MCP bridge: mount an MCP server's tools in the kernel as a userland driver.

    llmos spawn --name mcp:demo -- \\
        python -m llmagentos.mcp_bridge --namespace demo -- python examples/mcp_server.py

The bridge starts the MCP server as its child over stdio (the official `mcp`
SDK's `stdio_client` and `ClientSession`, on anyio's trio backend so the
kernel connection shares the loop), lists its tools (`tools/list`) and
registers them as `<namespace>.<tool>`. Each `drv.request` becomes a
`tools/call`; the answer goes back with `drv.reply`:

- success: the structured content if the server sent one, else the text
  content joined by newlines (non-text blocks: a list of content maps); as
  for any driver, one over the kernel's frame limit is EMSGSIZE;
- `isError`: the error text as EINVAL when it reads as an argument-validation
  failure, ENOENT for an unknown tool, else EIO; a text carrying an errno
  name in brackets ("[ENOENT] no such city") picks that errno;
- an MCP/JSON-RPC error: by its code (invalid params EINVAL, method not found
  ENOSYS, timeout ETIMEDOUT, connection closed EIO, ...).

MCP tool names may use characters the kernel's names don't (upper case,
dots); they are lowercased and the rest mapped to "_", and the bridge keeps
the original to call. When the MCP server exits the bridge exits too (status
1), so the namespace disappears; when the kernel connection closes it stops
the server. The server inherits only the SDK's safe environment (HOME, PATH,
...) plus `--env KEY=VALUE`: not the kernel token.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from typing import Any

import anyio
import jsonschema
import mcp_types as mt
import trio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from llmagentos.syscalls.errno import ERRNO

from .aclient import AsyncClient
from .driver import own_process, reply, requests
from .errors import KernelError, sole_error
from .schema import SCHEMA_DIALECT

log = logging.getLogger("llmagentos.mcp_bridge")

KERNEL_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")  # the kernel's rule for names

# JSON-RPC / MCP error code -> errno name
CODE_ERRNO: dict[int, str] = {
    mt.INVALID_PARAMS: "EINVAL",
    mt.INVALID_REQUEST: "EINVAL",
    mt.METHOD_NOT_FOUND: "ENOSYS",
    mt.PARSE_ERROR: "EPROTO",
    mt.INTERNAL_ERROR: "EIO",
    mt.REQUEST_TIMEOUT: "ETIMEDOUT",
    mt.CONNECTION_CLOSED: "EIO",
}

_ERRNO_TAG = re.compile(r"\[(E[A-Z0-9]+)\]")
_VALIDATION = re.compile(r"validation error|invalid (argument|param)|field required|"
                         r"missing required", re.I)


# --- names and schemas ----------------------------------------------------------------

def kernel_tool_names(names: list[str]) -> dict[str, str]:
    """{kernel name: MCP name}, each kernel name valid for the kernel and unique."""
    out: dict[str, str] = {}
    for name in names:
        base = re.sub(r"[^a-z0-9_-]", "_", name.lower()).strip("_-") or "tool"
        if not base[0].isalpha():
            base = "t_" + base
        base = base[:60]
        candidate, n = base, 2
        while candidate in out:
            candidate, n = f"{base}_{n}", n + 1
        out[candidate] = name
    return out


def tool_entries(tools: list[mt.Tool]) -> tuple[list[dict], dict[str, str]]:
    """The `drv.register` tool list for MCP tools, and {kernel name: MCP name}.
    A tool whose input schema is not valid JSON Schema is left out (logged)."""
    names = kernel_tool_names([t.name for t in tools])
    by_mcp = {t.name: t for t in tools}
    entries, kept = [], {}
    for kname, mname in names.items():
        t = by_mcp[mname]
        schema = dict(t.input_schema or {"type": "object"})
        schema.setdefault("$schema", SCHEMA_DIALECT)
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as e:
            log.warning("MCP tool %r left out: its input schema is invalid: %s", mname, e.message)
            continue
        description = t.description or t.title or mname
        if kname != mname:
            description = f"{description} (MCP tool {mname!r})"
        entries.append({"name": kname, "description": description, "schema": schema})
        kept[kname] = mname
    return entries, kept


# --- results and errors ----------------------------------------------------------------

def _text_of(blocks: list[Any]) -> str:
    return "\n".join(getattr(b, "text", "") for b in blocks if getattr(b, "type", "") == "text")


def result_to_reply(result: mt.CallToolResult) -> tuple[Any, dict | None]:
    """(result, error) for drv.reply from an MCP tools/call result."""
    if result.is_error:
        text = _text_of(result.content) or "the MCP tool reported an error"
        tag = _ERRNO_TAG.search(text)
        if tag and tag.group(1) in ERRNO:
            name = tag.group(1)
        elif _VALIDATION.search(text):
            name = "EINVAL"
        elif text.startswith("Unknown tool"):
            name = "ENOENT"
        else:
            name = "EIO"
        return None, {"name": name, "message": text}
    if result.structured_content is not None:
        return result.structured_content, None
    if all(getattr(b, "type", "") == "text" for b in result.content):
        return _text_of(result.content), None
    return [b.model_dump(mode="json", by_alias=True, exclude_none=True)
            for b in result.content], None


def exception_to_reply(exc: BaseException) -> dict:
    """The drv.reply error for a failed tools/call."""
    if isinstance(exc, MCPError):
        name = CODE_ERRNO.get(exc.code, "EIO")
        return {"name": name, "message": f"MCP error {exc.code}: {exc.message}"}
    if isinstance(exc, (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError)):
        return {"name": "EIO", "message": f"the MCP server is gone: {exc!r}"}
    return {"name": "EIO", "message": f"{type(exc).__name__}: {exc}"}


# --- the bridge ----------------------------------------------------------------------------

class MCPBridge:
    """One MCP server over stdio, served as one kernel namespace."""

    def __init__(self, namespace: str, command: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None, call_timeout: float | None = None) -> None:
        if not command:
            raise ValueError("no MCP server command")
        if not KERNEL_NAME.match(namespace):
            raise ValueError(f"namespace {namespace!r} must match {KERNEL_NAME.pattern}")
        self.namespace = namespace
        self.params = StdioServerParameters(command=command[0], args=command[1:], env=env,
                                            cwd=cwd)
        self.call_timeout = call_timeout
        self.names: dict[str, str] = {}  # kernel name -> MCP name
        self.server_gone = False  # the MCP server exited
        self.stopping = False  # we were asked to stop (then its exit is expected)

    async def serve(self, client: AsyncClient | None = None, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the server, register its tools, serve until the kernel
        connection closes or the MCP server exits (then `server_gone` is true)."""
        async with stdio_client(self.params, errlog=sys.stderr) as (read, write):
            # Relay the server's messages through our own stream, to notice its end.
            relay_send, relay_recv = anyio.create_memory_object_stream(0)
            gone = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay, read, relay_send, gone)
                async with ClientSession(relay_recv, write) as session:
                    info = await session.initialize()
                    tools = await _list_tools(session)
                    log.info("MCP server %s: %d tools", info.server_info.name, len(tools))
                    entries, self.names = tool_entries(tools)
                    if client is None:
                        async with own_process(f"mcp:{self.namespace}") as c:
                            await self._serve(c, session, gone, task_status, entries)
                    else:
                        await self._serve(client, session, gone, task_status, entries)
                nursery.cancel_scope.cancel()

    async def _serve(self, client: AsyncClient, session: ClientSession, gone: trio.Event,
                     task_status: Any, entries: list[dict]) -> None:
        if not entries:
            raise ValueError("the MCP server offers no usable tools")
        await client.drv.register(self.namespace, entries)
        log.info("serving %s.{%s}", self.namespace, ",".join(e["name"] for e in entries))
        async with trio.open_nursery() as nursery:
            task_status.started()

            async def watch_server() -> None:
                await gone.wait()
                self.server_gone = True
                if not self.stopping:
                    log.error("the MCP server exited; unregistering %r", self.namespace)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_server)
            async for req_id, name, args, _caller in requests(client):
                nursery.start_soon(self._call, client, session, req_id, name, args or {})
            nursery.cancel_scope.cancel()  # the kernel connection closed

    async def _call(self, client: AsyncClient, session: ClientSession, req_id: int,
                    name: str, args: dict) -> None:
        short = name.split(".", 1)[1] if "." in name else name
        mcp_name = self.names.get(short)
        result, error = None, None
        if mcp_name is None:
            error = {"name": "ENOENT", "message": f"no MCP tool behind {name!r}"}
        else:
            try:
                res = await session.call_tool(mcp_name, args,
                                              read_timeout_seconds=self.call_timeout)
                result, error = result_to_reply(res)
            except Exception as e:  # every failure is answered: the caller must not hang
                error = exception_to_reply(e)
        await reply(client, req_id, name, result, error)


async def _relay(src: Any, dst: Any, gone: trio.Event) -> None:
    try:
        async with dst:
            async for item in src:
                await dst.send(item)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass
    finally:
        gone.set()


async def _list_tools(session: ClientSession) -> list[mt.Tool]:
    tools: list[mt.Tool] = []
    cursor: str | None = None
    for _ in range(100):  # a server that pages forever must not hang the bridge
        params = mt.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


# --- the program ---------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llmagentos.mcp_bridge",
        description="Serve an MCP server's tools (stdio) as a kernel tool namespace.")
    p.add_argument("--namespace", "-n", required=True, help="kernel namespace, e.g. 'github'")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the MCP server (besides HOME, PATH, ...)")
    p.add_argument("--cwd", help="the MCP server's working directory")
    p.add_argument("--call-timeout", type=float, default=None,
                   help="seconds a tools/call may take at the MCP server (default: the "
                        "caller's tool.call timeout rules)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    ns = p.parse_args(argv)
    if ns.command and ns.command[0] == "--":
        ns.command = ns.command[1:]
    if not ns.command:
        p.error("the MCP server command is missing: ... -- CMD ARGS")
    for item in ns.env:
        if "=" not in item:
            p.error(f"--env {item!r}: expected KEY=VALUE")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s mcp_bridge %(levelname)s %(message)s")
    env = dict(item.split("=", 1) for item in ns.env) or None
    try:
        bridge = MCPBridge(ns.namespace, ns.command, env=env, cwd=ns.cwd,
                           call_timeout=ns.call_timeout)
    except ValueError as e:
        print(f"mcp_bridge: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            def on_signal(signum: int, frame: Any) -> None:
                # SIGTERM (llmos kill, kernel shutdown) reaches the MCP server too,
                # so its exit is expected from now on; stop serving, cleanly.
                bridge.stopping = True
                token.run_sync_soon(scope.cancel)  # signal-safe

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            await bridge.serve()

    try:
        anyio.run(run, backend="trio")
    except Exception as group:
        e = sole_error(group)
        if isinstance(e, KernelError):
            print(f"mcp_bridge: {e}", file=sys.stderr)
        elif isinstance(e, (OSError, MCPError, ValueError)):
            print(f"mcp_bridge: the MCP server failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
        else:
            raise
        return 1
    return 1 if bridge.server_gone and not bridge.stopping else 0


if __name__ == "__main__":
    sys.exit(main())
