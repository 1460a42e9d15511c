"""Listeners and connections: a thin loop around the sans-I/O codec.

Each connection is a task in the kernel's listener nursery; each `runs="task"`
call on it is a task in the connection's own nursery, so a client that
vanishes cancels exactly its own in-flight calls and nothing else.

What a connection sends goes out in order, frame by frame as encoded. Streamed
tokens are queued without waiting (``notify_nowait``, from the device loop):
written at once when the socket is free, and while a write is under way the
frames that pile up go out together in the next one.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import traceback
from typing import TYPE_CHECKING, Any

import trio

from llmagentos.syscalls import wire
from llmagentos.syscalls.errno import SyscallError

from . import dispatch, sysfs

if TYPE_CHECKING:
    from .proc import PCB
    from .services import Services

log = logging.getLogger("llmagentos.kernel")

RECV_CHUNK = 65536
# Before sys.hello a connection is nobody's: it may hold at most this much
# (16 MiB frames from 64 unauthenticated TCP connections parked +1 GiB) and
# must say hello within HELLO_TIMEOUT seconds.
PRE_HELLO_BYTES = 64 * 1024
HELLO_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0  # a TLS peer proves nothing until its handshake is done
TLS_HANDSHAKE_RECORD = b"\x16"  # how every TLS client's first record begins


class Connection:
    def __init__(self, services: "Services", stream: trio.abc.Stream, peer: str):
        self.sys = services
        self.stream = stream
        self.peer = peer
        self.decoder = wire.Decoder(services.config.max_frame, max_items=wire.MAX_ITEMS,
                                    max_depth=wire.MAX_DEPTH)
        self.pre_hello = 0  # bytes received while not yet authenticated
        self.pcb: "PCB | None" = None
        self.holds_pcb = False  # counted in an attached pcb's conns: it ends with the last
        self._send_lock = trio.Lock()
        self._outbox: list[bytes] = []  # queued frames, written before anything later
        self._flushing = False          # a task is on its way to write the outbox
        self._sock = getattr(stream, "socket", None)  # written to directly when free
        self.closed = False
        self.nursery: trio.Nursery | None = None

    def peer_pid(self) -> int | None:
        """The OS pid at the other end of a Unix socket (SO_PEERCRED)."""
        try:
            sock = self.stream.socket
            if sock.family != socket.AF_UNIX:
                return None
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            return struct.unpack("3i", creds)[0] or None
        except (OSError, AttributeError):
            return None

    async def send(self, data: bytes) -> None:
        # Uncontended fast path: taking the lock without a checkpoint is most
        # of the difference to a bare echo server on the null syscall.
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if self._outbox:  # queued before: they go first, in the same write
                self._outbox.append(data)
                data = self._take_outbox()
            while data:
                await self.stream.send_all(data)
                data = self._take_outbox()  # queued while that was written
        finally:
            self._outbox.clear()  # (left only when the write failed: nobody reads it)
            self._send_lock.release()

    def backlog(self) -> int:
        """Bytes queued for the client that the socket has not taken yet."""
        return sum(map(len, self._outbox))

    def _take_outbox(self) -> bytes:
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    async def notify(self, method: str, args: list) -> None:
        await self.send(wire.encode_notification(method, args))

    def notify_nowait(self, method: str, args: list) -> None:
        """Queue a notification; never waits (see the module doc)."""
        if not self.closed:
            self._write_nowait(wire.encode_notification(method, args))

    def answer_nowait(self, msgid: int, result: Any, error: SyscallError | None = None) -> bool:
        """Queue a call's answer the same way (dispatch.Call.answer_nowait)."""
        if self.closed:
            return False
        self.sys.stats["errors" if error is not None else "early_answers"] += 1
        return self._write_nowait(_response(msgid, error and error.to_wire(), result))

    def _write_nowait(self, data: bytes) -> bool:
        """False if the client is known to be gone (the connection's reader sees it too)."""
        if self._flushing or self._send_lock.locked():
            self._outbox.append(data)  # whoever writes now writes it next
            return True
        sock = self._sock
        fd = sock.fileno() if sock is not None else -1  # -1 once closed
        if fd >= 0:  # the socket is free: one write, no task switch
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                return False
            if n == len(data):
                return True
            data = data[n:]
        self._outbox.append(data)
        self._flushing = True
        self.nursery.start_soon(self._flush)
        return True

    async def _flush(self) -> None:
        try:
            await self.send(b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._flushing = False

    async def respond(self, msgid: int, error: dict | None, result: Any) -> None:
        await self._answer(_response(msgid, error, result))

    async def _answer(self, data: bytes) -> None:
        try:
            await self.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; its call is over either way

    async def close_with_reason(self, reason: str) -> None:
        self.sys.stats["protocol_errors"] += 1
        log.info("closing connection %s: %s", self.peer, reason)
        with trio.move_on_after(1):
            try:
                await self.notify("sys.close", [reason])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await self.stream.aclose()

    async def _hello_deadline(self) -> None:
        await trio.sleep(HELLO_TIMEOUT)
        if self.pcb is None:
            await self.close_with_reason(f"no sys.hello within {HELLO_TIMEOUT:g}s")

    async def _handshake(self) -> bool:
        """TLS: the whole handshake before a byte is read as a call, so a plain-text
        or wrong-CA client is gone before any syscall. Other streams: nothing to do."""
        if not isinstance(self.stream, trio.SSLStream):
            return True
        why = f"no handshake within {HANDSHAKE_TIMEOUT:g}s"
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                first = await self.stream.transport_stream.socket.recv(1, socket.MSG_PEEK)
                if first not in (b"", TLS_HANDSHAKE_RECORD):
                    await self._refuse_clear_text()
                    return False
                await self.stream.do_handshake()
                return True
            except (trio.BrokenResourceError, OSError) as e:
                why = str(e.__cause__ or e) or type(e.__cause__ or e).__name__
        self.sys.stats["tls_refused"] += 1
        log.warning("TLS handshake with %s failed: %s", self.peer, why)
        await trio.aclose_forcefully(self.stream)  # no close_notify to a peer that is no one
        return False

    async def _refuse_clear_text(self) -> None:
        """A client talking plain MessagePack-RPC to the TLS port: nothing it sent
        is read; it is told why in its own tongue, then closed."""
        self.sys.stats["tls_refused"] += 1
        log.warning("TLS listener: %s speaks plain text; refused", self.peer)
        raw = self.stream.transport_stream
        with trio.move_on_after(1):
            try:
                await raw.send_all(wire.encode_notification("sys.close", [
                    "this listener speaks TLS only: connect with tls://HOST:PORT and the "
                    "kernel's CA file"]))
                await raw.send_eof()
                # Drain what it sent (unread, it would turn the close into a reset
                # that can overtake the reason) until it hangs up.
                drained = 0
                while drained < PRE_HELLO_BYTES and (data := await raw.receive_some(RECV_CHUNK)):
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(self.stream)

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                if not await self._handshake():
                    return
                nursery.start_soon(self._hello_deadline)
                while True:
                    data = await self.stream.receive_some(RECV_CHUNK)
                    if not data:
                        break
                    if self.pcb is None:
                        self.pre_hello += len(data)
                        if self.pre_hello > PRE_HELLO_BYTES:
                            raise wire.ProtocolError(
                                f"more than {PRE_HELLO_BYTES} bytes before sys.hello")
                    self.decoder.feed(data)
                    for msg in self.decoder.messages():
                        if isinstance(msg, wire.Invalid):
                            self.sys.stats["errors"] += 1
                            await self.respond(
                                msg.msgid, SyscallError("EINVAL", msg.reason).to_wire(), None)
                            continue
                        if isinstance(msg, wire.Notification):
                            # MessagePack-RPC peers ignore notifications they do not
                            # serve (pynvim announces itself with one): count, go on
                            self.sys.stats["client_notifications"] += 1
                            continue
                        if not isinstance(msg, wire.Request):
                            raise wire.ProtocolError(
                                f"clients send requests and notifications only, got "
                                f"{type(msg).__name__}")
                        await self._request(msg)
            except wire.ProtocolError as e:
                await self.close_with_reason(str(e))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                # Client gone (or closed): cancel what it still had running, and
                # whatever it served as a driver goes with it.
                self.closed = True
                self.sys.connections.discard(self)
                self.sys.tools.drop_conn(self)
                pcb = self.pcb
                if pcb is not None and self.sys.mail is not None:
                    self.sys.mail.hang_up(self)  # its calls waiting for mail wait no more
                if pcb is not None and pcb.pid == sysfs.INIT_PID:
                    sysfs.drop_conn(self.sys, self)  # a shell command's fds end with it
                if pcb is not None and self.holds_pcb:
                    pcb.conns -= 1
                    if pcb.conns == 0:
                        self.sys.procs.end_attached(pcb, 0)
                nursery.cancel_scope.cancel()
        with trio.move_on_after(0.5):
            await self.stream.aclose()

    async def _request(self, req: wire.Request) -> None:
        sv = self.sys
        sv.stats["syscalls"] += 1
        try:
            if self.pcb is None and req.method != "sys.hello":
                raise SyscallError("EPERM", "say sys.hello(token) first")
            if self.pcb is not None and self.pcb.exited:
                raise SyscallError("ESRCH", f"pid {self.pcb.pid} has exited")
            sc, entry = dispatch.lookup(req.method)
        except SyscallError as e:
            sv.stats["errors"] += 1
            await self.respond(req.msgid, e.to_wire(), None)
            return
        call = dispatch.Call(sv, self.pcb, self, sc, req.msgid, self.decoder.size)
        if entry.runs == "task":
            self.nursery.start_soon(self._run, call, entry, req)
        else:
            await self._run(call, entry, req)

    async def _run(self, call: dispatch.Call, entry: dispatch.Entry, req: wire.Request) -> None:
        await self.finish(call, dispatch.invoke, (call, entry, req.args, req.kwargs))

    async def finish(self, call: dispatch.Call, fn: Any, args: tuple) -> None:
        """Await the call's result and answer it (unless it was deferred to a
        task, which answers, or already answered)."""
        try:
            result = await fn(*args)
            if result is dispatch.LATER:
                return
            data = _response(call.msgid, None, result)
        except SyscallError as e:
            self.sys.stats["errors"] += 1
            data = _response(call.msgid, e.to_wire(), None)
        except Exception as e:  # a handler bug must never take the kernel down
            name = call.syscall.name
            self.sys.stats["errors"] += 1
            log.error("handler %s failed:\n%s", name, traceback.format_exc())
            data = _response(call.msgid, SyscallError(
                "EIO", f"internal error in {name}: {type(e).__name__}: {e}").to_wire(), None)
        await self._answer(data)


def _response(msgid: int, error: dict | None, result: Any) -> bytes:
    try:
        return wire.encode_response(msgid, error, result)
    except (TypeError, ValueError, OverflowError) as e:
        err = SyscallError("EIO", f"result not serializable: {e}")
        return wire.encode_response(msgid, err.to_wire(), None)


async def serve_listener(services: "Services", listener: trio.SocketListener,
                         tls: ssl.SSLContext | None = None,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections until cancelled; with ``tls``, each speaks TLS (the
    same calls, the same sys.hello, inside the encrypted channel)."""
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:  # EMFILE and friends: back off, keep serving
                log.warning("accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            peer = _peer_name(stream)
            if tls is not None:
                stream = trio.SSLStream(stream, tls, server_side=True)
            services.stats["connections"] += 1
            conns, cfg = services.connections, services.config
            why = None
            if len(conns) >= cfg.max_connections:
                why = f"too many connections (limit {cfg.max_connections})"
            elif sum(1 for c in conns if c.pcb is None) >= cfg.max_unauthenticated:
                why = (f"too many connections that have not said hello "
                       f"(limit {cfg.max_unauthenticated})")
            if why is not None:
                services.stats["connections_refused"] += 1
                nursery.start_soon(_refuse, stream, why)
                continue
            conn = Connection(services, stream, peer)
            conns.add(conn)
            nursery.start_soon(conn.serve)


async def _refuse(stream: trio.abc.Stream, why: str) -> None:
    """Say why, then close: a refused client gets a reason, not a silent reset."""
    with trio.move_on_after(1):
        try:
            await stream.send_all(wire.encode_notification("sys.close", [why]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    with trio.move_on_after(0.5):
        await stream.aclose()


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        name = stream.socket.getpeername()
        return str(name) if name else f"unix:{os.getpid()}"
    except OSError:
        return "?"
