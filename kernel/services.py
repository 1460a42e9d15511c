"""The kernel's services, and the one place where they are made and wired.

A handler is handed a `Services` (``call.sys``), never the Kernel: the
process table, the context store, the loaded models (each a device and its
run queue: kernel/modeltable.py), the tool table and the rest, each the one
owner of its concern. The Kernel
(kernel/kernel.py) owns one and runs the lifecycle around it: run dir and
lock, listeners, signals, the root nursery, shutdown.

The services depend on each other only through what is made here: exit hooks
on the process table, memory's embeddings through the run queue, the run
queue told of signals and nice values. They come up in steps, in boot order:
`create` when the kernel object is made (a broken model registry is a boot
error before anything is touched), `isolate`, `open_stores` and `contain`
once the run dir is locked, `load_device`, then `hook_device` once the device
loop runs; `close` releases them.

Handler modules import this one for its type only (under TYPE_CHECKING): it
imports them, for the hooks and the kernel's own tools they define.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from llmagentos.drivers.models import ModelRegistry
from llmagentos.syscalls import paths
from llmagentos.syscalls.bootopts import KernelConfig
from llmagentos.syscalls.errno import SyscallError

from . import names, sysctx, sysfs, sysllm, systool
from .audit import AuditLog
from .cgroups import Containment, kernel_name
from .gateway.keys import KeyTable
from .isolation import Isolation
from .mailbox import Mailboxes
from .memory import ContextStore
from .modeltable import Loaded, ModelTable
from .proc import PCB, ProcessTable
from .supervisor import Supervisor, specs_from_config
from .threads import ThreadShares
from .tools import ToolTable
from .trajectories import TrajectoryStore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from llmagentos.drivers.gymenv import EnvTable

    from .cluster import Cluster
    from .server import Connection

log = logging.getLogger("llmagentos.kernel")

VERSION = "0.1.0"
MAX_NOTIFY_BACKLOG = 1 << 20  # bytes queued to a connection before notify_process refuses


class BootError(Exception):
    """The kernel cannot boot; the message says why and what to do."""


@dataclass(eq=False)
class Services:
    """What the kernel's handlers act on. Fields after ``context_generation``
    are None until their boot step (and the device ones stay None without a
    model)."""

    config: KernelConfig
    models: ModelRegistry  # the models this kernel may load
    procs: ProcessTable
    table: ModelTable = field(init=False)  # the loaded ones: name -> device and run queue
    supervisor: Supervisor = field(init=False)  # the supervised services (svc.*)
    boot_time: float = field(default_factory=time.time)
    stats: Counter[str] = field(default_factory=Counter)
    threads: ThreadShares = field(default_factory=ThreadShares)  # each process's share
    connections: set[Connection] = field(default_factory=set)  # open server.Connections
    shutdown_requested: trio.Event = field(default_factory=trio.Event)
    embed_lock: trio.Lock = field(default_factory=trio.Lock)  # one archive batch at a time
    fs_trash_lock: trio.Lock = field(default_factory=trio.Lock)  # one trash emptier at a time
    # llm.generate(context=true); sysllm reaches it here, sysctx imports sysllm
    context_generation: Callable[..., Awaitable[dict]] = sysctx.context_generation
    audit: AuditLog | None = None
    memory: ContextStore | None = None
    tools: ToolTable | None = None
    trajectories: TrajectoryStore | None = None
    mail: Mailboxes | None = None
    containment: Containment | None = None
    cluster: Cluster | None = None  # booted with --ray
    keys: KeyTable | None = None  # the HTTP gateway's API keys, each a process
    http_address: str = ""  # http://HOST:PORT of the gateway, when it listens
    _envs: EnvTable | None = None
    _metrics: CollectorRegistry | None = None

    def __post_init__(self) -> None:
        self.table = ModelTable(self.models, self.config)
        self.procs.notify = self.notify_process
        try:  # the config file's [services]: a bad one is a boot error before anything runs
            self.supervisor = Supervisor(self.procs, specs_from_config(self.config.config))
        except SyscallError as e:
            raise BootError(e.message) from None

    def notify_process(self, pcb: PCB, method: str, args: list) -> int:
        """A notification to each open connection of pcb; returns how many it
        reached (0: the process talks to the kernel on none). EAGAIN when every
        one has more than MAX_NOTIFY_BACKLOG bytes its client has not read."""
        conns = [c for c in self.connections if c.pcb is pcb and not c.closed]
        reading = [c for c in conns if c.backlog() <= MAX_NOTIFY_BACKLOG]
        if conns and not reading:
            raise SyscallError("EAGAIN", f"pid {pcb.pid} is not reading its connection")
        for c in reading:
            c.notify_nowait(method, args)
        return len(reading)

    @property
    def metrics(self) -> "CollectorRegistry":
        """The kernel's Prometheus registry, made at the first scrape (prometheus-client
        is not imported by a kernel nobody scrapes)."""
        if self._metrics is None:
            from . import metrics
            self._metrics = metrics.registry(self)
        return self._metrics

    @property
    def device(self) -> Any:
        """The default model's device, where the kernel itself needs one (context
        memory's embeddings and token counts); None without a local default model."""
        d = self.table.default
        return self.table.loaded[d].device if d is not None else None

    @property
    def scheduler(self) -> Any:
        """The default model's run queue (with --ray, a DeviceSet); None without one."""
        d = self.table.default
        return self.table.loaded[d].queue if d is not None else None

    @property
    def envs(self) -> EnvTable:
        """Gymnasium environments, each of one process; Gymnasium loads on first use."""
        if self._envs is None:
            from llmagentos.drivers.gymenv import EnvTable
            self._envs = EnvTable(stats=self.stats)
        return self._envs

    @classmethod
    def create(cls, config: KernelConfig) -> Services:
        return cls(config=config,
                   models=ModelRegistry(config.config),  # EINVAL/ENOENT: a boot error
                   procs=ProcessTable(config.state_dir / "logs"))

    # --- boot steps, in order -----------------------------------------------------------
    def isolate(self) -> None:
        """Pick the isolation level for spawned processes: hidden from them are
        the state dir (unless the run dir is inside it) and the run dir's token."""
        cfg = self.config
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

    def open_stores(self) -> None:
        """The databases and the tables over them; what a process leaves at exit
        goes with it. Then what unnamed processes of earlier boots left, before
        the first pid is handed out."""
        state, procs = self.config.state_dir, self.procs
        self.audit = AuditLog(state / "audit.db")
        self._open_memory()
        self.tools = systool.kernel_tools(self, state)
        self.trajectories = TrajectoryStore(state / "trajectories.db")
        self.keys = KeyTable(self, state / "keys.db")
        names.forget_unnamed(self)
        procs.on_exit.append(lambda pcb: names.forget(self, pcb))
        procs.on_exit.append(lambda pcb: self.tools.drop_pid(pcb.pid, "exited"))
        procs.on_exit.append(lambda pcb: sysfs.release(self, pcb))
        procs.on_exit.append(lambda pcb: self._envs and self._envs.close_owner(pcb.pid))
        self.mail = Mailboxes(procs, self.memory.mail, procs.names.boot,
                              self.config.mailbox_depth, self.config.max_frame)
        procs.on_exit.append(self.mail.drop)

    def _open_memory(self) -> None:
        embed = None
        if self.config.embed_memory and self.config.model != "none":
            # From memory's worker threads, through the run queue (owner 0: the kernel).
            def embed(texts: list[str]) -> list[list[float]]:
                return trio.from_thread.run(sysllm.embed_texts, self, 0, texts)
        self.memory = ContextStore(self.config.state_dir / "memory.db", self.count_tokens,
                                   embed=embed)
        self.procs.names = names.NameTable(self.procs, self.memory)

    def contain(self) -> None:
        """Probe OS containment once; the run dir's lock is held, so the per-kernel
        parent group (named after the run dir) is ours to clean and use."""
        cfg = self.config
        try:
            self.containment = Containment.probe(kernel_name(cfg.run_dir), cfg.containment)
        except (ValueError, OSError) as e:
            raise BootError(f"--containment {cfg.containment}: {e}") from None
        # Without Ray, every child of the kernel is a process of ours or one they left.
        self.containment.own_all_children = cfg.ray is None
        self.procs.containment = self.containment
        log.info("containment %s (caps: %s)", self.containment.level,
                 ", ".join(self.containment.controllers) or "none")

    async def load_device(self) -> None:
        """The models to load at boot: --model (the default) and --load, in order."""
        cfg = self.config
        names = [m for m in dict.fromkeys([cfg.model, *cfg.load]) if m != "none"]
        if cfg.ray:
            from .cluster import Cluster  # imports ray: only when asked for

            self.cluster = Cluster(cfg)
            device, queue = await self.cluster.start(self.models)
            self.procs.cluster = self.cluster
            if queue is not None:
                self.table.add(Loaded(device.model_name, "gguf", device, queue))
                names = names[1:]
        for name in names:
            try:
                await self.table.load(name)
            except SyscallError as e:
                raise BootError(f"cannot load model {name!r}: {e.message}") from None

    def hook_device(self, nursery: trio.Nursery) -> None:
        """Signals, nice values and exits reach every loaded run queue: STOP parks,
        CONT resumes, exit (KILL included) frees slots and saved state."""
        table = self.table

        def on_signal(pcb: PCB, sig: int) -> None:
            if sig == signal.SIGSTOP:
                table.stop(pcb.pid)
            elif sig == signal.SIGCONT:
                table.cont(pcb.pid)

        self.procs.on_signal.append(on_signal)
        self.procs.on_exit.append(lambda pcb: nursery.start_soon(table.release, pcb.pid))
        self.procs.on_renice.append(lambda pcb: table.set_nice(pcb.pid, pcb.nice))

    def close(self) -> None:
        """Every group killed and the parent group removed, then the stores and
        the device; whatever boot got to."""
        if self.containment is not None:
            self.containment.close()
        for part in (self.keys, self.audit, self.memory, self.trajectories, self.table,
                     self.cluster):
            if part is not None:
                part.close()

    # --- what handlers ask of the kernel as a whole -------------------------------------
    def count_tokens(self, text: str) -> int:
        if self.device is not None:
            return len(self.device.tokenize(text, add_bos=False))
        return len(text.encode()) // 4 + 1  # no device: a byte-based estimate

    def request_shutdown(self, grace: float | None = None) -> None:
        """Ask the kernel to shut down (it TERMs, waits ``grace`` seconds, KILLs)."""
        if grace is not None:
            self.config.grace = grace
        self.shutdown_requested.set()

    def uname(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "sysname": "LLMAgentOS", "release": VERSION, "pid": os.getpid(),
            "boot_time": self.boot_time, "uptime": time.time() - self.boot_time,
            "socket": str(cfg.socket_path), "tcp": self.procs.tcp_address or None,
            "tls": self.procs.tls_address or None, "tls_ca": self.procs.tls_ca or None,
            "http": self.http_address or None,
            "run_dir": str(cfg.run_dir), "state_dir": str(cfg.state_dir),
            "policy": cfg.policy,
            "isolation": self.procs.isolation.describe(),
            "model": self.table.default,
            "models": list(self.table.loaded),
            "slots": self.scheduler.n_slots if self.scheduler else 0,
            "n_ctx": self.device.n_ctx if self.device else 0,
            "containment": self.containment.describe() if self.containment else None,
        }
