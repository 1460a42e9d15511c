"""The OpenAI-compatible HTTP API as a Starlette app; each request runs as a key's process.

A request's bearer key names a process (keys.py); what the request asks is
translated (openai.py) into the syscalls an agent would make, and each goes
through `dispatch.invoke` as that process, exactly as one arriving on the
kernel's socket does: capability check, limits (a spent ``tokens`` limit is
EDQUOT, 429 here), usage accounting, the audit log for calls that change
state, and the run queue under the process's nice value. A revoked key's
process has exited, so its next request is 401 at once.

Bodies are read as they arrive up to the kernel's ``max_frame`` bytes (the
bound a syscall message has): past it the answer is 413 and the connection is
closed, with nothing kept of what came. A client that goes away while its
request is served (streamed or not) cancels it: the syscall is cancelled as
for a socket client that vanishes, so the request leaves the run queue and
its slot is freed.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import traceback
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmagentos.syscalls.errno import SyscallError

from .. import dispatch
from . import openai as oa
from .errors import ApiError, bad, unauthorized

if TYPE_CHECKING:
    from ..proc import PCB
    from ..services import Services

log = logging.getLogger("llmagentos.kernel")

CONTEXT_HEADER = "x-llmos-context"


class _Requester:
    """What `dispatch.Call` holds as its connection for a gateway request: the
    handler's streamed tokens go to ``on_token``."""

    closed = False

    def __init__(self, on_token: Callable[[str], None] | None) -> None:
        self.on_token = on_token

    def peer_pid(self) -> None:
        return None

    def notify_nowait(self, method: str, args: list) -> None:
        if method == "llm.token" and self.on_token is not None:
            self.on_token(args[1])

    async def notify(self, method: str, args: list) -> None:
        self.notify_nowait(method, args)


class Gateway:
    """The kernel side of the HTTP API: authentication and syscalls as a key's process."""

    def __init__(self, services: "Services") -> None:
        self.sys = services
        self._msgid = itertools.count(1)

    def authenticate(self, request: Request) -> "PCB":
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth:
            raise unauthorized("You didn't provide an API key: send Authorization: Bearer KEY "
                               "(make one with `llmos key create NAME`)")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("The Authorization header must be 'Bearer KEY'")
        pcb = self.sys.keys.authenticate(key.strip())
        if pcb is None:
            raise unauthorized("Incorrect API key provided (unknown or revoked)")
        return pcb

    async def syscall(self, pcb: "PCB", name: str, kwargs: dict,
                      on_token: Callable[[str], None] | None = None) -> Any:
        """One syscall as ``pcb``, through the dispatch path every syscall takes."""
        sv = self.sys
        sv.stats["syscalls"] += 1
        try:
            if pcb.exited:
                raise SyscallError("ESRCH", f"pid {pcb.pid} has exited (the key was revoked)")
            sc, entry = dispatch.lookup(name)
            call = dispatch.Call(sv, pcb, _Requester(on_token), sc, next(self._msgid))
            return await dispatch.invoke(call, entry, [], kwargs)
        except SyscallError as e:
            sv.stats["errors"] += 1
            raise ApiError.of(e) from None
        except ApiError:
            raise
        except Exception as e:  # a handler bug must never take the kernel down
            sv.stats["errors"] += 1
            log.error("gateway %s failed:\n%s", name, traceback.format_exc())
            raise ApiError(500, f"internal error in {name}: {type(e).__name__}",
                           "server_error") from None

    async def generate(self, pcb: "PCB", prompt: str | None, messages: list | None,
                       params: dict, context: str | None,
                       on_token: Callable[[str], None] | None) -> dict:
        args = {"prompt": prompt, "messages": messages, "params": params,
                "stream": on_token is not None}
        if context is None:
            return await self.syscall(pcb, "llm.generate", args, on_token)
        # The conversation lives in the process's named context: the kernel keeps the
        # turns, so only what the client sends after the last assistant turn is new.
        if messages is not None:
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                       default=-1)
            args["messages"] = messages[last + 1:]
            if not args["messages"]:
                raise bad("with X-LLMOS-Context, send the new turn after the last assistant "
                          "message", "messages")
        async with self.sys.keys.context_lock(pcb):  # the process's current context is one
            await self.syscall(pcb, "ctx.open", {"name": context, "create": True})
            return await self.syscall(pcb, "llm.generate", {**args, "context": True}, on_token)

    def model_name(self, requested: str) -> str:
        try:
            return self.sys.table.get(requested).name
        except SyscallError as e:
            raise ApiError.of(e, "model") from None


# --- reading requests -----------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read no further than ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise bad("Content-Length must be a number of bytes")
        if int(length) > limit:
            raise too_large(int(length), limit)
    buf = bytearray()
    async for chunk in request.stream():
        if len(buf) + len(chunk) > limit:
            raise too_large(len(buf) + len(chunk), limit)
        buf += chunk
    try:
        body = json.loads(buf)
    except (ValueError, RecursionError) as e:
        raise bad(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def too_large(n: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body of {n} bytes or more is over the bound of {limit} "
                         "bytes (the kernel's --max-frame)", "invalid_request_error", None,
                    "request_too_large")


def error_response(e: ApiError) -> JSONResponse:
    headers = {"connection": "close"} if e.status == 413 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


# --- answering: work that a client's leaving cancels ------------------------------------------


async def _until_disconnect(receive: Any, scope: trio.CancelScope, gone: list) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            gone.append(True)
            scope.cancel()
            return


class Answer:
    """An ASGI response that does its work while it is being answered: JSON once the
    work is done, cancelled if the client leaves first."""

    def __init__(self, work: Callable[[], Awaitable[dict]]) -> None:
        self.work = work

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        gone: list = []
        response: Response | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope, gone)
            try:
                response = JSONResponse(await self.work())
            except ApiError as e:
                response = error_response(e)
            nursery.cancel_scope.cancel()
        if not gone and response is not None:
            await response(scope, receive, send)


class EventStream:
    """Server-sent events of a streamed generation, ``data: [DONE]`` last. The status
    waits for the first event, so an error before any token (quota, model, bad input)
    is an ordinary OpenAI error answer; a client that leaves cancels the generation."""

    def __init__(self, work: Callable[[Callable[[str], None]], Awaitable[dict]],
                 first: Callable[[], list[dict]],
                 piece: Callable[[str], dict | None],
                 last: Callable[[dict], list[dict]]) -> None:
        self.work, self.first, self.piece, self.last = work, first, piece, last

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        gone: list = []
        tx, rx = trio.open_memory_channel[tuple](math.inf)

        def put(item: tuple) -> None:  # never waits: the device loop calls it
            try:
                tx.send_nowait(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the answer is over (the client left, or an error went out)

        async def run() -> None:
            try:
                put(("done", await self.work(lambda text: put(("piece", text)))))
            except ApiError as e:
                put(("error", e))
            finally:
                tx.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope, gone)
            nursery.start_soon(run)
            started = False
            async with rx:
                async for kind, value in rx:
                    if kind == "error" and not started:
                        await error_response(value)(scope, receive, send)
                        gone.append(True)  # answered: no stream to end
                        break
                    if not started:
                        started = True
                        await send({"type": "http.response.start", "status": 200,
                                    "headers": [(b"content-type", b"text/event-stream"),
                                                (b"cache-control", b"no-cache")]})
                        await _events(send, self.first())
                    if kind == "piece":
                        chunk = self.piece(value)
                        if chunk is not None:
                            await _events(send, [chunk])
                    elif kind == "done":
                        await _events(send, self.last(value), done=True)
                    else:  # an error after tokens went out: said as an error event
                        await _events(send, [value.body()], done=True)
            nursery.cancel_scope.cancel()
        if not gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _events(send: Any, events: list[dict], done: bool = False) -> None:
    data = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n"
                    for e in events)
    if done:
        data += b"data: [DONE]\n\n"
    if data:
        await send({"type": "http.response.body", "body": data, "more_body": True})


# --- the endpoints ------------------------------------------------------------------------------


def build_app(gw: Gateway, max_body: int, mcp: Starlette | None = None) -> Starlette:
    """The API's routes; ``mcp`` (the MCP server face's streamable-HTTP app, whose
    bearer key picks the process as here) is served at /mcp."""
    def endpoint(fn: Callable[[Request], Awaitable[Any]]) -> Callable:
        async def wrapped(request: Request) -> Any:
            try:
                return await fn(request)
            except ApiError as e:
                return error_response(e)
            except SyscallError as e:  # from a check made before any syscall (a tool schema)
                return error_response(ApiError.of(e))
            except ClientDisconnect:  # gone while sending the body: nobody to answer
                return Response(status_code=400)
        return wrapped

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        pcb = gw.authenticate(request)
        rows = await gw.syscall(pcb, "llm.models", {})
        return JSONResponse(oa.models_answer(rows, gw.sys.boot_time))

    async def chat(request: Request) -> Any:
        pcb = gw.authenticate(request)
        plan = oa.chat_request(await read_json(request, max_body))
        context = request.headers.get(CONTEXT_HEADER)
        rid, created = oa.new_id("chatcmpl"), oa.now()

        def work(on_token: Callable[[str], None] | None = None) -> Awaitable[dict]:
            return gw.generate(pcb, None, plan.messages, plan.params, context, on_token)

        if not plan.stream:
            return Answer(lambda: _then(work(), lambda r: oa.chat_answer(plan, r, rid,
                                                                         created)))
        model = gw.model_name(plan.params["model"])
        tools = plan.tool_mode != "none"  # a tool call is known whole only at the end

        def last(res: dict) -> list[dict]:
            out = []
            message, reason = oa.chat_message(plan, res)
            if tools:
                delta = ({"tool_calls": [{"index": 0, **message["tool_calls"][0]}]}
                         if "tool_calls" in message else {"content": message["content"]})
                out.append(oa.chat_chunk(rid, created, model, delta))
            out.append(oa.chat_chunk(rid, created, model, {}, reason))
            if plan.include_usage:
                out.append({**oa.chat_chunk(rid, created, model, {}), "choices": [],
                            "usage": oa.usage(res["usage"])})
            return out

        return EventStream(
            work,
            lambda: [oa.chat_chunk(rid, created, model, {"role": "assistant", "content": ""})],
            lambda text: None if tools else oa.chat_chunk(rid, created, model,
                                                          {"content": text}),
            last)

    async def completions(request: Request) -> Any:
        pcb = gw.authenticate(request)
        prompt, params, stream, include_usage = oa.completion_request(
            await read_json(request, max_body))
        context = request.headers.get(CONTEXT_HEADER)
        rid, created = oa.new_id("cmpl"), oa.now()

        def work(on_token: Callable[[str], None] | None = None) -> Awaitable[dict]:
            return gw.generate(pcb, prompt, None, params, context, on_token)

        if not stream:
            return Answer(lambda: _then(work(), lambda r: oa.completion_answer(r, rid,
                                                                               created)))
        model = gw.model_name(params["model"])

        def last(res: dict) -> list[dict]:
            out = [oa.completion_chunk(rid, created, model, "", oa.finish(res["finish_reason"]))]
            if include_usage:
                out.append({**out[0], "choices": [], "usage": oa.usage(res["usage"])})
            return out

        return EventStream(work, lambda: [],
                           lambda text: oa.completion_chunk(rid, created, model, text), last)

    async def embeddings(request: Request) -> Any:
        pcb = gw.authenticate(request)
        texts, model, fmt = oa.embedding_request(await read_json(request, max_body))

        async def work() -> dict:
            before = pcb.usage.tokens_in
            vectors = await gw.syscall(pcb, "llm.embed", {"texts": texts, "model": model})
            return oa.embedding_answer(vectors, gw.model_name(model), fmt,
                                       pcb.usage.tokens_in - before)

        return Answer(work)

    async def metrics(request: Request) -> Response:
        # What sys.metrics shows any process: no key, so a Prometheus scrape needs none.
        from .. import metrics as prom  # prometheus-client: imported at the first scrape
        body, content_type = prom.render(gw.sys)
        return Response(body, headers={"Content-Type": content_type})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                                        f"{exc.detail}", "invalid_request_error",
                                       None, None))

    routes = [
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/embeddings", endpoint(embeddings), methods=["POST"]),
        Route("/metrics", endpoint(metrics), methods=["GET"]),
    ]
    if mcp is None:
        return Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    routes.append(Route("/mcp", mcp))  # an ASGI app: it sees the path /mcp, its own route
    # Starlette runs no lifespan of an app it routes to: the MCP face's session manager
    # and kernel connections live in the gateway's.
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found},
                     lifespan=lambda app: mcp.router.lifespan_context(mcp))


async def _then(work: Awaitable[dict], shape: Callable[[dict], dict]) -> dict:
    return shape(await work)
