"""Driver files: loading one (`load_driver_class`), starting it as a process
of the caller (`llmos driver run FILE`: `cmd_driver_run`, `cli_run`), and the
program that process runs (`python -m llmagentos.driver FILE [CLASS]`: `main`)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmagentos.syscalls import caps as _caps

from .cli_io import EXIT_OK, UsageError, client, out
from .errors import ERRORS, KernelError

if TYPE_CHECKING:
    from .driver import Driver


def load_driver_class(path: str | Path, name: str | None = None) -> type[Driver]:
    """Import a Python file and return its Driver subclass (the one named
    `name`, else the only one defined in the file)."""
    from .driver import Driver  # here: the driver module re-exports this one
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no driver file {path}")
    modname = "llmos_driver_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module  # dataclasses and pickling look modules up by name
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the driver's own helper modules
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: say where and why, not a raw traceback
        raise ImportError(_load_failure(path, e)) from None
    if name is not None:
        cls = getattr(module, name, None)
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            raise LookupError(f"{path} has no Driver subclass named {name!r}")
        return cls
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, Driver) and c is not Driver
             and c.__module__ == modname and c.tools]
    if not found:
        raise LookupError(f"{path} defines no Driver subclass with @tool methods")
    if len(found) > 1:
        names = ", ".join(c.__name__ for c in found)
        raise LookupError(f"{path} defines several drivers ({names}): name one")
    return found[0]


def _load_failure(path: Path, exc: Exception) -> str:
    line = next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__))
                 if f.filename == str(path)), None)
    where = f"{path}:{line}" if line else str(path)
    msg = f"{where}: {type(exc).__name__}: {exc}"
    if isinstance(exc, TypeError) and "not subscriptable" in str(exc):
        msg += ("\n(a method named like a builtin, e.g. `def list`, hides it from the "
                "annotations below it in the class body: name the method otherwise and keep "
                "the tool's name with @tool(name=\"list\"))")
    return msg


def cli_run(client: Any, path: str, name: str | None, caps: list[str] | None,
            timeout: float = 30.0) -> int:
    """`llmos driver run FILE [--class NAME] [--cap ...]`: spawn the driver as a
    process of the caller and wait until its namespace is served; its pid.

    The file is imported here first, to learn the namespace and to fail early
    on an error in it. With an explicit capability list, drv.register is added.
    """
    path = str(Path(path).resolve())
    cls = load_driver_class(path, name)
    ns = cls.namespace
    argv = [sys.executable, "-m", "llmagentos.driver", path] + ([cls.__name__] if name else [])
    served = [t for t in client.tool.list(ns) if t["name"].startswith(ns + ".")]
    if served:
        raise ERRORS["EEXIST"](f"namespace {ns!r} is already served"
                               f" (by pid {served[0].get('driver')})")
    if caps is not None and not _caps.covers(caps, "drv.register"):
        caps = [*caps, "drv.register"]
    pid = client.proc.spawn(argv, name=f"driver:{ns}", caps=caps)
    deadline = time.monotonic() + timeout
    while True:
        if any(t["name"].startswith(ns + ".") for t in client.tool.list(ns)):
            return pid
        state = client.proc.stat(pid)["state"]
        if state == "ZOMBIE":
            try:
                st = client.proc.wait(pid, 1.0)
                how = (f"was killed by {st['signal_name']}" if st.get("signal_name")
                       else f"exited with status {st.get('exit_code')}")
            except KernelError:
                how = "exited"
            raise ERRORS["EIO"](f"driver {cls.__name__} (pid {pid}) {how} before serving "
                                f"{ns!r}:\n{_log_tail(client, pid)}")
        if time.monotonic() > deadline:
            client.proc.kill(pid, "SIGKILL")
            raise ERRORS["ETIMEDOUT"](f"driver {cls.__name__} (pid {pid}) did not register "
                                      f"{ns!r} within {timeout:g}s; killed it:\n"
                                      f"{_log_tail(client, pid)}")
        time.sleep(0.05)


def cmd_driver_run(args: argparse.Namespace) -> int:
    with client(args) as c:
        try:
            pid = cli_run(c, args.file, args.cls, args.cap)
        except (OSError, LookupError, ImportError, SyntaxError, TypeError) as e:
            raise UsageError(f"cannot load a driver from {args.file}: {e}") from None
    out(args, {"pid": pid}, lambda d: print(d["pid"]))
    return EXIT_OK


def _log_tail(client: Any, pid: int, chars: int = 2000) -> str:
    data, offset = b"", 0
    try:
        while True:
            chunk = client.proc.logs(pid, offset, 1 << 20)
            data = (data + chunk["data"])[-4 * chars:]
            if chunk["offset"] == offset:
                break
            offset = chunk["offset"]
    except KernelError as e:
        return f"(no log: {e})"
    text = data.decode("utf-8", "replace")[-chars:]
    return text or "(the log is empty)"


def main(argv: list[str] | None = None) -> int:
    """`python -m llmagentos.driver FILE [CLASS]`: the program a driver process runs."""
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m llmagentos.driver FILE [CLASS]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s driver %(levelname)s %(message)s")
    try:
        cls = load_driver_class(argv[0], argv[1] if len(argv) > 1 else None)
    except (OSError, ImportError, LookupError, SyntaxError, TypeError) as e:
        print(f"llmagentos.driver: {e}", file=sys.stderr)
        return 1
    try:
        cls().run()
    except KernelError as e:
        print(f"llmagentos.driver: {cls.__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
