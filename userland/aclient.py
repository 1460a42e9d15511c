"""The trio client: many calls in flight on one connection, signal handlers
as tasks. Its own module so that the sync client, the CLI and every agent
program start without importing trio."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import trio

from llmagentos.syscalls import wire
from llmagentos.syscalls.table import Syscall

from .client import (
    UNSOLICITED,
    Address,
    Notify,
    SignalHandler,
    _caller_defaults,
    _encode,
    _refuse_clear_text,
    _Signals,
    _Stubs,
    _tls_error,
    resolve,
    tls_context,
)
from .errors import ERRORS, error_for


class AsyncClient(_Stubs, _Signals):
    """A trio client; many calls may be in flight at once on one connection.

    Use as `async with llmagentos.aconnect() as c: await c.proc.ps()`.
    Signal handlers (`on_signal`, plain functions or coroutine functions) run
    as tasks of the client's nursery as soon as the signal arrives; what one
    raises comes out of the `async with`, as an uncaught error of any task.
    """

    def __init__(self, address: "str | Address | None" = None, token: str | None = None, *,
                 run_dir: str | Path | None = None, max_frame: int = wire.DEFAULT_MAX_FRAME,
                 ca: str | Path | None = None):
        self.address, self._token = resolve(address, token, run_dir, ca)
        self._signal_handlers = {}
        self._ids = itertools.count(1)
        self._decoder = wire.Decoder(max_frame)
        self._pending: dict[int, trio.MemorySendChannel] = {}
        self._send_lock = trio.Lock()
        self._stream: trio.abc.Stream | None = None
        self._nursery_cm: Any = None
        self._closed_reason: str | None = None
        self.pid: int | None = None
        # Notifications addressed to the process rather than to one of its calls
        # (drv.request for a driver) wait here for `notifications()`.
        self._events_send, self._events = trio.open_memory_channel(1024)

    async def __aenter__(self) -> "AsyncClient":
        _require_trio()
        a = self.address
        ctx = tls_context(a) if a.kind == "tls" else None
        _refuse_clear_text(a)
        try:
            if a.kind in ("tcp", "tls"):
                self._stream = await trio.open_tcp_stream(a.host, a.port)
            else:
                self._stream = await trio.open_unix_socket(a.path)
        except OSError as e:
            raise ERRORS["ENOTCONN"](f"no kernel at {a}: {e}") from None
        if ctx is not None:
            self._stream = trio.SSLStream(self._stream, ctx, server_hostname=a.host)
            try:
                await self._stream.do_handshake()
            except trio.BrokenResourceError as e:
                await trio.aclose_forcefully(self._stream)
                cause = e.__cause__ if isinstance(e.__cause__, OSError) else OSError(str(e))
                raise _tls_error(a, cause) from None
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        nursery.start_soon(self._reader)
        self._nursery = nursery
        try:
            info = await self.call("sys.hello", self._token)
        except BaseException:  # leave nothing entered: the nursery, then the stream
            await self.__aexit__(None, None, None)
            raise
        self.pid = info["pid"]
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_cm.__aexit__(*exc)
        finally:
            await self._stream.aclose()

    async def _reader(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    break
                self._decoder.feed(data)
                for msg in self._decoder.messages():
                    await self._route(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError) as e:
            self._closed_reason = str(e)
        finally:
            self._closed_reason = self._closed_reason or "the kernel closed the connection"
            for ch in list(self._pending.values()):
                ch.close()
            self._events_send.close()

    async def _route(self, msg: Any) -> None:
        if isinstance(msg, wire.Response):
            ch = self._pending.pop(msg.msgid, None)
            if ch is not None:
                ch.send_nowait(("response", msg))
                ch.close()
        elif isinstance(msg, wire.Notification):
            if msg.method == "sys.close":
                self._closed_reason = f"kernel closed the connection: {msg.args}"
                return
            if msg.method == "proc.signal":
                found = self._handler_for(msg.args)
                if found is not None:
                    self._nursery.start_soon(_run_handler, *found)
                return
            if msg.method in UNSOLICITED:
                await self._events_send.send(msg)
                return
            target = msg.args[0] if msg.args and isinstance(msg.args[0], int) else None
            ch = self._pending.get(target)
            if ch is not None:
                try:
                    ch.send_nowait(("notify", msg))
                except trio.WouldBlock:
                    await ch.send(("notify", msg))

    async def call(self, method: str, *args: Any, on_notify: Notify | None = None,
                   **kwargs: Any) -> Any:
        if self._closed_reason:
            raise ERRORS["ECONNRESET"](self._closed_reason)
        msgid = next(self._ids) & wire.MAX_MSGID
        send, recv = trio.open_memory_channel(256)
        self._pending[msgid] = send
        try:
            async with self._send_lock:
                await self._stream.send_all(_encode(msgid, method, args, kwargs))
            async for kind, msg in recv:
                if kind == "response":
                    if msg.error is not None:
                        raise error_for(msg.error)
                    return msg.result
                if on_notify is not None:
                    res = on_notify(msg.method, msg.args)
                    if hasattr(res, "__await__"):
                        await res
            raise ERRORS["ECONNRESET"](self._closed_reason or "connection lost")
        finally:
            self._pending.pop(msgid, None)

    def notifications(self) -> trio.MemoryReceiveChannel:
        """Kernel-initiated notifications (e.g. drv.request) as wire.Notification
        objects; the channel closes when the connection does."""
        return self._events

    def _stub(self, sc: Syscall) -> Callable[..., Any]:
        async def stub(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = _caller_defaults(sc, self.address, args, kwargs)
            return await self.call(sc.name, *args, **kwargs)
        return stub


async def _run_handler(handler: SignalHandler, args: list) -> None:
    res = handler(*args)
    if hasattr(res, "__await__"):
        await res


def aconnect(address: str | None = None, token: str | None = None, **kw: Any) -> AsyncClient:
    """A trio client (`async with llmagentos.aconnect() as c:`); under asyncio
    use the sync client in a thread (`asyncio.to_thread`)."""
    return AsyncClient(address, token, **kw)


def _require_trio() -> None:
    import sniffio

    try:
        lib = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        lib = None
    if lib != "trio":
        where = lib or "outside an async run"
        raise RuntimeError(f"llmagentos.aconnect() runs under trio (trio.run), not {where}; "
                           "from asyncio use the sync client in a thread, e.g. "
                           "await asyncio.to_thread(llmagentos.connect().proc.ps)")


__all__ = ["AsyncClient", "aconnect"]
