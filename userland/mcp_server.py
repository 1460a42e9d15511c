"""The MCP server face: a kernel process's tools and files, served to MCP hosts.

    llmos mcp serve --key KEY        # stdio; an MCP host starts it as a server

The mirror of the MCP bridge (mcp_bridge.py), which mounts MCP servers in
the kernel. Here the kernel is the server: the face says hello with KEY (a
process token, as `proc.attach` returns it) and so *is* that process, with
its capabilities, limits, nice value and audit trail. Over the official
`mcp` SDK's low-level `Server` it offers:

- every tool the process may call: `tool.list` filtered by its capabilities
  (the kernel's own tools, userland drivers and bridged MCP servers), each
  with its JSON Schema as the MCP input schema, called through `tool.call`,
  so capabilities, schema checks, timeouts, quotas and the audit log apply;
- its sandboxed files as `fs_read`, `fs_write` and `fs_list`, through the
  `fs.*` syscalls, offered when it holds `fs.read` (`fs_write`: `fs.write`).

A kernel errno is a tool error result (`isError`) whose text is
"[ENAME] message" (what the MCP bridge reads back as that errno) and whose
structured content is {"errno", "message"}: a failed call never fails the
session. A name the process cannot see still goes to the kernel, which
answers ENOENT or EACCES as it would any syscall.

The SDK runs on anyio, the kernel client on trio: the face runs on anyio's
trio backend. One kernel connection serves one server: it is opened in the
server's lifespan (stdio: the session; streamable HTTP: the session
manager's run) and reaches the handlers as their lifespan context.
`streamable_http_app(key)` is the same server as an ASGI app, for an HTTP
gateway to mount at /mcp.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import jsonschema
import mcp_types as mt
import trio
from mcp import MCPError
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from starlette.applications import Starlette

from llmagentos.syscalls import caps as capmod

from .aclient import AsyncClient
from .errors import KernelError, exception_to_error
from .schema import SCHEMA_DIALECT

log = logging.getLogger("llmagentos.mcp_server")

SERVER_NAME = "llmagentos"
KEY_ENV = "LLMAGENTOS_KEY"  # where `llmos mcp serve` finds its key when --key is not given


@dataclass(frozen=True)
class FileTool:
    """A sandbox file tool: offered when the process holds ``cap``."""

    name: str
    cap: str
    description: str
    schema: dict
    read_only: bool


_PATH = {"type": "string", "minLength": 1, "maxLength": 4096,
         "description": "a path in your sandbox: your private root, or /shared/..."}


def _object(properties: dict, required: list[str]) -> dict:
    return {"$schema": SCHEMA_DIALECT, "type": "object", "properties": properties,
            "required": required, "additionalProperties": False}


FILE_TOOLS: dict[str, FileTool] = {t.name: t for t in (
    FileTool("fs_read", "fs.read", "Read a file from your sandbox: its text if it is UTF-8, "
             "else its bytes in base64.", _object({"path": _PATH}, ["path"]), True),
    FileTool("fs_write", "fs.write", "Create or replace (append: add to) a file in your "
             "sandbox; missing parent directories are made.",
             _object({"path": _PATH, "text": {"type": "string"},
                      "append": {"type": "boolean", "default": False}}, ["path", "text"]),
             False),
    FileTool("fs_list", "fs.read", "List a directory of your sandbox (default: its root).",
             _object({"path": {**_PATH, "default": "/"}}, []), True),
)}
_FILE_VALIDATORS = {name: jsonschema.Draft202012Validator(t.schema)
                    for name, t in FILE_TOOLS.items()}


# --- results --------------------------------------------------------------------------

def tool_result(value: Any) -> mt.CallToolResult:
    """A kernel tool's result as MCP content: a string as its text, anything else
    as JSON text; an object is also the structured content."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           default=_json_default)
    return mt.CallToolResult(content=[mt.TextContent(type="text", text=text)],
                             structured_content=value if isinstance(value, dict) else None)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):  # MessagePack bin: no JSON form but base64
        return {"base64": base64.b64encode(value).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON")


def error_result(exc: BaseException) -> mt.CallToolResult:
    """A failed call as a tool error result: "[ENAME] message", as the MCP bridge
    reads it back, and {errno, message} for a host that reads structure."""
    err = exception_to_error(exc)
    return mt.CallToolResult(
        content=[mt.TextContent(type="text", text=f"[{err['name']}] {err['message']}")],
        structured_content={"errno": err["name"], "message": err["message"]}, is_error=True)


# --- the face -----------------------------------------------------------------------

class ProcessFace:
    """What the MCP handlers act on: one kernel connection that is the key's process."""

    def __init__(self, client: AsyncClient, caps: list[str], timeout: float = 30.0) -> None:
        self.client = client
        self.caps = caps
        self.timeout = timeout  # each tool.call's, as the kernel bounds it (0..600 s)
        self.gone = False  # its process exited or its connection closed: open anew

    @classmethod
    @asynccontextmanager
    async def connect(cls, key: str, *, address: str | None = None,
                      run_dir: str | Path | None = None,
                      timeout: float = 30.0) -> AsyncIterator["ProcessFace"]:
        """Say hello with ``key``; EACCES for a bad or revoked one."""
        async with AsyncClient(address, key, run_dir=run_dir) as client:
            caps = (await client.proc.stat())["caps"]
            yield cls(client, caps, timeout)

    async def list_tools(self) -> list[mt.Tool]:
        """The process's tools, then its file tools; a kernel errno is an MCP error."""
        try:
            listed = await self.client.tool.list()
        except KernelError as e:
            if e.name in ("ESRCH", "ECONNRESET"):
                self.gone = True
            raise MCPError(mt.INTERNAL_ERROR, str(e)) from None
        tools = []
        for t in listed:
            schema = dict(t["schema"] or {})
            schema.setdefault("type", "object")
            tools.append(mt.Tool(name=t["name"], description=t["description"],
                                 input_schema=schema))
        for f in FILE_TOOLS.values():
            if capmod.covers(self.caps, f.cap):
                tools.append(mt.Tool(name=f.name, description=f.description,
                                     input_schema=f.schema,
                                     annotations=mt.ToolAnnotations(read_only_hint=f.read_only)))
        return tools

    async def call_tool(self, name: str, args: dict[str, Any] | None) -> mt.CallToolResult:
        """Every failure, the kernel's or the face's, is a tool error result."""
        try:
            if name in FILE_TOOLS:
                return tool_result(await self._file_tool(name, args or {}))
            return tool_result(await self.client.tool.call(name, args or {}, self.timeout))
        except (KernelError, ValueError, TypeError, OSError) as e:
            if isinstance(e, KernelError) and e.name in ("ESRCH", "ECONNRESET"):
                self.gone = True
            return error_result(e)

    async def _file_tool(self, name: str, args: dict[str, Any]) -> Any:
        err = jsonschema.exceptions.best_match(_FILE_VALIDATORS[name].iter_errors(args))
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "arguments"
            raise ValueError(f"{name}: {where}: {err.message}")
        fs = self.client.fs
        if name == "fs_list":
            return {"entries": await fs.listdir(args.get("path", "/"))}
        path = args["path"]
        if name == "fs_read":
            data = await fs.read_file(path)
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return {"path": path, "bytes": len(data), "encoding": "base64",
                        "data": base64.b64encode(data).decode()}
        parent = path.rstrip("/").rpartition("/")[0]
        if parent:  # as files.write: a host should not have to make directories first
            await fs.mkdir(parent, True)
        written = await fs.write_file(path, args["text"], args.get("append", False))
        return {"path": path, "bytes": written}


def mcp_server(key: str, *, address: str | None = None, run_dir: str | Path | None = None,
               timeout: float = 30.0) -> Server[ProcessFace]:
    """The MCP server that is the key's process. Its lifespan holds the kernel
    connection (opened when a transport starts it, closed when it ends)."""

    @asynccontextmanager
    async def lifespan(_: Server[ProcessFace]) -> AsyncIterator[ProcessFace]:
        async with ProcessFace.connect(key, address=address, run_dir=run_dir,
                                       timeout=timeout) as face:
            yield face

    return _server(lifespan)


def _server(lifespan: Any) -> Server[ProcessFace]:
    async def list_tools(ctx: Any, params: mt.PaginatedRequestParams | None) -> mt.ListToolsResult:
        return mt.ListToolsResult(tools=await _face(ctx).list_tools())

    async def call_tool(ctx: Any, params: mt.CallToolRequestParams) -> mt.CallToolResult:
        return await _face(ctx).call_tool(params.name, params.arguments)

    return Server(SERVER_NAME, version=_version(), lifespan=lifespan,
                  instructions="The tools and files of one LLMAgentOS process: every call "
                               "runs as that process, within its capabilities and limits.",
                  on_list_tools=list_tools, on_call_tool=call_tool)


def _face(ctx: Any) -> ProcessFace:
    """The process a request runs as: the server's one face, or the one its
    HTTP request's bearer key picked (BearerGate)."""
    if isinstance(ctx.lifespan_context, ProcessFace):
        return ctx.lifespan_context
    return getattr(ctx.request.state, FACE_STATE)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llmagentos")
    except PackageNotFoundError:
        return "0"


async def serve_stdio(key: str, *, address: str | None = None,
                      run_dir: str | Path | None = None, timeout: float = 30.0) -> bool:
    """Serve MCP over this process's stdin/stdout until the host closes them
    (True) or the kernel closes the connection (False). The key is checked
    before the first message is read: a bad one is EACCES at once, not a host
    waiting on a server that cannot work. One connection for the whole run:
    an attached process ends when its last connection closes."""
    async with ProcessFace.connect(key, address=address, run_dir=run_dir,
                                   timeout=timeout) as face:
        @asynccontextmanager
        async def held(_: Server[ProcessFace]) -> AsyncIterator[ProcessFace]:
            yield face

        server = _server(held)
        kernel_gone = False
        async with anyio.create_task_group() as tg:
            async def watch_kernel() -> None:
                nonlocal kernel_gone
                async for _ in face.client.notifications():
                    pass  # nothing is addressed to a face; the loop ends with the connection
                kernel_gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch_kernel)
            stdin = StdinLines()
            try:
                async with stdio_server(stdin=stdin) as (read, write):
                    await server.run(read, write, server.create_initialization_options())
            finally:
                await stdin.aclose()
            tg.cancel_scope.cancel()
        return not kernel_gone


class StdinLines:
    """Standard input as async lines that cancellation interrupts. The SDK's own
    reader waits for a line in a worker thread, so a server whose kernel went
    away would go on waiting for its host to speak."""

    def __init__(self) -> None:
        self._stream = trio.lowlevel.FdStream(os.dup(0))

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        pending = b""
        while True:
            data = await self._stream.receive_some(65536)
            if not data:  # the host closed our stdin
                if pending:
                    yield pending.decode("utf-8", "replace")
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")

    async def aclose(self) -> None:
        await self._stream.aclose()


class FacePool:
    """The faces of an HTTP endpoint where each request's bearer key picks the
    process: one kernel connection per key, opened at the key's first request
    and held in the pool's nursery for the endpoint's life (an attached
    process lives while a connection of it does). A face whose process is gone
    (killed, its key revoked) or whose connection closed is dropped, so the
    key's next request is refused."""

    def __init__(self, nursery: trio.Nursery, address: str | None,
                 run_dir: str | Path | None, timeout: float) -> None:
        self.nursery = nursery
        self.address, self.run_dir, self.timeout = address, run_dir, timeout
        self.faces: dict[str, ProcessFace] = {}
        self._opening = trio.Lock()  # one connection per key, even for concurrent firsts

    async def get(self, key: str) -> ProcessFace:
        """The key's face; EACCES for a key the kernel does not know."""
        async with self._opening:
            face = self.faces.get(key)
            if face is None or face.gone:
                face = self.faces[key] = await self.nursery.start(self._hold, key)
            return face

    async def _hold(self, key: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        face: ProcessFace | None = None
        try:
            async with ProcessFace.connect(key, address=self.address, run_dir=self.run_dir,
                                           timeout=self.timeout) as face:
                task_status.started(face)
                async for _ in face.client.notifications():
                    pass  # nothing is addressed to a face; this ends with the connection
        except Exception:
            if face is None:
                raise  # refused (EACCES) or no kernel: the request that asked is told
            log.warning("the kernel connection of an MCP face closed with an error",
                        exc_info=True)  # one key's connection never takes the endpoint down
        finally:
            if face is not None:
                face.gone = True
                if self.faces.get(key) is face:
                    del self.faces[key]


def bearer_key(scope: dict) -> str | None:
    """The key of an ASGI request's `Authorization: Bearer KEY` header, else None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class BearerGate:
    """ASGI middleware: an HTTP request runs as the process its bearer key names
    (401 for none or an unknown one; 503 when the kernel cannot be reached)."""

    def __init__(self, app: Any, pools: list[FacePool]) -> None:
        self.app = app
        self.pools = pools  # filled by the server's lifespan: the one pool, once it runs

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            key = bearer_key(scope)
            if key is None:
                return await _refuse(send, 401, "EACCES",
                                     "an Authorization: Bearer KEY header is required")
            if not self.pools:
                return await _refuse(send, 503, "ESHUTDOWN", "the MCP endpoint is not running")
            try:
                face = await self.pools[0].get(key)
            except KernelError as e:
                return await _refuse(send, 401 if e.name == "EACCES" else 503, e.name,
                                     e.message)
            scope.setdefault("state", {})[FACE_STATE] = face
        await self.app(scope, receive, send)


FACE_STATE = "llmos_face"  # where BearerGate leaves the request's face (request.state)


async def _refuse(send: Any, status: int, errno: str, message: str) -> None:
    body = json.dumps({"error": {"errno": errno, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def streamable_http_app(key: str | None = None, *, address: str | None = None,
                        run_dir: str | Path | None = None, timeout: float = 30.0,
                        path: str = "/mcp", host: str = "127.0.0.1") -> Starlette:
    """A process as a streamable-HTTP MCP endpoint at ``path``: an ASGI app
    whose lifespan runs the SDK's session manager and holds the kernel
    connections. With ``key`` it is that one process; without, each request's
    `Authorization: Bearer KEY` picks the process it runs as (BearerGate).

    Mounted in another app (a gateway's /mcp), that app's lifespan must enter
    ``app.router.lifespan_context(app)``: Starlette does not run a mounted
    app's lifespan. ``host`` is where it listens: on loopback the SDK refuses
    other Host and Origin headers (DNS rebinding)."""
    if key is not None:
        server = mcp_server(key, address=address, run_dir=run_dir, timeout=timeout)
        return server.streamable_http_app(streamable_http_path=path, host=host)
    pools: list[FacePool] = []

    @asynccontextmanager
    async def pool(_: Server[Any]) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            pools.append(FacePool(nursery, address, run_dir, timeout))
            try:
                yield None
            finally:
                pools.clear()
                nursery.cancel_scope.cancel()

    app = _server(pool).streamable_http_app(streamable_http_path=path, host=host)
    app.add_middleware(BearerGate, pools=pools)
    return app


def run_stdio(key: str, *, address: str | None = None, run_dir: str | Path | None = None,
              timeout: float = 30.0) -> int:
    """`llmos mcp serve`: 0 when the host hung up; 1, the reason on stderr, when
    the kernel refused the key or went away."""
    from .errors import sole_error

    try:
        ended = anyio.run(lambda: serve_stdio(key, address=address, run_dir=run_dir,
                                              timeout=timeout), backend="trio")
    except Exception as group:
        e = sole_error(group)
        if not isinstance(e, KernelError):
            raise
        print(f"llmos mcp serve: {e}", file=sys.stderr)
        return 1
    if not ended:
        print("llmos mcp serve: the kernel closed the connection", file=sys.stderr)
        return 1
    return 0
