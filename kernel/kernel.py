"""The kernel object and its boot sequence: one trio task tree rooted at boot.

The Kernel owns the services (kernel/services.py, where they are made) and
runs the lifecycle around them; nothing else in kernel/ but the entry point
(__main__.py) imports this module: handlers are handed the services.

    boot
     ├── listeners (Unix socket, optional TCP and TLS)  ── connections ── calls
     ├── HTTP gateway (optional: --http)                ── requests, each as a key's process
     ├── process watchers (one per child)
     └── device loop (from the compute-device issue on)

Shutdown (sys.shutdown, SIGTERM, SIGINT) is: TERM every process, a grace
period, KILL, then cancel the root; `async with` releases the rest, and the
socket, pidfile and lock are removed last.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import signal
import socket
import ssl
import stat
from pathlib import Path

import trio

from llmagentos.syscalls import paths
from llmagentos.syscalls.bootopts import (  # noqa: F401  (KernelConfig re-exported)
    ConfigError,
    KernelConfig,
    host_port,
)

from . import (  # noqa: F401  (handlers register on import)
    dispatch,
    sysblocks,
    sysctx,
    sysenv,
    sysfs,
    syskey,
    sysllm,
    sysmail,
    syspipe,
    sysproc,
    syssvc,
    syssys,
    systool,
    systraj,
)
from .cgroups import SWEEP_S
from .isolation import make_kernel_undumpable
from .server import serve_listener
from .services import BootError, Services

log = logging.getLogger("llmagentos.kernel")


class Kernel:
    """The boot and shutdown lifecycle around the kernel's services (`sys`),
    which it alone owns; handlers only ever see those."""

    def __init__(self, config: KernelConfig):
        try:
            config.check()
        except ConfigError as e:
            raise BootError(str(e)) from None
        self.config = config
        self.sys = Services.create(config)
        self._lock_fd: int | None = None
        if dispatch.missing():
            log.warning("syscalls without a handler (ENOSYS): %s", dispatch.missing())

    # --- boot -----------------------------------------------------------------
    def _prepare_dirs(self) -> None:
        cfg = self.config
        os.umask(0o077)  # what the kernel makes is its user's alone (spawn resets it)
        cfg.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (cfg.state_dir / "logs").mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_private(cfg.run_dir, ())
        _make_private(cfg.state_dir, _STATE_DIRS)
        # One kernel per run dir: an flock held for the kernel's life.
        fd = os.open(cfg.run_dir / paths.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _read_pidfile(cfg.run_dir / paths.PIDFILE_NAME)
            raise BootError(f"a kernel is already running on {cfg.run_dir}"
                            + (f" (pid {pid})" if pid else "")
                            + "; shut it down with `llmos shutdown` or use --run-dir") from None
        self._lock_fd = fd
        make_kernel_undumpable()  # the kernel holds every token
        self.sys.isolate()
        sock = cfg.socket_path
        if sock.exists() or sock.is_symlink():
            if _socket_alive(sock):
                raise BootError(f"{sock} is answering although no kernel holds the lock")
            log.warning("replacing stale socket %s from a crashed kernel", sock)
            sock.unlink()

    def _write_run_files(self) -> None:
        rd, procs = self.config.run_dir, self.sys.procs
        _write_private(rd / paths.TOKEN_NAME, procs.init.token + "\n")
        _write_private(rd / paths.PIDFILE_NAME, f"{os.getpid()}\n")
        if procs.tcp_address:
            _write_private(rd / paths.TCP_NAME, procs.tcp_address + "\n")
        if procs.tls_address:
            _write_private(rd / paths.TLS_NAME, procs.tls_address + "\n")
        if self.sys.http_address:
            _write_private(rd / paths.HTTP_NAME, self.sys.http_address + "\n")

    def _remove_run_files(self) -> None:
        rd = self.config.run_dir
        for name in (paths.SOCKET_NAME, paths.PIDFILE_NAME, paths.TOKEN_NAME, paths.TCP_NAME,
                     paths.TLS_NAME, paths.HTTP_NAME):
            try:
                (rd / name).unlink()
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _open_listeners(self) -> list[tuple[trio.SocketListener, ssl.SSLContext | None]]:
        """Each listener with the TLS context its connections speak (None: plain)."""
        sock_path = str(self.config.socket_path)
        usock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            await usock.bind(sock_path)
        finally:
            os.umask(old)
        os.chmod(sock_path, 0o600)
        usock.listen(128)
        listeners: list = [(trio.SocketListener(usock), None)]
        cfg, procs = self.config, self.sys.procs
        procs.socket_address = sock_path
        if cfg.tcp:  # loopback only (KernelConfig.check)
            host, port = host_port(cfg.tcp)
            tcp = await _tcp_listeners(cfg.tcp, host, port)
            addr = tcp[0].socket.getsockname()
            procs.tcp_address = f"tcp://{_url_host(addr[0])}:{addr[1]}"
            listeners += [(lst, None) for lst in tcp]
            procs.remote_address = procs.tcp_address  # this machine's nodes only
        if cfg.listen:
            from .tls import WILDCARDS, credentials, server_context  # cryptography: only here
            host, port = host_port(cfg.listen)
            node_ip = self.sys.cluster.node_ip if self.sys.cluster else ""
            creds = await trio.to_thread.run_sync(credentials, cfg.state_dir, host,
                                                  cfg.tls_cert, cfg.tls_key,
                                                  (node_ip,) if node_ip else ())
            ctx = server_context(creds)
            tls = await _tcp_listeners(cfg.listen, host, port)
            bound = tls[0].socket.getsockname()[1]
            shown = socket.gethostname() if host in WILDCARDS else host
            procs.tls_address = f"tls://{_url_host(shown)}:{bound}"
            procs.tls_ca = str(creds.ca) if creds.ca else ""
            # cluster nodes dial the address Ray knows this machine by
            dialed = node_ip if host in WILDCARDS and node_ip else shown
            procs.remote_address = f"tls://{_url_host(dialed)}:{bound}"
            log.info("TLS listener on %s (CA %s)", procs.tls_address,
                     creds.ca or f"the one that signed {creds.cert}")
            listeners += [(lst, ctx) for lst in tls]
        return listeners

    async def _embed_archive(self) -> None:
        """Give archived messages their vectors in the background, a batch at a
        time, so ctx.search can find by meaning as well as by words."""
        sv = self.sys
        while True:
            async with sv.embed_lock:
                n = await trio.to_thread.run_sync(sv.memory.embed_pending, 32,
                                                  abandon_on_cancel=False)
            await trio.sleep(0.05 if n else 1.0)

    async def _sweep_orphans(self) -> None:
        """Subreaper containment: follow each group's processes, reap adopted orphans."""
        while True:
            self.sys.containment.tick()
            await trio.sleep(SWEEP_S)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Boot, serve until shutdown, clean up. task_status.started() once
        the socket accepts connections."""
        sv = self.sys
        self._prepare_dirs()
        sv.open_stores()
        listeners: list[tuple[trio.SocketListener, ssl.SSLContext | None]] = []
        try:
            sv.contain()
        except BootError:
            self._remove_run_files()
            raise
        try:
            await sv.load_device()
            listeners = await self._open_listeners()
            async with trio.open_nursery() as root:
                sv.procs.nursery = root
                sv.tools.nursery = root
                sv.keys.start(root)  # each API key's process, as it was
                root.start_soon(self._signals)
                root.start_soon(sv.audit.writer)
                root.start_soon(sv.mail.waits.timer)
                if sv.containment.level == "subreaper":
                    root.start_soon(self._sweep_orphans)
                await sv.table.start(root)  # each loaded model's run queue
                sv.hook_device(root)
                if self.config.embed_memory and sv.device is not None:
                    root.start_soon(self._embed_archive)
                for lst, tls in listeners:
                    await root.start(serve_listener, sv, lst, tls)
                if self.config.http:
                    from .gateway.serve import serve_http  # Starlette: only when asked for
                    sv.http_address = await root.start(serve_http, sv, self.config)
                self._write_run_files()
                sv.supervisor.start(root)  # the config file's services, once calls are served
                log.info("kernel up on %s (pid %d)", self.config.socket_path, os.getpid())
                task_status.started(self)
                await sv.shutdown_requested.wait()
                log.info("shutting down: TERM, %.1fs grace, KILL", self.config.grace)
                sv.supervisor.shutdown()  # nothing is restarted from here on
                sv.procs.nursery = None  # no new processes from here on
                await sv.procs.terminate_all(self.config.grace)
                sv.containment.sweep()  # what is left of any group dies now
                # Let answers already on their way (sys.shutdown's own) reach their clients.
                await trio.sleep(0.05)
                root.cancel_scope.cancel()
        finally:
            for lst, _ in listeners:
                lst.socket.close()
            sv.close()  # every group killed first, then the stores and the device
            self._remove_run_files()
            log.info("kernel down")

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                self.sys.request_shutdown()


async def _tcp_listeners(given: str, host: str, port: int) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise BootError(f"cannot listen on {given}: {e}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_STATE_DIRS = ("logs", "fs", "kv", "shared", "tls")  # what the kernel makes in its state dir


def _make_private(top: Path, subdirs: tuple[str, ...]) -> None:
    """Tighten what an older kernel (or umask) left open to others: ``top``
    0700 (unless it is a shared sticky dir such as /tmp), its databases 0600,
    and in ``subdirs`` each dir 0700 (a sandbox's contents sit behind its
    root's 0700) and each file 0600 (but for files agents share)."""
    if not os.stat(top).st_mode & stat.S_ISVTX:
        os.chmod(top, 0o700)
    for e in os.scandir(top):
        if e.is_symlink():
            continue
        if e.is_file() and ".db" in e.name:
            os.chmod(e.path, 0o600)
        elif e.is_dir() and e.name in subdirs:
            os.chmod(e.path, 0o700)
            for f in os.scandir(e.path):
                if f.is_symlink():
                    continue
                if f.is_dir():
                    os.chmod(f.path, 0o700)
                elif e.name != "shared":
                    os.chmod(f.path, 0o600)


def _read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _socket_alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(str(path))
        return True
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        s.close()
