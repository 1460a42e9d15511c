"""The launcher every spawned agent process starts as: it confines itself, then
execs the agent's program.

The kernel starts ``python -I -S confine.py CONFIG_FD`` with its config on
that pipe. It imports only the standard library (it runs without
site-packages, like ``drivers/execinit.py``) and does, in order:

1. **joins its process group(s)** (``cgroup.procs`` files), so nothing it starts
   can outlive a kill of the process;
2. **hides the kernel's secrets** in a private mount namespace (``namespace``
   level): an empty read-only tmpfs over the state dir, ``/dev/null`` bound
   over the shell user's token file. A non-root kernel first enters a user
   namespace that maps its own uid to itself. Mounts made here are locked for
   the child: it cannot unmount them, even from a nested user namespace;
3. **drops every capability** (bounding set, ambient, effective, permitted) and
   sets ``no_new_privs``: a kernel running as root starts agents as uid 0
   without root's powers, which cannot undo step 2 nor read the memory or
   ``/proc`` files of the kernel (which is not dumpable);
4. **enters a Landlock domain** when the running kernel has Landlock: a
   process in it cannot ptrace (read ``/proc/<pid>/environ``, ``mem``, ``fd``)
   or, from Landlock ABI 6 on, signal any process outside its own domain:
   not the kernel, not another agent;
5. hands over the process's **token on an inherited memfd** named by
   ``LLMAGENTOS_TOKEN_FD`` (never in the environment), then ``execve``s the
   program with the config's environment.

Which steps run is decided by the kernel (``kernel/isolation.py``) from what
the machine allows; docs/sandbox.md says what holds at each level.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import sys

ENV_TOKEN_FD = "LLMAGENTOS_TOKEN_FD"

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MS_REMOUNT = 0x20

_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Landlock (generic syscall numbers: the same on x86-64, arm64, riscv64)
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_ACCESS_FS_MAKE_CHAR = 1 << 6
_LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11
_LANDLOCK_SCOPE_SIGNAL = 1 << 1

_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def landlock_abi() -> int:
    """The running kernel's Landlock ABI version; 0 when it has none."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(ret), 0)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def join_groups(procs_files: list[str]) -> None:
    for path in procs_files:
        _write(path, "0")  # "0": the writing process itself


def hide(libc: ctypes.CDLL, cfg: dict) -> None:
    """A private mount namespace where the kernel's secrets are not there."""
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:  # an unprivileged kernel: mount rights come from a user namespace
        _check(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS), "unshare(user, mount)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    else:
        _check(libc.unshare(_CLONE_NEWNS), "unshare(mount)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    for d in cfg.get("hide_dirs", []):
        if os.path.isdir(d):
            _check(libc.mount(b"none", d.encode(), b"tmpfs",
                              _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                              b"size=4k,mode=0555"), f"hide {d}")
    for f in cfg.get("hide_files", []):
        if os.path.isfile(f):
            _check(libc.mount(b"/dev/null", f.encode(), None, _MS_BIND, None), f"mask {f}")
            _check(libc.mount(None, f.encode(), None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None),
                   f"mask {f} read-only")


def drop_capabilities(libc: ctypes.CDLL) -> None:
    cap = 0
    while libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:  # EINVAL past the last cap
        cap += 1
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
    nr = _SYS_CAPSET.get(os.uname().machine)
    if nr is not None:
        _check(libc.syscall(nr, header, data), "capset")


def landlock(libc: ctypes.CDLL, abi: int) -> None:
    """A domain of its own: ptrace (and from ABI 6 signals) stop at its border.
    Only device-node creation is handled as file access: the domain exists for
    its scoping, the mount namespace does the hiding."""
    handled = _LANDLOCK_ACCESS_FS_MAKE_CHAR | _LANDLOCK_ACCESS_FS_MAKE_BLOCK
    if abi >= 6:
        attr = (ctypes.c_uint64 * 3)(handled, 0, _LANDLOCK_SCOPE_SIGNAL)
    elif abi >= 4:
        attr = (ctypes.c_uint64 * 2)(handled, 0)
    else:
        attr = (ctypes.c_uint64 * 1)(handled)
    libc.syscall.restype = ctypes.c_long
    fd = _check(libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), attr,
                             ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)),
                "landlock_create_ruleset")
    try:
        _check(libc.syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd),
                            ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(fd)


def token_fd(token: str) -> int:
    """The token on an inherited, re-readable memfd: the program (and a shell
    script's interpreter after it) reads it with pread, nothing else sees it."""
    fd = os.memfd_create("llmagentos-token", 0)  # no MFD_CLOEXEC: exec keeps it
    os.write(fd, token.encode())
    return fd


def confine(cfg: dict) -> None:
    libc = _libc()
    join_groups(cfg.get("cgroup_procs", []))
    level = cfg.get("level", "none")
    if level == "namespace":
        hide(libc, cfg)
    if level in ("namespace", "landlock"):
        drop_capabilities(libc)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if level in ("namespace", "landlock") and cfg.get("landlock_abi", 0) > 0:
        landlock(libc, cfg["landlock_abi"])


def main() -> None:
    with os.fdopen(int(sys.argv[1]), "rb") as f:  # a memfd: the kernel never blocks on it
        cfg = marshal.loads(f.read())  # (json would cost each spawn its import)
    env = dict(cfg["env"])
    ready = cfg.get("ready_fd")
    if ready is not None:  # closes on a successful exec: the kernel waits for that EOF
        os.set_inheritable(ready, False)
    try:
        confine(cfg)
        if cfg.get("token"):
            env[ENV_TOKEN_FD] = str(token_fd(cfg["token"]))
        os.umask(0o022)
        os.execve(cfg["exe"], cfg["argv"], env)
    except OSError as e:  # the kernel answers the spawn with this; 127: "could not run it"
        msg = f"cannot start {cfg['argv'][0]!r}: {e}"
        if ready is not None:
            os.write(ready, msg.encode()[:4000])
        print(f"llmagentos: {msg}", file=sys.stderr, flush=True)
        os._exit(127)


if __name__ == "__main__":
    main()
