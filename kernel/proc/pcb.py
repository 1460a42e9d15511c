"""The process control block, and the names of signals."""

from __future__ import annotations

import signal as _signal
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.wire import SIGNALS_NOTIFIED

from ..fdtable import FdTable

UNNAMED = "pid:"  # the prefix of every unnamed identity

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
    model: str | None = None  # its default model (a loaded name); None: the kernel's
    sandbox: Any = None  # its file system view, opened at first use (kernel/sysfs.py)
    attached: bool = False  # lives in another process's OS process (proc.attach)
    conns: int = 0  # open connections that said hello as this pid
    fds: FdTable = field(default_factory=FdTable)  # its files and pipe ends
    interrupts: set = field(default_factory=set)  # cancel scopes of calls SIGINT ends
    node: str | None = None  # the cluster node's address it runs on (placement="ray"); None: here
    remote: Any = None  # its kernel.cluster.RemoteProcess: signals and exit go through it
    group: Any = None  # its kernel.cgroups.Group: every OS process that dies with it
    exec_group: Any = None  # the Group of its exec runs (caps over all of them)
    identity: str = field(init=False)  # who it acts as: kernel.names.identity

    def __post_init__(self) -> None:
        # pid and agent never change: the identity every message it sends carries
        self.identity = f"agent:{self.agent}" if self.agent else f"{UNNAMED}{self.pid}"

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
            "node": self.node, "node_id": self.remote.node_id if self.remote else None,
            "model": self.model,
            "uptime": round(time.time() - self.start_time, 3),
            "tokens_in": self.usage.tokens_in, "tokens_out": self.usage.tokens_out,
            "cached_tokens": self.usage.cached_tokens,
            "device_time": round(self.usage.device_time, 4),
            "syscalls": self.usage.syscalls,
        }


# Signals with a meaning to a program that talks to the kernel: a process with a
# connection hears them as a proc.signal notification [sig, payload, sender pid]
# (SIGINT: "stop what you are doing"); one without gets the OS signal.
NOTIFIED = SIGNALS_NOTIFIED
MAX_SIGNAL_PAYLOAD = 64 * 1024  # bytes of the payload, encoded


def check_payload(sig: int, payload: Any) -> None:
    if sig not in NOTIFIED:
        raise SyscallError("EINVAL", f"only SIGINT, SIGUSR1 and SIGUSR2 carry a payload, "
                                     f"not signal {sig}")
    size = len(msgpack.packb(payload, use_bin_type=True))
    if size > MAX_SIGNAL_PAYLOAD:
        raise SyscallError("E2BIG", f"a signal's payload is {size} bytes encoded, over the "
                                    f"bound of {MAX_SIGNAL_PAYLOAD}")


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
