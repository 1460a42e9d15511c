"""Starting a kernel from userland: `llmos boot --detach`, and the private
kernel an `Agent` boots when none is running."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmagentos.syscalls import paths

from .client import Client, connect
from .errors import ERRORS, KernelError


def boot_detached(run_dir: Path, kernel_args: list[str], timeout: float = 60.0,
                  progress=None) -> dict:
    """Start `python -m llmagentos.kernel` in its own session and return its
    uname once it accepts calls (the model is loaded by then)."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = run_dir / paths.LOG_NAME
    argv = [sys.executable, "-m", "llmagentos.kernel", "--run-dir", str(run_dir), *kernel_args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise ERRORS["EIO"]("kernel failed to boot:\n  " + "\n  ".join(tail))
        try:
            with connect(run_dir=run_dir) as c:
                info = c.sys.uname()
            if info["pid"] == proc.pid:  # not someone else's kernel on that run dir
                return info
        except KernelError:
            if progress is not None:
                progress()
        time.sleep(0.1)
    raise ERRORS["ETIMEDOUT"](f"kernel did not accept connections within {timeout}s; "
                              f"log: {log_path}")


_private: dict = {}


def _check_model_name(model: str | None, config: str | None) -> None:
    if model is None or model == "none" or os.sep in model or model.endswith(".gguf"):
        return  # the default, or a path: the kernel's boot checks the file
    from llmagentos.drivers.models import ModelRegistry
    from llmagentos.syscalls.errno import SyscallError

    try:
        ModelRegistry(config).canonical(model)
    except SyscallError as e:  # the registry's own ENOENT (or a bad config file's error)
        raise ERRORS[e.name](e.message) from None


def private_kernel(model: str | None) -> Client:
    """A kernel of this program's own, shut down at exit: what `Agent()` uses
    when no kernel is running, so the seed's example runs as written. It boots
    with $LLMAGENTOS_CONFIG's registry (and aliases) when that is set."""
    if "run_dir" not in _private:
        config = os.environ.get(paths.ENV_CONFIG) or None
        _check_model_name(model, config)  # the same ENOENT a running kernel gives, first
        args = (["--config", config] if config else []) + (["--model", model] if model else [])
        run_dir = Path(tempfile.mkdtemp(prefix="llmagentos-private-"))
        try:
            info = boot_detached(run_dir, args)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        _private.update(run_dir=run_dir, pid=info["pid"])

        def shutdown() -> None:
            try:
                os.kill(_private["pid"], signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # the kernel removes its files last
                    try:
                        if os.waitpid(_private["pid"], os.WNOHANG)[0]:
                            break  # our child, reaped
                    except ChildProcessError:
                        os.kill(_private["pid"], 0)  # not ours: is it still there?
                    time.sleep(0.05)
            except ProcessLookupError:
                pass
            shutil.rmtree(run_dir, ignore_errors=True)
        atexit.register(shutdown)
    return connect(run_dir=_private["run_dir"])
