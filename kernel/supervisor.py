"""Supervised services: commands the kernel keeps running (drivers, MCP bridges,
gateways), each as a process of init that shows in `ps` and can be killed.

When a service's process dies the kernel starts it again after a delay that
starts at ``backoff`` seconds and doubles with each crash up to
``backoff_max``; once a run has lasted ``stable`` seconds the next delay is
``backoff`` again. ``restart = "on-failure"`` leaves a service that exited
with status 0 alone. `svc.stop` ends it for good (TERM, KILL after a grace);
`svc.restart` starts it afresh at once.

A driver that is a service registers its namespace again when restarted:
callers in flight when it died got EIO (kernel/tools.py), calls after it
registered again succeed.

Services come from the kernel config file's ``[services]`` table, started at
boot (``[services.NAME]`` with ``argv`` and the options of `svc.add`), or
from `svc.add` at run time, kept in memory for this boot only. Each service
has one task in the kernel's root nursery that starts, watches and restarts
its process; every change of a service goes through that task.
"""

from __future__ import annotations

import logging
import re
import shlex
import signal
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import trio

from llmagentos.syscalls.errno import SyscallError

from .proc import PCB, ProcessTable

log = logging.getLogger("llmagentos.kernel")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESTARTS = ("always", "on-failure")
MAX_SERVICES = 256
KILL_WAIT = 5.0  # seconds to wait for a KILLed process's exit to be seen


@dataclass(frozen=True)
class ServiceSpec:
    """What a service runs and how it is restarted (the parameters of svc.add)."""

    name: str
    argv: tuple[str, ...]
    restart: str = "always"
    caps: tuple[str, ...] | None = None  # None: a child's default set
    env: dict[str, str] | None = None
    cwd: str | None = None
    backoff: float = 0.1
    backoff_max: float = 30.0
    stable: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise SyscallError("EINVAL", f"service name {self.name!r:.80} must be 1..64 of "
                                         "letters, digits, '_', '.', '-', starting with a "
                                         "letter or digit")
        if not self.argv or not all(isinstance(a, str) and a and "\0" not in a
                                    for a in self.argv):
            raise SyscallError("EINVAL", f"service {self.name!r}: argv must be a non-empty "
                                         "list of non-empty strings without NUL")
        if self.restart not in RESTARTS:
            raise SyscallError("EINVAL", f"service {self.name!r}: restart must be one of "
                                         f"{', '.join(RESTARTS)}, not {self.restart!r}")
        if self.caps is not None and not all(isinstance(c, str) for c in self.caps):
            raise SyscallError("EINVAL", f"service {self.name!r}: caps must be strings")
        if self.env is not None and not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in self.env.items()):
            raise SyscallError("EINVAL", f"service {self.name!r}: env must map strings to "
                                         "strings")
        for what in ("backoff", "backoff_max", "stable"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e6:
                raise SyscallError("EINVAL", f"service {self.name!r}: {what} must be a number "
                                             f"of seconds in 0..1e6, not {v!r}")
        if not 0.01 <= self.backoff <= self.backoff_max:
            raise SyscallError("EINVAL", f"service {self.name!r}: backoff must be at least "
                                         f"0.01 and at most backoff_max ({self.backoff_max})")

    @classmethod
    def from_table(cls, where: str, name: str, table: Any) -> ServiceSpec:
        """A ``[services.NAME]`` table of a config file: ``argv`` (a list, or a
        string split as a shell would) and the options of svc.add; a relative
        ``cwd`` is relative to the file."""
        if not isinstance(table, dict):
            raise SyscallError("EINVAL", f"{where}: [services.{name}] must be a table")
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise SyscallError("EINVAL", f"{where}: [services.{name}]: unknown keys {unknown}; "
                                         f"known: {sorted(known)}")
        t = dict(table)
        argv = t.pop("argv", None)
        if isinstance(argv, str):
            argv = shlex.split(argv)
        if not isinstance(argv, list):
            raise SyscallError("EINVAL", f"{where}: [services.{name}] needs argv, a list of "
                                         "strings or a command line")
        for key, typ in (("restart", str), ("cwd", str), ("caps", list), ("env", dict)):
            if key in t and not isinstance(t[key], typ):
                raise SyscallError("EINVAL", f"{where}: [services.{name}] {key} must be a "
                                             f"{typ.__name__}")
        if "cwd" in t:
            t["cwd"] = str((Path(where).parent / t["cwd"]).resolve())
        if "caps" in t:
            t["caps"] = tuple(t["caps"])
        try:
            return cls(name=name, argv=tuple(argv), **t)
        except SyscallError as e:
            raise SyscallError("EINVAL", f"{where}: {e.message}") from None


def specs_from_config(path: Path | None) -> list[ServiceSpec]:
    """The ``[services]`` table of a kernel config file (EINVAL naming the key)."""
    if path is None:
        return []
    import tomllib
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SyscallError("EINVAL", f"cannot read config file {path}: {e}") from None
    table = data.get("services", {})
    if not isinstance(table, dict):
        raise SyscallError("EINVAL", f"{path}: [services] must be a table of [services.NAME]")
    return [ServiceSpec.from_table(str(path), name, t) for name, t in table.items()]


@dataclass(eq=False)
class Service:
    """One service's state, changed only by its supervising task (and flags set
    for that task by svc.stop/restart)."""

    spec: ServiceSpec
    origin: str  # "config" (started at boot) or "runtime" (svc.add)
    state: str = "starting"  # starting running backoff stopped exited
    pcb: PCB | None = None
    restarts: int = 0  # starts after the first
    starts: int = 0  # start attempts made, failed spawns included
    begun: int = 0  # start attempts begun (one may be in flight)
    last_exit: dict | None = None
    delay: float = 0.0  # the delay before the latest (or coming) restart
    short_runs: int = 0  # runs in a row that ended before lasting `stable` seconds
    since: float = field(default_factory=time.time)  # when the state last changed
    wanted: bool = True  # False: stop (svc.stop, remove, shutdown)
    restart_now: bool = False  # svc.restart: end the process, start at once
    grace: float = 3.0
    running: bool = False  # its task is live
    wake: trio.Event = field(default_factory=trio.Event)  # a request for the task
    changed: trio.Event = field(default_factory=trio.Event)  # set (and renewed) on change

    def __post_init__(self) -> None:
        self.delay = self.spec.backoff

    def row(self) -> dict[str, Any]:
        s = self.spec
        pid = self.pcb.pid if self.pcb is not None and not self.pcb.exited else None
        return {"name": s.name, "pid": pid, "state": self.state, "restarts": self.restarts,
                "last_exit": self.last_exit, "backoff": self.delay, "restart": s.restart,
                "argv": list(s.argv), "origin": self.origin,
                "since": round(time.time() - self.since, 3)}


class Supervisor:
    """The kernel's services by name, each kept running by a task of its own."""

    def __init__(self, procs: ProcessTable, specs: list[ServiceSpec] | None = None) -> None:
        self.procs = procs
        self.services: dict[str, Service] = {}
        self.nursery: trio.Nursery | None = None
        self._boot = list(specs or [])
        names = [s.name for s in self._boot]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SyscallError("EINVAL", f"services defined twice: {dup}")

    def start(self, nursery: trio.Nursery) -> None:
        """Boot: the socket accepts calls; start the config file's services."""
        self.nursery = nursery
        for spec in self._boot:
            svc = Service(spec, "config")
            self.services[spec.name] = svc
            self._launch(svc)

    def shutdown(self) -> None:
        """The kernel is going down: nothing is restarted from here on."""
        self.nursery = None
        for svc in self.services.values():
            svc.wanted = False
            svc.wake.set()

    def rows(self) -> list[dict[str, Any]]:
        return [self.services[n].row() for n in sorted(self.services)]

    def get(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            raise SyscallError("ENOENT", f"no service named {name!r}; see svc.list") from None

    # --- requests (svc.*) -----------------------------------------------------------------
    async def add(self, spec: ServiceSpec) -> dict[str, Any]:
        """Start a new service; its row once its first process runs. A first
        start that fails (no such executable, say) adds nothing."""
        if self.nursery is None:
            raise SyscallError("ESHUTDOWN", "the kernel is not accepting new services")
        if spec.name in self.services:
            raise SyscallError("EEXIST", f"a service named {spec.name!r} exists")
        if len(self.services) >= MAX_SERVICES:
            raise SyscallError("ENOSPC", f"there are {MAX_SERVICES} services already")
        svc = Service(spec, "runtime")
        self.services[spec.name] = svc
        self._launch(svc)
        await self._until(svc, lambda: svc.starts >= 1)
        if svc.pcb is None and svc.last_exit and "error" in svc.last_exit:
            svc.wanted = False
            svc.wake.set()
            await self._until(svc, lambda: not svc.running)
            self.services.pop(spec.name, None)
            raise SyscallError(svc.last_exit["error"], svc.last_exit["message"])
        return svc.row()

    async def stop(self, name: str, grace: float) -> dict[str, Any]:
        svc = self.get(name)
        svc.wanted, svc.grace = False, grace
        svc.wake.set()
        await self._until(svc, lambda: not svc.running)
        return svc.row()

    async def restart(self, name: str, grace: float) -> dict[str, Any]:
        svc = self.get(name)
        if self.nursery is None:
            raise SyscallError("ESHUTDOWN", "the kernel is shutting down")
        begun = svc.begun  # wait for a start that begins after this request
        if svc.running:
            svc.restart_now, svc.grace, svc.wanted = True, grace, True
            svc.wake.set()
        else:
            svc.wanted, svc.delay, svc.short_runs = True, svc.spec.backoff, 0
            svc.restarts += 1
            self._launch(svc)
        await self._until(svc, lambda: svc.starts > begun or not svc.running)
        return svc.row()

    async def remove(self, name: str, grace: float) -> None:
        await self.stop(name, grace)
        self.services.pop(name, None)

    # --- the supervising task -------------------------------------------------------------
    def _launch(self, svc: Service) -> None:
        if self.nursery is None:
            raise SyscallError("ESHUTDOWN", "the kernel is not accepting new services")
        svc.running = True
        self.nursery.start_soon(self._supervise, svc)

    def _set(self, svc: Service, state: str) -> None:
        svc.state, svc.since = state, time.time()
        ev, svc.changed = svc.changed, trio.Event()
        ev.set()

    @staticmethod
    async def _until(svc: Service, done: Any) -> None:
        while not done():
            await svc.changed.wait()

    async def _supervise(self, svc: Service) -> None:
        spec = svc.spec
        try:
            while svc.wanted:
                svc.restart_now = False
                pcb = await self._start(svc)
                up = 0.0
                if pcb is not None:
                    t0 = trio.current_time()
                    await self._watch(svc, pcb)
                    up = trio.current_time() - t0
                    svc.last_exit = pcb.status()
                    svc.pcb = None
                if not svc.wanted:
                    break
                if not svc.restart_now:
                    if spec.restart == "on-failure" and pcb is not None and pcb.exit_code == 0:
                        svc.wanted = False
                        self._set(svc, "exited")
                        return
                    svc.short_runs = 0 if up >= spec.stable else svc.short_runs
                    svc.short_runs += 1
                    svc.delay = min(spec.backoff * 2 ** min(svc.short_runs - 1, 64),
                                    spec.backoff_max)
                    log.info("service %s ended (%s); restarting in %.2fs", spec.name,
                             svc.last_exit, svc.delay)
                    self._set(svc, "backoff")
                    svc.wake = trio.Event()
                    if svc.wanted and not svc.restart_now:
                        with trio.move_on_after(svc.delay):
                            await svc.wake.wait()
                if svc.restart_now:  # svc.restart: at once, and the delays start over
                    svc.short_runs, svc.delay = 0, spec.backoff
                if svc.wanted:
                    svc.restarts += 1
            self._set(svc, "stopped")
        finally:
            svc.running = False
            svc.pcb = None
            self._set(svc, svc.state)

    async def _start(self, svc: Service) -> PCB | None:
        spec, procs = svc.spec, self.procs
        svc.begun += 1
        try:
            pcb = await procs.spawn(procs.init, list(spec.argv), None, spec.env, spec.cwd,
                                    None if spec.caps is None else list(spec.caps), None, 0)
        except SyscallError as e:
            log.warning("service %s cannot start: %s", spec.name, e)
            svc.last_exit = {"error": e.name, "message": e.message}
            if e.name == "ESHUTDOWN":
                svc.wanted = False
            svc.starts += 1
            self._set(svc, "backoff")
            return None
        pcb.name = f"svc:{spec.name}"
        pcb.orphan = True  # the supervisor reads its status; nobody waits for it
        svc.pcb = pcb
        svc.starts += 1
        self._set(svc, "running")
        return pcb

    async def _watch(self, svc: Service, pcb: PCB) -> None:
        """Until the process exits, or a request (stop, restart) ends it."""
        svc.wake = trio.Event()
        if svc.wanted and not svc.restart_now:
            async with trio.open_nursery() as n:
                n.start_soon(_wait_then_cancel, pcb.exit_event, n.cancel_scope)
                n.start_soon(_wait_then_cancel, svc.wake, n.cancel_scope)
        if not pcb.exited:
            await self._end(pcb, svc.grace)

    async def _end(self, pcb: PCB, grace: float) -> None:
        """TERM (after CONT, in case it is stopped), KILL after ``grace`` seconds."""
        for sig in (signal.SIGCONT, signal.SIGTERM):
            self._signal(pcb, sig)
        with trio.move_on_after(grace):
            await pcb.exit_event.wait()
        if not pcb.exited:
            self._signal(pcb, signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT):
                await pcb.exit_event.wait()

    def _signal(self, pcb: PCB, sig: int) -> None:
        if pcb.exited:
            return
        try:
            self.procs.kill(self.procs.init, pcb.pid, sig)
        except SyscallError as e:  # gone meanwhile
            log.info("service process %d: %s", pcb.pid, e)


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
