"""PID 1 of an exec container: builds the container's file system, drops to an
unprivileged uid, applies the rlimits and runs the agent's code.

``execbox`` starts it as root under ``unshare --mount --pid --fork --net --ipc
--uts``, so it runs as the init of fresh namespaces, as
``python -I -S execinit.py CONFIG_FD``, reading its config as JSON from
that pipe. It imports only the standard
library (it runs with ``-S``, without site-packages) and must stay that way.

What it builds, in a private mount namespace (nothing here is visible to the
host, and everything goes when the namespace's last process exits):

- a fresh tmpfs as ``/``, read-only once built;
- ``/usr /bin /sbin /lib* /etc`` bound read-only from the host (merged-usr
  symlinks are copied as symlinks), plus any extra read-only binds asked for
  (an interpreter's prefix);
- ``/dev`` with only null, zero, full, random, urandom and the fd symlinks;
- a new ``/proc`` for the new pid namespace;
- the scratch dir bound read-write at ``/sandbox``; ``/tmp`` is a symlink to it.

Then it forks the code as an unprivileged uid (no groups, no capabilities,
``no_new_privs``, a seccomp filter that refuses new user namespaces) with the
rlimits set, reaps every process of the namespace,
and writes the code's exact wait status to the status fd as one JSON line.
When it exits, the kernel kills whatever is left in the pid namespace.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import signal
import struct
import sys

SANDBOX_DIR = "/sandbox"  # where the scratch dir appears inside the container

RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "fsize": resource.RLIMIT_FSIZE,
    "core": resource.RLIMIT_CORE,
}

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2
_PR_SET_NO_NEW_PRIVS = 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_NEWUSER = 0x10000000
# machine -> (AUDIT_ARCH_*, clone, unshare, clone3); other arches get no filter
_SECCOMP_ARCH = {
    "x86_64": (0xC000003E, 56, 272, 435),
    "aarch64": (0xC00000B7, 220, 97, 435),
    "riscv64": (0xC00000F3, 220, 97, 435),
}

_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
_DEVICES = ("null", "zero", "full", "random", "urandom")


def apply_rlimits(limits: dict[str, list[int]]) -> None:
    """Set each named rlimit to (soft, hard). Only calls into libc: safe in a
    subprocess ``preexec_fn`` as well as here."""
    for name, (soft, hard) in limits.items():
        resource.setrlimit(RLIMITS[name], (soft, hard))


def _enc(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


class Libc:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        rc = self.lib.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags),
                            _enc(data))
        self._check(rc, f"mount {target}")

    def umount2(self, target: str, flags: int) -> None:
        self._check(self.lib.umount2(os.fsencode(target), flags), f"umount {target}")

    def pivot_root(self, new: str, old: str) -> bool:
        number = _SYS_PIVOT_ROOT.get(platform.machine())
        if number is None:
            return False
        self._check(self.lib.syscall(number, os.fsencode(new), os.fsencode(old)), "pivot_root")
        return True

    def no_new_privs(self) -> None:
        self._check(self.lib.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")


def userns_filter() -> bytes | None:
    """A seccomp BPF program refusing new user namespaces: unshare and clone
    with CLONE_NEWUSER fail with EPERM; clone3 (whose flags sit in memory a
    filter can't read) fails with ENOSYS, so libc falls back to clone, which
    is checked. Any other ABI on the machine (i386, x32) kills the process:
    its syscall numbers differ and would slip past. None where the arch is
    unknown."""
    arch = _SECCOMP_ARCH.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nr_clone, nr_unshare, nr_clone3 = arch
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    deny = 0x00050000  # SECCOMP_RET_ERRNO | errno
    # (code, true-label, false-label, k); labels name the instructions below
    prog = [
        ("start", ld, None, None, 4),  # seccomp_data.arch
        (None, jeq, None, "kill", audit_arch),
        (None, ld, None, None, 0),  # seccomp_data.nr
        (None, jge, "kill", None, 0x40000000),  # x32 numbers
        (None, jeq, "enosys", None, nr_clone3),
        (None, jeq, "flags", None, nr_unshare),
        (None, jeq, "flags", None, nr_clone),
        (None, ret, None, None, allow),
        ("flags", ld, None, None, 16),  # low half of args[0]: the flags of both
        (None, jset, "eperm", None, _CLONE_NEWUSER),
        (None, ret, None, None, allow),
        ("eperm", ret, None, None, deny | errno.EPERM),
        ("enosys", ret, None, None, deny | errno.ENOSYS),
        ("kill", ret, None, None, kill),
    ]
    at = {label: i for i, (label, *_) in enumerate(prog) if label}
    out = b""
    for i, (_, code, jt, jf, k) in enumerate(prog):
        t = at[jt] - i - 1 if jt else 0
        f = at[jf] - i - 1 if jf else 0
        out += struct.pack("=HBBI", code, t, f, k)
    return out


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter(libc: "Libc", prog: bytes | None) -> None:
    """Load a seccomp program (``userns_filter()``) into the calling process;
    it must have ``no_new_privs`` (or be privileged). Only libc calls."""
    if prog is None:
        return
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc._check(libc.lib.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog),
                               0, 0), "seccomp")


def _bind(libc: Libc, source: str, target: str, extra: int) -> None:
    libc.mount(source, target, None, _MS_BIND)
    # A bind mount takes the flags only on a second, remounting call.
    libc.mount(None, target, None, _MS_BIND | _MS_REMOUNT | extra)


def build_root(libc: Libc, scratch: str, ro_binds: list[str]) -> None:
    """Build the container's file system and make it the root."""
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    # Pin every source before the new root covers any of them (the scratch dir
    # itself may well live under /tmp, where the new root is built).
    scratch_fd = os.open(scratch, os.O_PATH | os.O_DIRECTORY)
    extra_fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in ro_binds}
    new = "/tmp"
    libc.mount("tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")

    ro = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    for name in _SYSTEM_DIRS:
        host = "/" + name
        target = os.path.join(new, name)
        if os.path.islink(host):
            os.symlink(os.readlink(host), target)
        elif os.path.isdir(host):
            os.mkdir(target, 0o755)
            _bind(libc, host, target, ro)
    for path, fd in extra_fds.items():
        target = new + path
        if os.path.isdir(target):  # already visible through a system dir
            continue
        os.makedirs(target, 0o755)
        _bind(libc, f"/proc/self/fd/{fd}", target, ro)
        os.close(fd)

    dev = os.path.join(new, "dev")
    os.mkdir(dev, 0o755)
    for name in _DEVICES:
        target = os.path.join(dev, name)
        open(target, "w").close()
        _bind(libc, "/dev/" + name, target, _MS_NOSUID | _MS_NOEXEC)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(to, os.path.join(dev, name))

    os.mkdir(os.path.join(new, "proc"), 0o555)
    libc.mount("proc", os.path.join(new, "proc"), "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)

    os.mkdir(new + SANDBOX_DIR, 0o755)
    _bind(libc, f"/proc/self/fd/{scratch_fd}", new + SANDBOX_DIR, _MS_NOSUID | _MS_NODEV)
    os.close(scratch_fd)
    os.symlink(SANDBOX_DIR, os.path.join(new, "tmp"))

    os.chdir(new)
    if libc.pivot_root(".", "."):
        # pivot_root(".", ".") stacks the old root on top of the new one;
        # detaching it leaves the new root alone (see pivot_root(2)).
        libc.umount2(".", _MNT_DETACH)
    else:
        os.chroot(".")
    os.chdir("/")
    libc.mount(None, "/", None, _MS_BIND | _MS_REMOUNT | ro)


def _report(fd: int, obj: dict) -> None:
    os.write(fd, (json.dumps(obj) + "\n").encode())


def _run_child(libc: Libc, cfg: dict, status_fd: int) -> None:
    """In the forked child: become the unprivileged user and exec the code."""
    try:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        libc.no_new_privs()
        install_filter(libc, userns_filter())
        os.chdir(cfg["cwd"])
        apply_rlimits(cfg["rlimits"])
        os.close(status_fd)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:  # noqa: BLE001 - report anything, then die
        try:
            _report(status_fd, {"error": f"exec failed: {e}"})
        finally:
            os._exit(127)


def main(argv: list[str]) -> int:
    os.umask(0o022)  # the kernel's own umask is 077: the container's /dev must be reachable
    with open(int(argv[1]), "rb") as f:
        cfg = json.loads(f.read())
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    libc = Libc()
    try:
        if cfg.get("container", True):
            build_root(libc, cfg["scratch"], cfg.get("ro_binds", []))
            try:
                with open("/proc/sys/kernel/hostname", "w") as f:
                    f.write("sandbox")
            except OSError:
                pass
    except BaseException as e:  # noqa: BLE001
        _report(status_fd, {"error": f"container setup failed: {e}"})
        return 125
    child = os.fork()
    if child == 0:
        _run_child(libc, cfg, status_fd)
    # Should execbox die without killing us, we end the namespace ourselves.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(124))
    signal.alarm(int(cfg.get("deadline_s", 3600)))
    # As PID 1, every orphan of the namespace is ours to reap.
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        _report(status_fd, {"signal": sig})
        return 128 + sig
    code = os.WEXITSTATUS(status)
    _report(status_fd, {"exit": code})
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
