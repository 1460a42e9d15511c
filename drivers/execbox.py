"""The exec driver: run Python or shell code in a subprocess, held by rlimits,
a wall-clock timeout and an output cap, inside a sandbox dir.

Isolation comes in three levels; ``probe_isolation()`` picks the strongest
that actually works on this machine (it tries it once and remembers):

``container`` (running as root, util-linux ``unshare`` works)
    ``unshare --mount --pid --fork --kill-child --net --ipc --uts`` starts
    ``execinit.py`` as PID 1 of fresh namespaces. It builds a new root: a
    read-only tmpfs with ``/usr /bin /sbin /lib* /etc`` bound read-only, a
    minimal ``/dev``, a private ``/proc``, the scratch dir read-write at
    ``/sandbox`` (``/tmp`` links to it), then ``pivot_root``s into it and
    runs the code as an unprivileged uid (default 65534; the kernel gives each
    process its own, ``exec_uid``), no groups, no capabilities,
    ``no_new_privs``, a seccomp filter refusing new user namespaces, with the
    rlimits set.
    Isolated: the host file system (only the system dirs are visible, read
    only; the rest of the host, the project and the other sandboxes are not
    there at all); root-only files under ``/etc`` (unreadable as uid 65534);
    the network (a new, empty network namespace: no interface is up);
    processes (a new pid namespace: host processes can't be seen or signalled,
    and when PID 1 exits the kernel kills everything left, even processes
    that called ``setsid``); SysV IPC and the hostname. RLIMIT_NPROC is
    enforced because the code does not run as root.
    Not isolated here: CPU time beyond RLIMIT_CPU per process, total memory
    and processes of all runs (RLIMIT_AS is per process: the ``group``, a
    cgroup with caps, bounds the total), the world-readable files of the
    system dirs, and kernel attack surface beyond user namespaces. Processes
    of the same uid in other runs share one RLIMIT_NPROC count: give each
    agent its own ``uid``.

``uid`` (running as root, but namespaces don't work)
    The code runs as the unprivileged uid, joined to its group, with the
    rlimits and the user-namespace filter set in ``preexec_fn``, in its own
    session and process group. Isolated: root-only files, RLIMIT_NPROC. Not
    isolated: the network, the view of host processes, world-writable dirs
    such as /tmp, world-readable files; without a ``group``, descendants that
    leave the process group (``setsid``) survive the kill.

``rlimits`` (not running as root)
    rlimits, session, timeout and output cap only; the code runs as the
    kernel's own user. RLIMIT_NPROC then counts every process of that user,
    the kernel's included.

In every level: a scrubbed environment (PATH, HOME, LANG, TMPDIR only), stdin
is /dev/null, no inherited fds, RLIMIT_CORE 0, the whole process group (and
the run's ``group``) killed at the wall-clock limit, the output cap, a
``cancel``, or when the scratch dir goes over its ``DiskQuota`` (checked
every ``DISK_SCAN_S`` while the code runs; RLIMIT_FSIZE is what is left).

The scratch dir's tree is chowned to the run's uid before each run (dirs and
single-link regular files only, never following symlinks) so the code can
write its own files; the kernel reads them as root through ``Sandbox``.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from llmagentos.drivers.execinit import (
    SANDBOX_DIR,
    Libc,
    apply_rlimits,
    install_filter,
    userns_filter,
)
from llmagentos.drivers.sandbox import tree_usage, walk_tree
from llmagentos.syscalls.errno import SyscallError

_EXECINIT = str(Path(__file__).with_name("execinit.py"))
_SYSTEM_PREFIXES = ("/usr/", "/bin/", "/sbin/", "/lib")
_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_CODE_BYTES = 100_000  # below Linux's 128 KiB limit on one argv string
NOBODY = 65534
EXEC_UID_BASE = 1_800_000_000  # per-process uids: see exec_uid
DISK_SCAN_S = 0.1  # how often a run's scratch dir is recounted against its disk quota
POLL_S = 0.1  # how often the reader looks whether the process has exited
DRAIN_S = 0.2  # how long output is still read after it has

LEVELS = ("container", "uid", "rlimits")


@dataclass(frozen=True)
class ExecLimits:
    """What one run may use. Sizes in bytes, times in seconds."""

    cpu_s: float = 10  # RLIMIT_CPU per process (SIGXCPU, then SIGKILL a second later)
    memory_bytes: int = 512 * 1024 * 1024  # RLIMIT_AS per process
    nofile: int = 64  # RLIMIT_NOFILE
    nproc: int = 64  # RLIMIT_NPROC, counted per uid
    fsize_bytes: int = 64 * 1024 * 1024  # RLIMIT_FSIZE: largest file it may write
    wall_s: float = 30.0  # wall clock for the whole run
    output_bytes: int = 1024 * 1024  # stdout + stderr kept, together

    def check(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise SyscallError("EINVAL", f"exec limit {name} must be a positive number")

    def rlimits(self) -> dict[str, list[int]]:
        cpu = math.ceil(self.cpu_s)
        return {
            "cpu": [cpu, cpu + 1],
            "as": [int(self.memory_bytes)] * 2,
            "nofile": [int(self.nofile)] * 2,
            "nproc": [int(self.nproc)] * 2,
            "fsize": [int(self.fsize_bytes)] * 2,
            "core": [0, 0],
        }


def exec_uid(pid: int) -> int:
    """The uid (and gid) a kernel process's exec runs use when it has none of
    its own: one per process, so RLIMIT_NPROC, which Linux counts per uid, is
    not one count shared by every agent. The ids are in no passwd file and far
    above ordinary and subordinate (user-namespace) ranges; a pid is not
    reused within one boot."""
    return EXEC_UID_BASE + pid


@dataclass(frozen=True)
class DiskQuota:
    """What the scratch dir may hold in all while code runs (the process's
    sandbox quota): bytes of regular files, and entries."""

    max_bytes: int
    max_files: int


class RunGroup(Protocol):
    """Where a run's processes live (kernel/cgroups.py ``Group``)."""

    def join_self(self) -> None: ...
    def add(self, pid: int) -> bool: ...
    def kill(self) -> None: ...
    def oom_kills(self) -> int: ...


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None  # None when killed by a signal
    signal: int | None  # the signal that ended it (SIGXCPU: CPU limit; SIGKILL: our kill)
    stdout: str  # decoded as UTF-8, undecodable bytes replaced
    stderr: str
    truncated: bool  # output went over limits.output_bytes; the run was killed
    timed_out: bool  # the wall-clock limit was hit; the run was killed
    wall_s: float
    isolation: str = "rlimits"  # the level it ran under (see LEVELS)
    # Why the run was stopped early, besides the flags above: "EDQUOT" (the
    # scratch dir went over its disk quota), "ENOMEM" (its group's memory cap
    # killed a process), "ECANCELED" (the caller cancelled it); else None.
    errno: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Isolation:
    level: str  # "container" | "uid" | "rlimits"
    python: str  # interpreter for lang="python"
    ro_binds: tuple[str, ...] = ()  # extra read-only binds the container needs
    reason: str = ""  # why a stronger level was not used


def _find_python() -> tuple[str, tuple[str, ...]]:
    """A Python for the code: the system's one when there is one (it lives in
    the dirs the container binds), else ours with its prefix bound."""
    for name in ("python3", "python"):
        found = shutil.which(name, path=_PATH)
        if found and os.path.realpath(found).startswith(_SYSTEM_PREFIXES):
            return found, ()
    return sys.executable, (os.path.realpath(sys.base_prefix),)


@functools.lru_cache(maxsize=1)
def probe_isolation() -> Isolation:
    """The strongest isolation that works here, found by trying it once."""
    python, binds = _find_python()
    if os.geteuid() != 0:
        return Isolation("rlimits", python, binds, "not running as root: can't drop to a uid")
    if shutil.which("unshare") is None:
        return Isolation("uid", python, binds, "util-linux unshare not found")
    scratch = tempfile.mkdtemp(prefix="llmagentos-probe-")
    try:
        trial = Isolation("container", python, binds)
        res = _run(["/bin/sh", "-c", "exit 7"], Path(scratch), ExecLimits(wall_s=10), trial,
                   NOBODY, NOBODY)
        if res.exit_code == 7:
            return trial
        why = (res.stderr or f"exit {res.exit_code}, signal {res.signal}").strip()
        return Isolation("uid", python, binds, f"container probe failed: {why[-300:]}")
    except (OSError, SyscallError) as e:
        return Isolation("uid", python, binds, f"container probe failed: {e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_code(lang: str, code: str, cwd: Path, limits: ExecLimits | None = None, *,
             uid: int = NOBODY, gid: int | None = None,
             isolation: Isolation | None = None, group: RunGroup | None = None,
             cancel: threading.Event | None = None,
             disk: DiskQuota | None = None) -> ExecResult:
    """Run ``code`` (lang ``"python"`` or ``"sh"``) with ``cwd`` as its scratch
    dir. Blocking; the kernel calls it through ``trio.to_thread``.

    ``uid``/``gid``: the unprivileged ids the code runs as when the kernel is
    root. ``isolation``: force a level (tests); default ``probe_isolation()``.
    ``group``: the run's process group; its first process joins it before
    exec, and it is killed when the run ends. ``cancel``: once set, the run is
    killed within ``POLL_S``. ``disk``: the quota of the whole scratch dir.
    """
    limits = limits or ExecLimits()
    limits.check()
    iso = isolation or probe_isolation()
    if not isinstance(code, str):
        raise SyscallError("EINVAL", "code must be a string")
    if "\0" in code:
        raise SyscallError("EINVAL", "code contains a NUL byte")
    if len(code.encode("utf-8", "surrogateescape")) > MAX_CODE_BYTES:
        raise SyscallError("E2BIG", f"code is longer than {MAX_CODE_BYTES} bytes")
    if lang == "python":
        argv = [iso.python, "-B", "-E", "-s", "-u", "-c", code]
    elif lang in ("sh", "shell"):
        argv = ["/bin/sh", "-c", "--", code]  # "--": code starting with "-" is still code
    else:
        raise SyscallError("EINVAL", f"unknown language {lang!r}: use 'python' or 'sh'")
    cwd = Path(cwd)
    if not cwd.is_dir():
        raise SyscallError("ENOENT", "the scratch dir does not exist")
    return _run(argv, cwd, limits, iso, uid, uid if gid is None else gid, group, cancel, disk)


class _DiskWatch:
    """Recounts the scratch dir while code runs; over the quota, the run stops."""

    def __init__(self, root: Path, quota: DiskQuota):
        self.root, self.quota = root, quota
        used, _ = tree_usage(root)
        self.room = max(0, quota.max_bytes - used)  # what one file may still take
        self.next_scan = time.monotonic() + DISK_SCAN_S

    def over(self, now: bool = False) -> bool:
        t = time.monotonic()
        if not now and t < self.next_scan:
            return False
        self.next_scan = t + DISK_SCAN_S
        try:
            used, files = tree_usage(self.root)
        except OSError:
            return False
        return used > self.quota.max_bytes or files > self.quota.max_files


def _enter(group: RunGroup | None, rlimits: dict, ids: tuple[int, int] | None, libc: Libc,
           prog: bytes | None) -> None:
    """In the child, before exec (a ``preexec_fn``): join the run's group while
    still privileged, set the rlimits, drop to the run's ids, then
    ``no_new_privs`` and the filter against user namespaces."""
    if group is not None:
        group.join_self()
    apply_rlimits(rlimits)
    if ids is not None:
        uid, gid = ids
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    libc.no_new_privs()
    install_filter(libc, prog)


def _run(argv: list[str], cwd: Path, limits: ExecLimits, iso: Isolation, uid: int,
         gid: int, group: RunGroup | None = None, cancel: threading.Event | None = None,
         disk: DiskQuota | None = None) -> ExecResult:
    if iso.level in ("container", "uid"):
        hand_over(cwd, uid, gid)
    rl = limits.rlimits()
    watch = _DiskWatch(cwd, disk) if disk is not None else None
    if watch is not None:  # no one file may take more than the quota has left
        rl["fsize"] = [min(rl["fsize"][0], watch.room)] * 2

    def stop() -> str | None:
        if cancel is not None and cancel.is_set():
            return "ECANCELED"
        if watch is not None and watch.over():
            return "EDQUOT"
        return None

    home = SANDBOX_DIR if iso.level == "container" else str(cwd)
    env = {"PATH": _PATH, "HOME": home, "LANG": "C.UTF-8", "TMPDIR": home}
    status_r = status_w = cfg_r = cfg_w = -1
    cfg = b""
    popen: dict = {"cwd": str(cwd), "stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                   "stderr": subprocess.PIPE, "start_new_session": True, "close_fds": True}
    if iso.level == "container":
        status_r, status_w = os.pipe()
        # The config (host paths included) travels through a pipe, not argv,
        # so the code can't read it from /proc/1/cmdline.
        cfg_r, cfg_w = os.pipe()
        cfg = json.dumps({
            "status_fd": status_w, "scratch": str(cwd), "cwd": SANDBOX_DIR,
            "ro_binds": list(iso.ro_binds), "uid": uid, "gid": gid, "argv": argv, "env": env,
            "rlimits": rl,
            # A backstop: init ends the namespace itself should we die first.
            "deadline_s": math.ceil(limits.wall_s) + 5,
        }).encode()
        cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--net", "--ipc",
               "--uts", "--", sys.executable, "-I", "-S", _EXECINIT, str(cfg_r)]
        # execinit (root) joins the group through unshare; its code drops to the
        # uid and loads the user-namespace filter itself.
        popen.update(pass_fds=(status_w, cfg_r), env={"PATH": _PATH, "LANG": "C.UTF-8"},
                     preexec_fn=group.join_self if group is not None else None)
    else:
        cmd = argv
        ids = (uid, gid) if iso.level == "uid" else None
        popen.update(env=env, preexec_fn=functools.partial(_enter, group, rl, ids, Libc(),
                                                           userns_filter()))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, **popen)
    except (OSError, subprocess.SubprocessError) as e:
        for fd in (status_r, cfg_w):
            if fd >= 0:
                os.close(fd)
        why = e.strerror if isinstance(e, OSError) else str(e)  # e.g. joining its group
        raise SyscallError("EIO", f"can't start {cmd[0]}: {why}") from None
    finally:
        for fd in (status_w, cfg_r):
            if fd >= 0:
                os.close(fd)
    if group is not None:
        group.add(proc.pid)  # the run's root, for groups that track by pid
    if cfg_w >= 0:
        _send_config(cfg_w, cfg)
    try:
        out, err, truncated, timed_out, why = _collect(proc, limits, start, stop)
    finally:
        _kill_group(proc)
        if group is not None:
            group.kill()  # setsid'd and double-forked descendants too
        proc.wait()
    wall = time.monotonic() - start
    code, sig = _status(proc.returncode, status_r)
    if status_r >= 0 and code is None and sig is None:
        # execinit was killed (by us) before it could report.
        sig = signal.SIGKILL
    if isinstance(code, str):  # execinit could not build the container or exec
        raise SyscallError("EIO", code)
    if why is None and watch is not None and watch.over(now=True):
        why = "EDQUOT"  # went over just before it ended
    if why is None and group is not None and group.oom_kills():
        why = "ENOMEM"
    return ExecResult(code, sig, out.decode("utf-8", "replace"),
                      err.decode("utf-8", "replace"), truncated, timed_out, wall, iso.level,
                      why)


def _collect(proc: subprocess.Popen, limits: ExecLimits, start: float,
             stop: Callable[[], str | None] = lambda: None,
             ) -> tuple[bytes, bytes, bool, bool, str | None]:
    """Read both pipes until EOF, the wall-clock limit, the output cap, or
    until ``stop()`` gives a reason (an errno name) to end the run.

    Once the process itself has exited, what is left holding the pipes (a
    background child) gets DRAIN_S more, not the whole wall clock.
    """
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    room = limits.output_bytes
    truncated = timed_out = False
    why = None
    deadline = start + limits.wall_s
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map() and not truncated:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            why = stop()
            if why is not None:
                break
            if proc.poll() is not None:
                deadline = min(deadline, now + DRAIN_S)
            for key, _ in sel.select(min(deadline - now, POLL_S)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                keep = chunk[:room]
                bufs[key.fileobj] += keep
                room -= len(keep)
                if len(keep) < len(chunk):  # bytes dropped: stop the run
                    truncated = True
                    break
    while not truncated and not timed_out and why is None and proc.poll() is None:
        now = time.monotonic()  # it closed its output but keeps running
        if now >= deadline:
            timed_out = True
            break
        why = stop()
        try:
            proc.wait(min(POLL_S, deadline - now))
        except subprocess.TimeoutExpired:
            pass
    for f in bufs:
        f.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), truncated, timed_out, why


def _send_config(fd: int, cfg: bytes) -> None:
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(cfg)
    except BrokenPipeError:
        pass  # execinit died first; its status (or its absence) tells why


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # the group is gone and its id reused: not ours
        pass


def _status(returncode: int, status_r: int) -> tuple[int | str | None, int | None]:
    """(exit code, signal) of the code itself, or (error text, None)."""
    if status_r < 0:
        if returncode < 0:
            return None, -returncode
        return returncode, None
    try:
        os.set_blocking(status_r, False)
        data = b""
        while True:
            try:
                chunk = os.read(status_r, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(status_r)
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "error" in msg:
            return f"sandbox: {msg['error']}", None
        if "signal" in msg:
            return None, int(msg["signal"])
        if "exit" in msg:
            return int(msg["exit"]), None
    return None, None


def hand_over(top: Path, uid: int, gid: int) -> None:
    """Chown the scratch tree to the run's uid so the code can write there.

    Walks by dir fds without following symlinks; chowns dirs and regular files
    with a single link only (a hard link may name a file outside the tree),
    each through an fd checked after opening, so nothing outside is touched.
    """
    try:
        top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SyscallError("ENOENT", f"scratch dir: {e.strerror}") from None

    def chown_dir(dfd: int) -> None:
        st = os.fstat(dfd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(dfd, uid, gid)

    def chown_file(dfd: int, entry: os.DirEntry, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (st.st_uid, st.st_gid) == (
                uid, gid):
            return
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                         | os.O_NOCTTY, dir_fd=dfd)
        except OSError as e:
            # Changed under us (by the code of an earlier run): skip it.
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                return
            raise
        try:
            fst = os.fstat(fd)
            if stat.S_ISREG(fst.st_mode) and fst.st_nlink == 1:
                os.fchown(fd, uid, gid)
        finally:
            os.close(fd)

    walk_tree(top_fd, chown_file, on_dir=chown_dir)
