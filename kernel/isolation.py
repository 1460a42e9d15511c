"""How far a spawned process is kept from the kernel and from other processes.

Capabilities are checked per syscall; this makes them mean something below the
syscall layer too. Every process starts through the launcher
(``kernel/confine.py``); the level decides what it does:

``namespace``
    private mount namespace hiding the state dir and the shell user's token
    file, every capability dropped, ``no_new_privs``, a Landlock domain when
    the kernel has Landlock. Needs root, or unprivileged user namespaces.
``landlock``
    every capability dropped, ``no_new_privs`` and a Landlock domain: no ptrace
    (``/proc/<pid>/mem``, ``fd``) of another process's domain, no signals
    across domains (Landlock ABI 6); files are not hidden.
``none``
    ``no_new_privs`` only.

At every level: the token comes on an inherited memfd, never in the
environment; the kernel is not dumpable (no same-uid ptrace of it); and
``sys.hello`` binds a token to the OS processes of its own process
(``ProcessTable.may_present``), so a token read anywhere is useless elsewhere.
``auto`` (the default) picks the strongest level that works, by starting the
launcher once at boot. docs/sandbox.md says what holds at each level.
"""

from __future__ import annotations

import logging
import marshal
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import confine

log = logging.getLogger("llmagentos.kernel")

LEVELS = ("namespace", "landlock", "none")
LAUNCHER = str(Path(confine.__file__))
_PR_SET_DUMPABLE = 4


@dataclass
class Isolation:
    level: str
    landlock_abi: int = 0
    hide_dirs: list[str] = field(default_factory=list)
    hide_files: list[str] = field(default_factory=list)

    @classmethod
    def probe(cls, wanted: str, hide_dirs: list[Path], hide_files: list[Path]) -> "Isolation":
        """The strongest level at most `wanted` that works here ("auto": any).
        A level asked for by name that does not work raises RuntimeError."""
        if wanted != "auto" and wanted not in LEVELS:
            raise RuntimeError(f"unknown isolation level {wanted!r}: auto or one of {LEVELS}")
        abi = confine.landlock_abi()
        candidates = LEVELS if wanted == "auto" else LEVELS[LEVELS.index(wanted):]
        for level in candidates:
            if level == "landlock" and not abi:
                continue
            iso = cls(level, abi, [str(d) for d in hide_dirs], [str(f) for f in hide_files])
            err = iso._try()
            if err is None:
                if wanted not in ("auto", level):
                    raise RuntimeError(f"isolation level {wanted!r} does not work here")
                return iso
            log.info("isolation level %s does not work here: %s", level, err)
            if wanted != "auto":
                raise RuntimeError(f"isolation level {wanted!r} does not work here: {err}")
        raise RuntimeError("no isolation level works here")  # "none" always does

    def _try(self) -> str | None:
        """Start the launcher once with a program that does nothing."""
        cfg = self.config(sys.executable, [sys.executable, "-I", "-S", "-c", ""],
                          dict(os.environ), "", [])
        fd = self.config_fd(cfg)
        try:
            p = subprocess.run(self.command(fd), pass_fds=[fd], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
        finally:
            os.close(fd)
        return None if p.returncode == 0 else p.stderr.decode(errors="replace").strip()

    def config(self, exe: str, argv: list[str], env: dict[str, str], token: str,
               cgroup_procs: list[str]) -> dict:
        return {"exe": exe, "argv": argv, "env": env, "token": token, "cgroup_procs": cgroup_procs,
                "level": self.level, "landlock_abi": self.landlock_abi,
                "hide_dirs": self.hide_dirs, "hide_files": self.hide_files}

    @staticmethod
    def config_fd(cfg: dict) -> int:
        """The launcher's config on a memfd: any size, and writing it never blocks.
        In marshal's format: the launcher runs on this same interpreter."""
        fd = os.memfd_create("llmagentos-spawn", 0)
        os.write(fd, marshal.dumps(cfg))
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    @staticmethod
    def command(config_fd: int) -> list[str]:
        return [sys.executable, "-I", "-S", LAUNCHER, str(config_fd)]

    def describe(self) -> dict:
        return {"level": self.level, "landlock_abi": self.landlock_abi}


def resolve_executable(argv0: str, cwd: str, path: str | None) -> str:
    """The file execve will run, found here so that a missing program is
    ENOENT at spawn (the launcher would only exit 127)."""
    if "/" in argv0:
        exe = argv0 if os.path.isabs(argv0) else os.path.join(cwd, argv0)
        if not os.path.exists(exe):
            raise FileNotFoundError(argv0)
        if os.path.isdir(exe) or not os.access(exe, os.X_OK):
            raise PermissionError(argv0)
        return exe
    found = shutil.which(argv0, path=path)
    if found is None:
        raise FileNotFoundError(argv0)
    return found if os.path.isabs(found) else os.path.join(cwd, found)


def make_kernel_undumpable() -> None:
    """Same-uid processes cannot ptrace or read the memory of a non-dumpable
    process: the kernel holds every token."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
