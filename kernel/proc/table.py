"""The process table: every process of this boot by pid, spawn and attach,
signals, exit, zombies and waiting."""

from __future__ import annotations

import os
import secrets
import signal as _signal
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from llmagentos.syscalls import paths
from llmagentos.syscalls.errno import SyscallError

from .. import perms
from ..isolation import Isolation, resolve_executable
from ..pipes import PipeEnd, os_pipe, pump_in, pump_out
from ..procfs import os_state, parent_pid
from .osproc import launch, signal_tree
from .pcb import (
    INIT_PID,
    NOTIFIED,
    PCB,
    SHELL_ZOMBIE_AFTER_WAIT,
    SHELL_ZOMBIE_LINGER,
)
from .remote import parse_placement, spawn_remote

STATUS_SWEEP_S = 0.25  # how soon a STOP/CONT from outside the kernel shows
_KERNEL_TREE = object()  # _os_owner: started by the kernel, but by no live process


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
        self.tls_address = ""  # tls://HOST:PORT, for other machines (--listen)
        self.tls_ca = ""  # the CA file its clients trust ("": the user brought the certificate)
        self.remote_address = ""  # what processes on other cluster nodes dial (tls:// if any)
        self.cluster: Any = None  # kernel.cluster.Cluster: where placement="ray"/"node:ID" run
        self.containment: Any = None  # kernel.cgroups.Containment; set by the kernel
        self.on_exit: list = []  # callbacks(pcb) run when a process exits (free resources)
        self.log_paths: dict[int, str] = {}  # every pid of this boot -> its log file
        self._watched: dict[int, PCB] = {}  # live children with an OS process of theirs here
        self._sweeping = False
        self.log_readers: dict[int, frozenset[int]] = {}  # exited pid -> who may read its log
        self.on_renice: list = []  # callbacks(pcb) after a nice value changed
        self.on_signal: list = []  # callbacks(pcb, sig) after the kernel sent a signal
        # notify(pcb, method, args) -> connections reached: how a signal with a
        # meaning (NOTIFIED) reaches a process that talks to the kernel; set by it
        self.notify: Any = None
        self.names: Any = None  # kernel.names.NameTable: who may take up an agent name
        self.init = self._new_pcb(ppid=0, name="init", argv=[], caps=["*"])
        self.init.os_pid = os.getpid()

    # --- lookup -------------------------------------------------------------
    def _new_pcb(self, **kw: Any) -> PCB:
        pid = self._next_pid
        self._next_pid += 1
        token = secrets.token_urlsafe(24)
        while token.startswith("-"):  # `--key TOKEN` must not read as an option
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
            pid = parent_pid(pid)
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
                    nice: int, placement: str = "local", model: str | None = None,
                    stdin: PipeEnd | None = None, stdout: PipeEnd | None = None) -> PCB:
        """stdin/stdout: pipe ends that become the child's, taken over on success
        (its fd 0/1, and its OS stdin/stdout through pumps); the caller closes
        them when this raises."""
        if not argv or not all(isinstance(a, str) for a in argv):
            raise SyscallError("EINVAL", "argv must be a non-empty list of strings")
        if any("\0" in a for a in argv):
            raise SyscallError("EINVAL", "argv must not contain NUL bytes")
        env = env or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise SyscallError("EINVAL", "env must map strings to strings")
        remote = placement != "local"
        node = parse_placement(placement)  # None: any node; else a node id (prefix)
        if remote and self.cluster is None:
            raise SyscallError("EINVAL", f"placement={placement!r} needs a kernel booted with "
                                         "--ray")
        if remote and not self.remote_address:
            raise SyscallError("EINVAL", f"placement={placement!r} needs a listener other nodes "
                                         "reach: --listen HOST:PORT (TLS), or --tcp "
                                         "127.0.0.1:PORT for this machine's nodes only")
        if remote and (stdin or stdout):
            raise SyscallError("EINVAL", "stdin/stdout pipes connect local processes only, "
                                         f"not placement={placement!r}")
        if node is not None:  # a dead or unknown node fails here, not in a 60 s Ray timeout
            node = await self.cluster.resolve_node(node)
        caps, lim = self._child_rights(parent, caps, limits, nice)
        if remote:
            cwd = None  # the node's own file system; the remote host picks its directory
        if cwd is not None and not os.path.isdir(cwd):
            raise SyscallError("ENOENT", f"cwd {cwd!r} is not a directory")
        if self.nursery is None:
            raise SyscallError("ESHUTDOWN", "the kernel is not accepting new processes")
        self.names.claim(parent, name)

        pcb = self._new_pcb(ppid=parent.pid, name=name or os.path.basename(argv[0]),
                            argv=list(argv), caps=caps, nice=nice, limits=lim,
                            cwd=cwd or os.getcwd(), agent=name, model=model)
        pcb.log_path = str(self.log_dir / f"{pcb.pid}.log")
        self.log_paths[pcb.pid] = pcb.log_path
        if remote:
            return await spawn_remote(self, pcb, argv, env, node)
        child_env = {**self.base_env, **env,
                     paths.ENV_SOCKET: self.socket_address,
                     paths.ENV_PID: str(pcb.pid)}
        for k in (paths.ENV_TOKEN, paths.ENV_TOKEN_FD):  # the token comes on a memfd
            child_env.pop(k, None)
        for k in (paths.ENV_ADDRESS, paths.ENV_CA):  # its kernel is this one, at ENV_SOCKET
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
        child_in, ours_in = os_pipe() if stdin else (None, None)
        ours_out, child_out = os_pipe() if stdout else (None, None)
        try:
            # the launcher joins the group before anything can fork
            proc = await launch(self.isolation, exe, list(argv), child_env, pcb,
                                list(pcb.group.procs_files) if pcb.group else [],
                                stdin=child_in, stdout=child_out)
        except BaseException as e:
            _close(ours_in, ours_out)
            if isinstance(e, SyscallError):
                self._unspawn(pcb)
            raise
        finally:
            _close(child_in, child_out)  # the child has them now
        if stdin is not None:
            stdin.feeds_stdin = True
            pcb.fds.install(stdin, fd=0)
            self.nursery.start_soon(pump_in, stdin, ours_in, pcb.exit_event)
        if stdout is not None:
            pcb.fds.install(stdout, fd=1)
            self.nursery.start_soon(pump_out, ours_out, stdout.dup())
        pcb.os_proc = proc
        pcb.os_pid = proc.pid
        if pcb.group is not None:  # until the launcher joins it itself before exec
            pcb.group.add(proc.pid)
        self.nursery.start_soon(self._watch, pcb)
        return pcb

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
               nice: int, os_pid: int | None, model: str | None = None) -> PCB:
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
                            nice=nice, limits=lim, cwd=parent.cwd, agent=name, attached=True,
                            model=model)
        pcb.os_pid = os_pid
        if os_pid is not None and os_pid == parent.os_pid:
            pcb.node = parent.node  # it lives in its parent's OS process, on that node
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
        """One watcher per child waits for its exit (and its wall time limit);
        the status sweep keeps its stopped state true meanwhile."""
        proc = pcb.os_proc
        self._watched[pcb.pid] = pcb
        if not self._sweeping:
            self._sweeping = True
            self.nursery.start_soon(self._sweep_status)
        deadline = trio.current_time() + pcb.start_time + pcb.limits["wall_time"] - time.time() \
            if "wall_time" in pcb.limits else float("inf")
        try:
            with trio.move_on_at(deadline):
                await proc.wait()
            if proc.returncode is None:
                pcb.exit_reason = f"wall time limit of {pcb.limits['wall_time']}s"
                self._signal_os(pcb, _signal.SIGKILL)
                await proc.wait()
        finally:
            self._watched.pop(pcb.pid, None)
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

    async def _sweep_status(self) -> None:
        """A STOP or CONT sent from outside the kernel shows in ps within
        STATUS_SWEEP_S: one read of /proc per live child, for all of them (a
        wakeup per child cost the device loop's cores ~1% at 16 agents)."""
        try:
            while self._watched:
                await trio.sleep(STATUS_SWEEP_S)
                now = time.monotonic()
                for pcb in list(self._watched.values()):
                    if now - pcb.signalled_at > 1.0 and not pcb.exited:  # the kernel's own
                        state = os_state(pcb.os_pid)  # signals set the state themselves
                        if state is not None:
                            pcb.stopped = state == "T"
        finally:
            self._sweeping = False

    def _exited(self, pcb: PCB) -> None:
        pcb.exited = True
        pcb.stopped = False
        self.by_token.pop(pcb.token, None)  # a dead process's token is dead too
        self._release_groups(pcb)
        self._note_log_readers(pcb)
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

    def _note_log_readers(self, pcb: PCB) -> None:
        """At exit: who may still read the log once the process is reaped (its
        ancestors now; pids are never reused within a boot)."""
        readers, p = set(), pcb.ppid
        while p in self.procs and p not in readers:
            readers.add(p)
            p = self.procs[p].ppid
        self.log_readers[pcb.pid] = frozenset(readers)

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

    def kill(self, caller: PCB, pid: int, sig: int, payload: Any = None) -> None:
        target = self.get(pid)
        perms.check_signal(self, caller, target)
        if sig == 0 or target.exited:
            return
        if sig in NOTIFIED and self.notify is not None \
                and self.notify(target, "proc.signal", [sig, payload, caller.pid]):
            if sig == _signal.SIGINT:  # stop what you are doing: its generations end
                for scope in list(target.interrupts):
                    scope.cancel()
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
                  and p.os_pid == target.os_pid and p.node == target.node]  # pids are per node
        for p in [target, *hosted]:
            if sig == _signal.SIGSTOP:
                p.stopped = True
            elif sig == _signal.SIGCONT:
                p.stopped = False
            for fn in self.on_signal:
                fn(p, sig)

    def renice(self, caller: PCB, pid: int, value: int) -> int:
        target = self.get(pid)
        if not -20 <= value <= 19:
            raise SyscallError("EINVAL", "nice must be in -20..19")
        perms.check_renice(self, caller, target, value)
        target.nice = value
        for fn in self.on_renice:
            fn(target)
        return value

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
            "fds": pcb.fds.describe(),
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


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
