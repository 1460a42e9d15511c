"""The process table: control blocks, real OS processes, signals, zombies.

Invariants:
- pid 1 is init: the kernel itself and the shell user. It never exits,
  holds every capability, and adopts orphans.
- A PCB is ZOMBIE from the moment its OS process is gone until its parent
  waits for it; an orphan (adopted by init) is reaped at once.
- A pid is never reused within one boot.
"""

from __future__ import annotations

import os
import secrets
import signal as _signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trio

from llmagentos.syscalls import paths
from llmagentos.syscalls.errno import SyscallError

from . import perms
from .isolation import Isolation, resolve_executable

INIT_PID = 1
SHELL_ZOMBIE_AFTER_WAIT = 30.0  # seconds a shell child's zombie stays once waited for
SHELL_ZOMBIE_LINGER = 600.0  # ... and when nobody waits for it



@dataclass
class Usage:
    syscalls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens: int = 0
    device_time: float = 0.0
    queue_wait: float = 0.0
    tool_calls: int = 0


@dataclass
class PCB:
    """Process control block."""

    pid: int
    ppid: int
    name: str
    argv: list[str]
    caps: list[str]
    token: str
    nice: int = 0
    limits: dict[str, float] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    cwd: str = ""
    log_path: str = ""
    start_time: float = field(default_factory=time.time)
    os_pid: int | None = None
    os_proc: Any = None  # trio.Process
    stopped: bool = False
    signalled_at: float = 0.0  # when the kernel last sent STOP/CONT (monotonic)
    exited: bool = False
    exit_code: int | None = None  # >= 0: exit status
    term_signal: int | None = None  # set when killed by a signal
    exit_reason: str = ""  # e.g. "wall time limit"
    orphan: bool = False  # adopted by init: reaped at exit, nobody waits
    waited: bool = False  # a shell child whose status was read (init reaps it soon)
    running_calls: int = 0  # syscalls being served right now
    waiting_calls: int = 0  # syscalls blocked (wait, device queue)
    exit_event: trio.Event = field(default_factory=trio.Event)
    ctx_id: int | None = None
    agent: str | None = None  # named agent: its context and memory outlive the process
    sandbox: Any = None  # its file system view, opened at first use (kernel/sysfs.py)
    attached: bool = False  # lives in another process's OS process (proc.attach)
    conns: int = 0  # open connections that said hello as this pid
    fds: dict[int, Any] = field(default_factory=dict)
    node: str | None = None  # the cluster node it runs on (placement="ray"); None: here
    remote: Any = None  # its kernel.cluster.RemoteProcess: signals and exit go through it
    group: Any = None  # its kernel.cgroups.Group: every OS process that dies with it
    exec_group: Any = None  # the Group of its exec runs (caps over all of them)

    @property
    def state(self) -> str:
        if self.exited:
            return "ZOMBIE"
        if self.stopped:
            return "STOPPED"
        if self.pid != INIT_PID and self.os_pid is None:
            return "NEW"
        if self.waiting_calls:
            return "WAITING"
        if self.running_calls or self.pid == INIT_PID:
            return "RUNNING"
        return "READY"

    def status(self) -> dict:
        return {
            "pid": self.pid,
            "exit_code": self.exit_code,
            "signal": self.term_signal,
            "signal_name": _signal.Signals(self.term_signal).name if self.term_signal else None,
            "reason": self.exit_reason,
        }

    def row(self) -> dict:
        return {
            "pid": self.pid, "ppid": self.ppid, "name": self.name, "state": self.state,
            "nice": self.nice, "os_pid": self.os_pid, "attached": self.attached,
            "node": self.node,
            "uptime": round(time.time() - self.start_time, 3),
            "tokens_in": self.usage.tokens_in, "tokens_out": self.usage.tokens_out,
            "cached_tokens": self.usage.cached_tokens,
            "device_time": round(self.usage.device_time, 4),
            "syscalls": self.usage.syscalls,
        }


_KERNEL_TREE = object()  # _os_owner: started by the kernel, but by no live process


def _ppid(os_pid: int) -> int:
    try:
        with open(f"/proc/{os_pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])  # comm may hold spaces and ')'
    except (OSError, ValueError, IndexError):
        return 0


def parse_signal(sig: int | str) -> int:
    """Accept 9, "9", "KILL", "SIGKILL"; reject anything else with EINVAL."""
    if isinstance(sig, str):
        s = sig.strip().upper()
        if s.isdigit():
            sig = int(s)
        else:
            if not s.startswith("SIG"):
                s = "SIG" + s
            try:
                return int(_signal.Signals[s])
            except KeyError:
                raise SyscallError("EINVAL", f"unknown signal {sig!r}") from None
    if sig == 0:
        return 0
    try:
        return int(_signal.Signals(sig))
    except ValueError:
        raise SyscallError("EINVAL", f"unknown signal number {sig}") from None


def _os_tree(os_pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(os_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def signal_tree(os_pid: int, sig: int) -> None:
    """Send sig to the OS process group (every child was started in its own
    session) and to descendants that left the group."""
    tree = _os_tree(os_pid)
    try:
        os.killpg(os_pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in tree[1:]:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


class ProcessTable:
    """Every process of this boot, by pid; owns their OS processes."""

    def __init__(self, log_dir: Path, base_env: dict[str, str] | None = None,
                 isolation: Isolation | None = None):
        self.log_dir = log_dir
        self.isolation = isolation or Isolation("none")
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.procs: dict[int, PCB] = {}
        self.by_token: dict[str, int] = {}
        self._next_pid = INIT_PID
        self.nursery: trio.Nursery | None = None  # where watchers live; set by the kernel
        self.socket_address = ""
        self.tcp_address = ""  # tcp://HOST:PORT where the kernel listens, if it does
        self.cluster: Any = None  # kernel.cluster.Cluster: where placement="ray" runs
        self.containment: Any = None  # kernel.cgroups.Containment; set by the kernel
        self.on_exit: list = []  # callbacks(pcb) run when a process exits (free resources)
        self.log_paths: dict[int, str] = {}  # every pid of this boot -> its log file
        self.on_signal: list = []  # callbacks(pcb, sig) after the kernel sent a signal
        self.names: Any = None  # kernel.names.NameTable: who may take up an agent name
        self.init = self._new_pcb(ppid=0, name="init", argv=[], caps=["*"])
        self.init.os_pid = os.getpid()

    # --- lookup -------------------------------------------------------------
    def _new_pcb(self, **kw: Any) -> PCB:
        pid = self._next_pid
        self._next_pid += 1
        token = secrets.token_urlsafe(24)
        pcb = PCB(pid=pid, token=token, **kw)
        self.procs[pid] = pcb
        self.by_token[token] = pid
        return pcb

    def get(self, pid: int) -> PCB:
        try:
            return self.procs[pid]
        except KeyError:
            raise SyscallError("ESRCH", f"no process with pid {pid}") from None

    def authenticate(self, token: str) -> PCB:
        pid = self.by_token.get(token)
        if pid is None or self.procs[pid].exited:
            raise SyscallError("EACCES", "bad or expired token")
        return self.procs[pid]

    def may_present(self, pcb: PCB, peer_pid: int | None) -> bool:
        """Whether the OS process `peer_pid` may say hello as `pcb`: a token is
        bound to the OS processes of its own process. A peer this kernel did not
        start (the shell user's programs) may present any token; a peer inside a
        spawned process's tree only that process's token (or of an Agent it
        attached); a descendant of the kernel outside every process's tree (an
        orphan that escaped its parent) none. Without peer credentials (TCP) the
        token alone decides."""
        if peer_pid is None or peer_pid == os.getpid():
            return True
        owner = self._os_owner(peer_pid)
        if owner is None:
            return True
        if owner is _KERNEL_TREE:
            return False
        return pcb is owner or (pcb.attached and self.is_descendant(pcb.pid, owner.pid))

    def _os_owner(self, os_pid: int) -> "PCB | object | None":
        """The live spawned process whose OS tree holds os_pid; _KERNEL_TREE when
        only the kernel is an ancestor; None when the kernel is not either."""
        by_os = {p.os_pid: p for p in self.procs.values()
                 if p.os_pid is not None and not p.exited and not p.attached
                 and p.remote is None and p.pid != INIT_PID}
        kernel_pid = os.getpid()
        pid = os_pid
        for _ in range(256):  # a chain of parents; never loop on a corrupt read
            if pid in by_os:
                return by_os[pid]
            if pid == kernel_pid:
                return _KERNEL_TREE
            pid = _ppid(pid)
            if pid <= 1:
                return None
        return None

    def children(self, pid: int) -> list[PCB]:
        return [p for p in self.procs.values() if p.ppid == pid]

    def is_descendant(self, pid: int, ancestor: int) -> bool:
        seen = 0
        while pid in self.procs and seen < len(self.procs):
            if pid == ancestor:
                return True
            pid = self.procs[pid].ppid
            seen += 1
        return False

    def live(self) -> list[PCB]:
        return [p for p in self.procs.values() if not p.exited and p.pid != INIT_PID]

    def live_os(self) -> list[PCB]:
        """Live processes with an OS process of their own (what shutdown signals)."""
        return [p for p in self.live() if not p.attached]

    # --- spawn --------------------------------------------------------------
    def _child_rights(self, parent: PCB, caps: list | None, limits: dict | None,
                      nice: int) -> tuple[list[str], dict]:
        live = sum(1 for c in self.children(parent.pid) if not c.exited)
        return perms.child_rights(parent, caps, limits, nice, live)

    async def spawn(self, parent: PCB, argv: list, name: str | None, env: dict | None,
                    cwd: str | None, caps: list | None, limits: dict | None,
                    nice: int, placement: str = "local") -> PCB:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise SyscallError("EINVAL", "argv must be a non-empty list of strings")
        if any("\0" in a for a in argv):
            raise SyscallError("EINVAL", "argv must not contain NUL bytes")
        env = env or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise SyscallError("EINVAL", "env must map strings to strings")
        if placement not in ("local", "ray"):
            raise SyscallError("EINVAL", f"placement must be 'local' or 'ray', not {placement!r}")
        if placement == "ray" and self.cluster is None:
            raise SyscallError("EINVAL", "placement='ray' needs a kernel booted with --ray")
        if placement == "ray" and not self.tcp_address:
            raise SyscallError("EINVAL", "placement='ray' needs the kernel's TCP listener "
                                         "(boot with --tcp 127.0.0.1:PORT): remote processes "
                                         "reach the kernel over it")
        caps, lim = self._child_rights(parent, caps, limits, nice)
        if placement == "ray":
            cwd = None  # the node's own file system; the remote host picks its directory
        if cwd is not None and not os.path.isdir(cwd):
            raise SyscallError("ENOENT", f"cwd {cwd!r} is not a directory")
        if self.nursery is None:
            raise SyscallError("ESHUTDOWN", "the kernel is not accepting new processes")
        self.names.claim(parent, name)

        pcb = self._new_pcb(ppid=parent.pid, name=name or os.path.basename(argv[0]),
                            argv=list(argv), caps=caps, nice=nice, limits=lim,
                            cwd=cwd or os.getcwd(), agent=name)
        pcb.log_path = str(self.log_dir / f"{pcb.pid}.log")
        self.log_paths[pcb.pid] = pcb.log_path
        if placement == "ray":
            return await self._spawn_remote(pcb, argv, env)
        child_env = {**self.base_env, **env,
                     paths.ENV_SOCKET: self.socket_address,
                     paths.ENV_PID: str(pcb.pid)}
        for k in (paths.ENV_TOKEN, paths.ENV_TOKEN_FD):  # the token comes on a memfd
            child_env.pop(k, None)
        pcb.group = self._new_group(pcb)
        try:
            exe = resolve_executable(argv[0], pcb.cwd, child_env.get("PATH", os.defpath))
        except FileNotFoundError:
            self._unspawn(pcb)
            raise SyscallError("ENOENT", f"no such executable: {argv[0]!r}") from None
        except PermissionError:
            self._unspawn(pcb)
            raise SyscallError("EACCES", f"cannot execute {argv[0]!r}") from None
        ready_r, ready_w = os.pipe()
        # The launcher joins the group before anything can fork.
        cfg = self.isolation.config(exe, list(argv), child_env, pcb.token,
                                    list(pcb.group.procs_files) if pcb.group else [])
        cfg["ready_fd"] = ready_w
        cfg_fd = self.isolation.config_fd(cfg)
        try:
            with open(pcb.log_path, "wb") as log:
                proc = await trio.lowlevel.open_process(
                    self.isolation.command(cfg_fd), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, cwd=pcb.cwd, start_new_session=True,
                    pass_fds=[cfg_fd, ready_w])
        except OSError as e:
            os.close(ready_r)
            self._unspawn(pcb)
            raise SyscallError("EIO", f"spawn failed: {e}") from None
        finally:
            os.close(cfg_fd)
            os.close(ready_w)
        failure = await _exec_outcome(ready_r)
        if failure is not None:  # the launcher could not confine or exec: nothing runs
            with trio.move_on_after(5):
                await proc.wait()
            self._unspawn(pcb)
            raise SyscallError("EIO", f"spawn failed: {failure}")
        pcb.os_proc = proc
        pcb.os_pid = proc.pid
        if pcb.group is not None:  # until the launcher joins it itself before exec
            pcb.group.add(proc.pid)
        self.nursery.start_soon(self._watch, pcb)
        return pcb

    async def _spawn_remote(self, pcb: PCB, argv: list, env: dict) -> PCB:
        """Start the program on a cluster node; it calls back over the TCP listener."""
        remote_env = {**env, "LLMAGENTOS_SOCKET": self.tcp_address,
                      "LLMAGENTOS_TOKEN": pcb.token, "LLMAGENTOS_PID": str(pcb.pid)}
        try:
            remote = await self.cluster.spawn(list(argv), remote_env, None)
        except SyscallError:
            self._forget(pcb)
            raise
        pcb.remote = remote
        pcb.node = remote.node
        pcb.os_pid = remote.pid  # a pid on that node, not here
        self.nursery.start_soon(self._watch_remote, pcb)
        return pcb

    async def _watch_remote(self, pcb: PCB) -> None:
        """The remote twin of _watch: exit status and output come back from the node."""
        with trio.CancelScope() as scope:
            if "wall_time" in pcb.limits:
                scope.deadline = trio.current_time() + pcb.limits["wall_time"]
            rc, output = await pcb.remote.wait()
        if scope.cancelled_caught:  # the wall-time deadline
            pcb.exit_reason = f"wall time limit of {pcb.limits['wall_time']}s"
            pcb.remote.signal(_signal.SIGKILL)
            pcb.remote.close()
            rc, output = -int(_signal.SIGKILL), b""
        try:
            with open(pcb.log_path, "ab") as f:
                f.write(output)
        except OSError:
            pass
        if rc < 0:
            pcb.term_signal = -rc
        else:
            pcb.exit_code = rc
        self._exited(pcb)

    def _unspawn(self, pcb: PCB) -> None:
        """A spawn that failed after its PCB and group were made: nothing of it stays."""
        if pcb.group is not None:
            pcb.group.kill()
            pcb.group.remove()
            pcb.group = None
        self._forget(pcb)

    def _new_group(self, pcb: PCB) -> Any:
        if self.containment is None:
            return None
        try:
            return self.containment.create(f"p{pcb.pid}", marker=f"LLMAGENTOS_PID={pcb.pid}")
        except OSError as e:
            self._forget(pcb)
            raise SyscallError("EAGAIN", f"no process group for pid {pcb.pid}: "
                                         f"{e.strerror}") from None

    def _signal_os(self, pcb: PCB, sig: int) -> None:
        """Signal the process's OS process tree, here or on its node."""
        if pcb.remote is not None:
            pcb.remote.signal(sig)
        elif pcb.group is not None:  # the whole group, double-forked and setsid ones too
            if sig == _signal.SIGKILL:
                pcb.group.kill()
            pcb.group.signal(sig, also=pcb.os_pid)
        elif pcb.os_pid is not None:
            signal_tree(pcb.os_pid, sig)

    def _release_groups(self, pcb: PCB) -> None:
        """The process is gone: so is everything it started, exec runs included."""
        for group in (pcb.group, pcb.exec_group):
            if group is not None:
                group.remove()

    def attach(self, parent: PCB, name: str | None, caps: list | None, limits: dict | None,
               nice: int, os_pid: int | None) -> PCB:
        """A child that lives inside an existing OS process (an `Agent` object in
        the caller's program): it has its own pid, token, caps, context and
        device slot, but no OS process of its own, so signals act only on its
        kernel side: STOP/CONT park and resume its requests, TERM/KILL end it.
        It exits when its last connection closes."""
        caps, lim = self._child_rights(parent, caps, limits, nice)
        if self.nursery is None:
            raise SyscallError("ESHUTDOWN", "the kernel is not accepting new processes")
        self.names.claim(parent, name)
        pcb = self._new_pcb(ppid=parent.pid, name=name or "agent", argv=[], caps=caps,
                            nice=nice, limits=lim, cwd=parent.cwd, agent=name, attached=True)
        pcb.os_pid = os_pid
        # The shell user never waits for its agents: init reaps them at exit.
        pcb.orphan = parent.pid == INIT_PID
        if "wall_time" in lim:
            self.nursery.start_soon(self._attached_deadline, pcb)
        return pcb

    async def _attached_deadline(self, pcb: PCB) -> None:
        await trio.sleep_until(trio.current_time() + pcb.limits["wall_time"])
        if not pcb.exited:
            pcb.exit_reason = f"wall time limit of {pcb.limits['wall_time']}s"
            self.end_attached(pcb, signal=_signal.SIGKILL)

    def end_attached(self, pcb: PCB, status: int = 0, signal: int | None = None) -> None:
        if pcb.exited:
            return
        if signal is None:
            pcb.exit_code = status
        else:
            pcb.term_signal = signal
        self._exited(pcb)

    def _forget(self, pcb: PCB) -> None:
        self._release_groups(pcb)
        self.procs.pop(pcb.pid, None)
        self.by_token.pop(pcb.token, None)

    async def _watch(self, pcb: PCB) -> None:
        """One watcher per child keeps its state true until it exits."""
        proc = pcb.os_proc
        deadline = pcb.start_time + pcb.limits["wall_time"] if "wall_time" in pcb.limits \
            else float("inf")
        while True:
            with trio.move_on_after(0.25):
                await proc.wait()
            if proc.returncode is not None:
                break
            if time.time() >= deadline:
                pcb.exit_reason = f"wall time limit of {pcb.limits['wall_time']}s"
                self._signal_os(pcb, _signal.SIGKILL)
                continue
            if time.monotonic() - pcb.signalled_at > 1.0:
                try:  # a STOP/CONT sent from outside the kernel shows here too
                    pcb.stopped = psutil.Process(pcb.os_pid).status() == psutil.STATUS_STOPPED
                except psutil.Error:
                    pass
        rc = proc.returncode
        if rc < 0:
            pcb.term_signal = -rc
        else:
            pcb.exit_code = rc
        # Descendants that outlive a killed process must not linger (with a
        # group, _exited kills them whatever the exit).
        if pcb.term_signal == _signal.SIGKILL and pcb.group is None:
            signal_tree(pcb.os_pid, _signal.SIGKILL)
        self._exited(pcb)

    def _exited(self, pcb: PCB) -> None:
        pcb.exited = True
        pcb.stopped = False
        self.by_token.pop(pcb.token, None)  # a dead process's token is dead too
        self._release_groups(pcb)
        for fn in self.on_exit:
            fn(pcb)
        for child in self.children(pcb.pid):
            child.ppid = INIT_PID
            child.orphan = True
            if child.exited:
                self.reap(child)
        pcb.exit_event.set()
        parent = self.procs.get(pcb.ppid)
        if pcb.orphan or parent is None:
            self.reap(pcb)
        elif pcb.ppid == INIT_PID:
            self._reap_later(pcb, SHELL_ZOMBIE_LINGER)

    def _reap_later(self, pcb: PCB, delay: float) -> None:
        """The shell user's children: each `llmos` command is a new connection,
        so `llmos wait` then `llmos stat` must both find the zombie; init reaps
        it a while after its status was read, or after it exited unread."""
        async def reap_after() -> None:
            await trio.sleep(delay)
            if self.procs.get(pcb.pid) is pcb:
                self.reap(pcb)
        if self.nursery is not None:
            self.nursery.start_soon(reap_after)

    def reap(self, pcb: PCB) -> dict:
        self.procs.pop(pcb.pid, None)
        return pcb.status()

    # --- signals and waiting ------------------------------------------------
    def may_signal(self, caller: PCB, target: PCB) -> bool:
        return perms.may_signal(self, caller, target)

    def kill(self, caller: PCB, pid: int, sig: int) -> None:
        target = self.get(pid)
        perms.check_signal(self, caller, target)
        if sig == 0 or target.exited:
            return
        if target.attached:  # no OS process of its own: the kernel side is all there is
            if sig in (_signal.SIGKILL, _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
                self.end_attached(target, signal=sig)
                return
            if sig not in (_signal.SIGSTOP, _signal.SIGCONT):
                raise SyscallError("EINVAL", f"an attached process takes STOP, CONT, TERM, "
                                             f"INT, HUP and KILL, not signal {sig}")
            target.stopped = sig == _signal.SIGSTOP
            for fn in self.on_signal:
                fn(target, sig)
            return
        if target.os_pid is None:
            raise SyscallError("ESRCH", f"pid {pid} has no OS process yet")
        self._signal_os(target, sig)
        target.signalled_at = time.monotonic()
        # Attached processes (Agents) living in that OS process are stopped and
        # continued with it: their device requests park and resume too.
        hosted = [p for p in self.procs.values() if p.attached and not p.exited
                  and p.os_pid == target.os_pid]
        for p in [target, *hosted]:
            if sig == _signal.SIGSTOP:
                p.stopped = True
            elif sig == _signal.SIGCONT:
                p.stopped = False
            for fn in self.on_signal:
                fn(p, sig)

    async def wait(self, caller: PCB, pid: int, timeout: float | None) -> dict:
        if pid == -1:
            kids = [k for k in self.children(caller.pid) if not k.waited]
            if not kids:
                raise SyscallError("ECHILD", f"pid {caller.pid} has no children")
        else:
            target = self.get(pid)
            if target.ppid != caller.pid:
                raise SyscallError("ECHILD", f"pid {pid} is not a child of pid {caller.pid}")
            if target.waited:
                raise SyscallError("ECHILD", f"pid {pid} was already waited for")
            kids = [target]
        caller.waiting_calls += 1
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                while True:
                    done = next((k for k in kids if k.exited), None)
                    if done is not None:
                        if caller.pid == INIT_PID:  # the shell: stat may follow wait
                            if not done.waited:
                                done.waited = True
                                self._reap_later(done, SHELL_ZOMBIE_AFTER_WAIT)
                            return done.status()
                        return self.reap(done)
                    async with trio.open_nursery() as n:
                        # first child to exit wakes us
                        for k in kids:
                            n.start_soon(_wait_then_cancel, k.exit_event, n.cancel_scope)
        except trio.TooSlowError:
            raise SyscallError("ETIMEDOUT", f"pid {pid} did not exit within {timeout}s") from None
        finally:
            caller.waiting_calls -= 1

    async def terminate_all(self, grace: float) -> None:
        """Shutdown: TERM every process, wait up to grace seconds, KILL the rest."""
        for p in self.live_os():
            self._signal_os(p, _signal.SIGCONT)
            self._signal_os(p, _signal.SIGTERM)
        with trio.move_on_after(grace):
            for p in self.live_os():
                await p.exit_event.wait()
        for p in self.live_os():
            self._signal_os(p, _signal.SIGKILL)
        with trio.move_on_after(2):
            for p in self.live_os():
                await p.exit_event.wait()
        for p in self.live():  # attached processes end with the kernel
            self.end_attached(p, signal=_signal.SIGTERM)

    def stat(self, pcb: PCB) -> dict:
        out = {
            **pcb.row(), "argv": pcb.argv, "caps": pcb.caps, "limits": pcb.limits,
            "start_time": pcb.start_time, "cwd": pcb.cwd, "log": pcb.log_path,
            "usage": vars(pcb.usage).copy(), "ctx_id": pcb.ctx_id, "agent": pcb.agent,
            "children": [c.pid for c in self.children(pcb.pid)],
            "exit": pcb.status() if pcb.exited else None,
            "cpu_user": None, "cpu_system": None, "rss": None, "threads": None,
        }
        if pcb.os_pid is not None and not pcb.exited and pcb.remote is None:
            try:
                p = psutil.Process(pcb.os_pid)
                with p.oneshot():
                    t = p.cpu_times()
                    out.update(cpu_user=t.user, cpu_system=t.system,
                               rss=p.memory_info().rss, threads=p.num_threads(),
                               os_status=p.status())
            except psutil.Error:
                pass
        return out


async def _exec_outcome(ready_fd: int, timeout: float = 30.0) -> str | None:
    """None once the launcher has exec'd the program (its end of the pipe
    closed on exec), else what it reported."""
    stream = trio.lowlevel.FdStream(ready_fd)
    data = b""
    try:
        with trio.move_on_after(timeout) as scope:
            while chunk := await stream.receive_some(4096):
                data += chunk
        if scope.cancelled_caught:
            return f"the launcher did not exec within {timeout}s"
    finally:
        await stream.aclose()
    return data.decode(errors="replace") or None


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
