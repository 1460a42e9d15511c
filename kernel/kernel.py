"""The kernel object and its boot sequence: one trio task tree rooted at boot.

    boot
     ├── listeners (Unix socket, optional TCP)  ── connections ── calls
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
import stat
import time
from collections import Counter
from pathlib import Path

import trio

from llmagentos.drivers.llama import Device
from llmagentos.drivers.models import ModelRegistry
from llmagentos.syscalls import paths
from llmagentos.syscalls.bootopts import ConfigError, KernelConfig  # noqa: F401  (re-exported)
from llmagentos.syscalls.errno import SyscallError

from . import (  # noqa: F401  (handlers register on import)
    dispatch,
    names,
    sysctx,
    sysenv,
    sysfs,
    sysllm,
    sysproc,
    syssys,
    systool,
    systraj,
)
from .audit import AuditLog
from .cgroups import SWEEP_S, Containment, kernel_name
from .isolation import Isolation, make_kernel_undumpable
from .memory import ContextStore
from .proc import PCB, ProcessTable
from .scheduler import Scheduler
from .server import serve_listener
from .threads import ThreadShares
from .trajectories import TrajectoryStore

log = logging.getLogger("llmagentos.kernel")

VERSION = "0.1.0"


class BootError(Exception):
    """The kernel cannot boot; the message says why and what to do."""


class Kernel:
    def __init__(self, config: KernelConfig):
        self.config = config
        try:
            config.check()
        except ConfigError as e:
            raise BootError(str(e)) from None
        self.boot_time = time.time()
        self.stats: Counter[str] = Counter()
        self.procs = ProcessTable(config.state_dir / "logs")
        self.log_readers: dict[int, frozenset[int]] = {}  # reaped pid -> who may read its log
        self.shutdown_requested = trio.Event()
        self.tcp_address: str | None = None
        self._lock_fd: int | None = None
        self.on_renice: list = []  # callbacks(pcb) when a nice value changes
        self.audit: AuditLog | None = None
        self.models = ModelRegistry(config.config)  # EINVAL/ENOENT: a boot error
        self.device: Device | None = None
        self.scheduler: Scheduler | None = None
        self.embed_lock = trio.Lock()
        self.context_generation = sysctx.context_generation
        self.memory: ContextStore | None = None
        self.cluster = None  # a kernel.cluster.Cluster when booted with --ray
        self.containment: Containment | None = None
        self.threads = ThreadShares()  # each process's share of the worker threads
        self.connections: set = set()  # open server.Connection objects
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
        self._isolate()
        sock = cfg.socket_path
        if sock.exists() or sock.is_symlink():
            if _socket_alive(sock):
                raise BootError(f"{sock} is answering although no kernel holds the lock")
            log.warning("replacing stale socket %s from a crashed kernel", sock)
            sock.unlink()

    def _isolate(self) -> None:
        """Pick the isolation level for spawned processes; the kernel itself
        becomes undumpable (it holds every token)."""
        cfg = self.config
        make_kernel_undumpable()
        hide_dirs = [cfg.state_dir]
        if cfg.run_dir.resolve().is_relative_to(cfg.state_dir.resolve()):
            log.warning("the run dir is inside the state dir: the state dir cannot be hidden "
                        "from spawned processes")
            hide_dirs = []
        try:
            self.procs.isolation = Isolation.probe(cfg.isolation, hide_dirs,
                                                   [cfg.run_dir / paths.TOKEN_NAME])
        except RuntimeError as e:
            raise BootError(str(e)) from None
        log.info("isolation of spawned processes: %s", self.procs.isolation.level)

    def _write_run_files(self) -> None:
        rd = self.config.run_dir
        _write_private(rd / paths.TOKEN_NAME, self.procs.init.token + "\n")
        _write_private(rd / paths.PIDFILE_NAME, f"{os.getpid()}\n")
        if self.tcp_address:
            _write_private(rd / paths.TCP_NAME, self.tcp_address + "\n")

    def _remove_run_files(self) -> None:
        rd = self.config.run_dir
        for name in (paths.SOCKET_NAME, paths.PIDFILE_NAME, paths.TOKEN_NAME, paths.TCP_NAME):
            try:
                (rd / name).unlink()
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _open_listeners(self) -> list[trio.SocketListener]:
        sock_path = str(self.config.socket_path)
        usock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            await usock.bind(sock_path)
        finally:
            os.umask(old)
        os.chmod(sock_path, 0o600)
        usock.listen(128)
        listeners = [trio.SocketListener(usock)]
        self.procs.socket_address = sock_path
        if self.config.tcp:
            host, _, port = self.config.tcp.rpartition(":")
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise BootError(f"--tcp must be a loopback address, got {host!r}")
            try:
                tcp = await trio.open_tcp_listeners(int(port), host=host)
            except OSError as e:
                raise BootError(f"cannot listen on {self.config.tcp}: {e}") from None
            addr = tcp[0].socket.getsockname()
            self.tcp_address = f"tcp://{addr[0]}:{addr[1]}"
            self.procs.tcp_address = self.tcp_address
            listeners += tcp
        return listeners

    async def _load_device(self) -> None:
        cfg = self.config
        if cfg.ray:
            from .cluster import Cluster  # imports ray: only when asked for

            self.cluster = Cluster(cfg)
            self.device, self.scheduler = await self.cluster.start(self.models)
            self.procs.cluster = self.cluster
            return
        if cfg.model == "none":
            return
        log.info("loading model %s", cfg.model)
        try:
            self.device = await trio.to_thread.run_sync(lambda: Device(
                cfg.model, registry=self.models, n_seq_max=cfg.slots, n_ctx=cfg.n_ctx,
                n_threads=cfg.threads, n_gpu_layers=cfg.n_gpu_layers))
        except SyscallError as e:
            raise BootError(f"cannot load model {cfg.model!r}: {e.message}") from None
        self.scheduler = Scheduler(self.device, cfg.policy, cfg.quantum, cfg.snapshot_ram,
                                   str(cfg.state_dir / "kv"))
        log.info("model %s loaded: %d slots x %d tokens", self.device.model_name,
                 self.device.n_seq_max, self.device.n_ctx)

    def count_tokens(self, text: str) -> int:
        if self.device is not None:
            return len(self.device.tokenize(text, add_bos=False))
        return len(text.encode()) // 4 + 1  # no device: a byte-based estimate

    def _open_memory(self) -> None:
        embed = None
        if self.config.embed_memory and self.config.model != "none":
            # From memory's worker threads, through the run queue (owner 0: the kernel).
            def embed(texts: list[str]) -> list[list[float]]:
                return trio.from_thread.run(sysllm.embed_texts, self, 0, texts)
        self.memory = ContextStore(self.config.state_dir / "memory.db", self.count_tokens,
                                   embed=embed)
        self.procs.names = names.NameTable(self.procs, self.memory)
        self.procs.on_exit.append(lambda pcb: names.forget(self, pcb))

    async def _embed_archive(self) -> None:
        """Give archived messages their vectors in the background, a batch at a
        time, so ctx.search can find by meaning as well as by words."""
        while True:
            async with self.embed_lock:
                n = await trio.to_thread.run_sync(self.memory.embed_pending, 32,
                                                  abandon_on_cancel=False)
            await trio.sleep(0.05 if n else 1.0)

    def _hook_device(self, root: trio.Nursery) -> None:
        """Signals and exits reach the run queue: STOP parks, CONT resumes,
        exit (KILL included) frees slots and saved state."""
        sched = self.scheduler

        def on_signal(pcb: PCB, sig: int) -> None:
            if sig == signal.SIGSTOP:
                sched.stop(pcb.pid)
            elif sig == signal.SIGCONT:
                sched.cont(pcb.pid)

        self.procs.on_signal.append(on_signal)
        self.procs.on_exit.append(lambda pcb: root.start_soon(sched.release, pcb.pid))
        self.on_renice.append(lambda pcb: sched.set_nice(pcb.pid, pcb.nice))

    def _contain(self) -> None:
        """Probe OS containment once; the run dir's lock is held, so the per-kernel
        parent group (named after the run dir) is ours to clean and use."""
        try:
            self.containment = Containment.probe(kernel_name(self.config.run_dir),
                                                 self.config.containment)
        except (ValueError, OSError) as e:
            self._remove_run_files()
            raise BootError(f"--containment {self.config.containment}: {e}") from None
        # Without Ray, every child of the kernel is a process of ours or one they left.
        self.containment.own_all_children = self.config.ray is None
        self.procs.containment = self.containment
        log.info("containment %s (caps: %s)", self.containment.level,
                 ", ".join(self.containment.controllers) or "none")

    async def _sweep_orphans(self) -> None:
        """Subreaper containment: follow each group's processes, reap adopted orphans."""
        while True:
            self.containment.tick()
            await trio.sleep(SWEEP_S)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Boot, serve until shutdown, clean up. task_status.started() once
        the socket accepts connections."""
        self._prepare_dirs()
        self.audit = AuditLog(self.config.state_dir / "audit.db")
        self._open_memory()
        self.tools = systool.kernel_tools(self, self.config.state_dir)
        self.trajectories = TrajectoryStore(self.config.state_dir / "trajectories.db")
        names.forget_unnamed(self)  # before the first pid is handed out
        self.procs.on_exit.append(lambda pcb: self.tools.drop_pid(pcb.pid, "exited"))
        self.procs.on_exit.append(lambda pcb: sysproc.note_log_readers(self, pcb))
        self.procs.on_exit.append(lambda pcb: sysfs.release(self, pcb))
        self.procs.on_exit.append(lambda pcb: sysenv.release(self, pcb))
        listeners: list[trio.SocketListener] = []
        self._contain()
        try:
            await self._load_device()
            listeners = await self._open_listeners()
            self._write_run_files()
            async with trio.open_nursery() as root:
                self.procs.nursery = root
                self.tools.nursery = root
                root.start_soon(self._signals)
                root.start_soon(self.audit.writer)
                if self.containment.level == "subreaper":
                    root.start_soon(self._sweep_orphans)
                if self.scheduler is not None:
                    await root.start(self.scheduler.run)
                    self._hook_device(root)
                if self.config.embed_memory and self.device is not None:
                    root.start_soon(self._embed_archive)
                for lst in listeners:
                    await root.start(serve_listener, self, lst)
                log.info("kernel up on %s (pid %d)", self.config.socket_path, os.getpid())
                task_status.started(self)
                await self.shutdown_requested.wait()
                log.info("shutting down: TERM, %.1fs grace, KILL", self.config.grace)
                self.procs.nursery = None  # no new processes from here on
                await self.procs.terminate_all(self.config.grace)
                self.containment.sweep()  # what is left of any group dies now
                # Let answers already on their way (sys.shutdown's own) reach their clients.
                await trio.sleep(0.05)
                root.cancel_scope.cancel()
        finally:
            self.containment.close()  # every group killed, the parent group removed
            for lst in listeners:
                lst.socket.close()
            self.audit.close()
            if self.memory is not None:
                self.memory.close()
            self.trajectories.close()
            if self.device is not None:
                self.device.close()
            if self.cluster is not None:
                self.cluster.close()
            self._remove_run_files()
            log.info("kernel down")

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                self.shutdown_requested.set()

    def shutdown(self, grace: float | None = None) -> None:
        if grace is not None:
            self.config.grace = grace
        self.shutdown_requested.set()

    def uname(self) -> dict:
        return {
            "sysname": "LLMAgentOS", "release": VERSION, "pid": os.getpid(),
            "boot_time": self.boot_time, "uptime": time.time() - self.boot_time,
            "socket": str(self.config.socket_path), "tcp": self.tcp_address,
            "run_dir": str(self.config.run_dir), "state_dir": str(self.config.state_dir),
            "policy": self.config.policy,
            "isolation": self.procs.isolation.describe(),
            "model": self.device.model_name if self.device else None,
            "slots": self.scheduler.n_slots if self.scheduler else 0,
            "n_ctx": self.device.n_ctx if self.device else 0,
            "containment": self.containment.describe() if self.containment else None,
        }


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_STATE_DIRS = ("logs", "fs", "kv", "shared")  # what the kernel makes in its state dir


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
