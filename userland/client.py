"""The syscall client: sync (`connect()`); the trio one (`aconnect()`) is in
aclient.py, so that importing this one does not import trio.

Zero configuration: inside a spawned process the kernel's environment
(`LLMAGENTOS_SOCKET`, `LLMAGENTOS_TOKEN`) is used; in the shell, the run
dir's socket and the shell user's token file. From another machine:
`LLMAGENTOS_ADDRESS=tls://HOST:PORT`, `LLMAGENTOS_CA` (the kernel's CA file)
and `LLMAGENTOS_TOKEN` (`llmos join` on the kernel's machine says what to set).
Stubs come from the call table: `c.proc.spawn(["python", "x.py"])`, `c.sys.uname()`.

Streaming calls: the kernel sends notifications `[2, "group.event", [msgid, ...]]`
before the response; the first param names the request they belong to.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import signal as _signal
import socket
import ssl
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmagentos.syscalls import paths, wire
from llmagentos.syscalls.table import TABLE, Syscall

from .errors import ERRORS, KernelError, error_for

Notify = Callable[[str, list], Any]
# A signal handler: handler(sig, payload, sender_pid); a coroutine function under trio.
SignalHandler = Callable[[int, Any, int], Any]

# Notifications that belong to the process, not to one of its calls.
UNSOLICITED = wire.PROCESS_NOTIFICATIONS


@dataclass(frozen=True)
class Address:
    kind: str  # "unix" | "tcp" | "tls"
    path: str = ""
    host: str = ""
    port: int = 0
    ca: str = ""  # tls: the CA file that vouches for the kernel ("": the system's CAs)

    @classmethod
    def parse(cls, text: str, ca: str | None = None) -> "Address":
        for kind in ("tcp", "tls"):
            if text.startswith(f"{kind}://"):
                host, _, port = text[len(kind) + 3:].rpartition(":")
                host = host.strip("[]")
                if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
                    raise ERRORS["EINVAL"](f"want {kind}://HOST:PORT, not {text!r}")
                return cls(kind, host=host, port=int(port), ca=ca or "" if kind == "tls" else "")
        return cls("unix", path=text)

    def __str__(self) -> str:
        if self.kind == "unix":
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"


def resolve(address: "str | Address | None" = None, token: str | None = None,
            run_dir: str | Path | None = None, ca: str | Path | None = None
            ) -> tuple[Address, str]:
    """Where the kernel is and which token to present. The address: as given,
    else $LLMAGENTOS_ADDRESS (set by hand), else $LLMAGENTOS_SOCKET (set by the
    kernel in its processes), else the run dir's socket. A tls:// address is
    checked against ``ca``, else $LLMAGENTOS_CA, else the system's CAs."""
    rd = Path(run_dir) if run_dir else None
    if address is None:
        env = os.environ.get(paths.ENV_ADDRESS) or os.environ.get(paths.ENV_SOCKET)
        if rd is None and env:
            address = env
        else:
            address = str((rd or paths.default_run_dir()) / paths.SOCKET_NAME)
    if token is None:
        if rd is None and os.environ.get(paths.ENV_TOKEN):
            token = os.environ[paths.ENV_TOKEN]
        elif rd is None and os.environ.get(paths.ENV_TOKEN_FD):
            token = inherited_token()
        else:
            tf = (rd or paths.default_run_dir()) / paths.TOKEN_NAME
            try:
                token = tf.read_text().strip()
            except FileNotFoundError:
                raise ERRORS["ENOTCONN"](
                    f"no kernel token at {tf}: is a kernel running? (`llmos boot`)") from None
            except PermissionError:
                raise ERRORS["EACCES"](f"cannot read the token file {tf}") from None
    if isinstance(address, Address):
        return address, token
    if ca is None:
        ca = os.environ.get(paths.ENV_CA) or None
    return Address.parse(address, str(ca) if ca else None), token


_inherited: str | None = None


def inherited_token() -> str:
    """A spawned process's own token, from the memfd the kernel handed over
    (LLMAGENTOS_TOKEN_FD). Reading it makes this process undumpable, so other
    processes of the same uid cannot read it from its memory."""
    global _inherited
    if _inherited is None:
        try:
            token = os.pread(int(os.environ[paths.ENV_TOKEN_FD]), 4096, 0).decode().strip()
        except (OSError, ValueError):
            raise ERRORS["ENOTCONN"](
                f"{paths.ENV_TOKEN_FD} names no readable token: was this process spawned "
                "by the kernel?") from None
        _set_undumpable()
        _inherited = token
    return _inherited


def _set_undumpable() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


class _Group:
    """`client.proc`, `client.llm`, ...: one method per call of the group."""

    def __init__(self, client: Any, group: str):
        self._client = client
        self._group = group

    def __getattr__(self, call: str) -> Callable[..., Any]:
        name = f"{self._group}.{call}"
        if name not in TABLE:
            raise AttributeError(f"no system call {name!r}")
        sc = TABLE[name]
        fn = self._client._stub(sc)
        fn.__name__ = call
        fn.__doc__ = f"{sc.signature()}: {sc.doc}"
        setattr(self, call, fn)  # cache
        return fn

    def __dir__(self) -> list[str]:
        return [sc.call for sc in TABLE if sc.group == self._group]


class _Stubs:
    def __getattr__(self, group: str) -> _Group:
        if group.startswith("_") or group not in TABLE.groups():
            raise AttributeError(group)
        g = _Group(self, group)
        setattr(self, group, g)
        return g


def _signum(sig: int | str) -> int:
    """9, "USR1", "SIGUSR1" -> the signal's number; ValueError for anything else."""
    if isinstance(sig, str):
        name = sig.strip().upper()
        sig = getattr(_signal.Signals, name if name.startswith("SIG") else "SIG" + name, None)
        if sig is None:
            raise ValueError(f"unknown signal {name!r}")
    return int(_signal.Signals(sig))


class _Signals:
    """What both clients share about proc.signal: SIGINT, SIGUSR1 and SIGUSR2
    sent with `proc.kill(pid, sig, payload)` arrive as [sig, payload, sender pid]
    (the sender's pid is the kernel's word, never the sender's). Without a
    handler a signal is ignored; SIGINT has already done its default by then:
    the kernel ended this process's llm.generate calls with EINTR."""

    _signal_handlers: dict[int, SignalHandler]

    def on_signal(self, sig: int | str, handler: SignalHandler | None) -> None:
        """Run handler(sig, payload, sender_pid) when sig arrives (None: ignore it)."""
        num = _signum(sig)
        if num not in wire.SIGNALS_NOTIFIED:
            names = sorted(_signal.Signals(n).name for n in wire.SIGNALS_NOTIFIED)
            raise ValueError(f"only {names} reach a client; {_signal.Signals(num).name} "
                             "acts on the process itself")
        if handler is None:
            self._signal_handlers.pop(num, None)
        else:
            self._signal_handlers[num] = handler

    def _handler_for(self, args: list) -> tuple[SignalHandler, list] | None:
        if len(args) != 3 or not isinstance(args[0], int):
            return None
        handler = self._signal_handlers.get(args[0])
        return (handler, args) if handler is not None else None


class Client(_Stubs, _Signals):
    """A synchronous connection to the kernel. Thread-safe (one call at a time).

    Signal handlers (`on_signal`) run when the call under which the signal was
    read returns (the call under way when it came, else the next one), as Unix
    delivers a signal on the way back from a system call.
    """

    def __init__(self, address: "str | Address | None" = None, token: str | None = None, *,
                 run_dir: str | Path | None = None, timeout: float | None = None,
                 max_frame: int = wire.DEFAULT_MAX_FRAME, ca: str | Path | None = None):
        self.address, token = resolve(address, token, run_dir, ca)
        self._signal_handlers = {}
        self._signals_due: deque = deque()  # (handler, args) read, to run after the call
        self._inbox: deque = deque()  # messages read past the answer of a call
        self._delivering = False
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._decoder = wire.Decoder(max_frame)
        self._sock = _open_socket(self.address, timeout)
        try:
            info = self.call("sys.hello", token)
        except BaseException:
            self.close()
            raise
        self.pid: int = info["pid"]

    # --- the call loop --------------------------------------------------------
    def call(self, method: str, *args: Any, on_notify: Notify | None = None, **kwargs: Any) -> Any:
        with self._lock:
            msgid = next(self._ids) & wire.MAX_MSGID
            self._sock.sendall(_encode(msgid, method, args, kwargs))
            try:
                while True:
                    while not self._inbox:  # what came after an answer waits for the next call
                        self._inbox.extend(self._read())  # a part of a frame gives none
                    msg = self._inbox.popleft()
                    if isinstance(msg, wire.Response) and msg.msgid == msgid:
                        if msg.error is not None:
                            raise error_for(msg.error)
                        return msg.result
                    if isinstance(msg, wire.Notification):
                        self._notification(msg, on_notify)
            finally:
                self._deliver_signals()

    def _deliver_signals(self) -> None:
        """Handlers run once the call is answered: one that makes a call of its
        own must not read the answer the interrupted call waits for."""
        if self._delivering:  # a handler's own call: the loop below goes on after it
            return
        self._delivering = True
        try:
            while self._signals_due:
                handler, args = self._signals_due.popleft()
                handler(*args)
        finally:
            self._delivering = False

    def _read(self) -> Any:
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            raise ERRORS["ETIMEDOUT"]("no answer from the kernel") from None
        except (ssl.SSLError, ConnectionResetError) as e:
            raise ERRORS["ECONNRESET"](f"the connection to the kernel broke: {e}") from None
        if not data:
            raise ERRORS["ECONNRESET"]("the kernel closed the connection")
        self._decoder.feed(data)
        return list(self._decoder.messages())

    def _notification(self, msg: wire.Notification, on_notify: Notify | None) -> None:
        if msg.method == "sys.close":
            raise ERRORS["ECONNRESET"](f"kernel closed the connection: {msg.args}")
        if msg.method == "proc.signal":
            found = self._handler_for(msg.args)
            if found is not None:
                self._signals_due.append(found)
            return
        if on_notify is not None:
            on_notify(msg.method, msg.args)

    def _stub(self, sc: Syscall) -> Callable[..., Any]:
        if sc.name == "proc.exit":
            def exit_stub(status: int = 0) -> None:
                self.call("proc.exit", status)
                self.close()
                sys.exit(status)
            return exit_stub

        def stub(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = _caller_defaults(sc, self.address, args, kwargs)
            return self.call(sc.name, *args, **kwargs)
        return stub

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _caller_defaults(sc: Syscall, address: Address, args: tuple,
                     kwargs: dict) -> tuple[tuple, dict]:
    """Defaults that belong to the caller, not the kernel: a program spawned
    from here runs in this process's working directory (as `llmos spawn`
    does), when the kernel shares this machine's file system."""
    if sc.name == "proc.spawn" and address.kind == "unix":
        i = next(n for n, p in enumerate(sc.params) if p.name == "cwd")
        if len(args) > i:
            if args[i] is None:
                args = (*args[:i], os.getcwd(), *args[i + 1:])
        elif kwargs.get("cwd") is None:
            kwargs = {**kwargs, "cwd": os.getcwd()}
    return args, kwargs


def _encode(msgid: int, method: str, args: tuple, kwargs: dict) -> bytes:
    try:
        return wire.encode_request(msgid, method, args, kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        raise ERRORS["EINVAL"](f"{method}: arguments cannot be sent as MessagePack: {e}") \
            from None


def _open_socket(addr: Address, timeout: float | None) -> socket.socket:
    ctx = tls_context(addr) if addr.kind == "tls" else None
    _refuse_clear_text(addr)
    try:
        if addr.kind in ("tcp", "tls"):
            s = socket.create_connection((addr.host, addr.port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(addr.path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ERRORS["ENOTCONN"](f"no kernel at {addr} ({e.strerror}): `llmos boot` first") \
            from None
    except OSError as e:  # no route, unknown host, timed out
        raise ERRORS["ENOTCONN"](f"cannot reach the kernel at {addr}: {e}") from None
    if ctx is None:
        return s
    try:
        return ctx.wrap_socket(s, server_hostname=addr.host)
    except BaseException as e:
        s.close()
        if isinstance(e, OSError):
            raise _tls_error(addr, e) from None
        raise


def tls_context(addr: Address) -> ssl.SSLContext:
    """What a TLS client trusts: the CA file given (and nothing else), or the
    system's CAs; TLS 1.2 at least, the host name checked."""
    try:
        ctx = ssl.create_default_context(cafile=addr.ca or None)
    except FileNotFoundError:
        raise ERRORS["ENOENT"](f"no CA file at {addr.ca}") from None
    except (OSError, ssl.SSLError) as e:
        raise ERRORS["EINVAL"](f"cannot read the CA file {addr.ca}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _tls_error(addr: Address, e: OSError) -> KernelError:
    if isinstance(e, ssl.SSLCertVerificationError):
        return ERRORS["EACCES"](
            f"the kernel at {addr} is not who it claims to be ({e.verify_message}); trusted: "
            f"{addr.ca or 'the system CAs'} (set {paths.ENV_CA} to the kernel's CA file)")
    if isinstance(e, socket.timeout):
        return ERRORS["ETIMEDOUT"](f"no TLS handshake with {addr}")
    return ERRORS["EPROTO"](f"TLS handshake with {addr} failed: {e}")


def _refuse_clear_text(addr: Address) -> None:
    """A token sent over tcp:// is in clear: only to this machine."""
    if addr.kind != "tcp" or addr.host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(addr.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ERRORS["EINVAL"](f"{addr} would carry the token in clear; tcp:// is for this "
                               "machine only, use the kernel's tls:// address")


def connect(address: "str | Address | None" = None, token: str | None = None,
            **kw: Any) -> Client:
    """A synchronous client; with no arguments it finds the kernel by itself."""
    return Client(address, token, **kw)


__all__ = ["Client", "connect", "KernelError"]
