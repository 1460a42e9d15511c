"""The kernel image: `python -m llmagentos.kernel [options]` boots in the foreground.

`llmos boot` runs this program (as a shell starts a kernel image) rather
than importing the kernel into the CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _load_numpy() -> None:
    """numpy's OpenBLAS starts a spinning thread per core when it loads; the
    kernel's compute is llama.cpp's, so its BLAS gets one thread (0.15 s less
    CPU a boot), and the programs it starts still inherit the caller's setting."""
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        if before is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = before


_load_numpy()

import trio  # noqa: E402

from llmagentos.syscalls import bootopts as config  # noqa: E402
from llmagentos.syscalls.bootopts import KernelConfig  # noqa: E402
from llmagentos.syscalls.errno import SyscallError  # noqa: E402

from .kernel import BootError, Kernel  # noqa: E402


def parse_args(argv: list[str] | None = None) -> KernelConfig:
    ap = argparse.ArgumentParser(prog="python -m llmagentos.kernel",
                                 description="Boot the LLMAgentOS kernel (foreground).")
    config.add_arguments(ap)  # every option, declared once in syscalls/bootopts.py
    a = ap.parse_args(argv)
    try:
        cfg = config.load(config.given(a))
    except config.ConfigError as e:
        ap.error(str(e))
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s kernel %(levelname)s %(message)s")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        trio.run(Kernel(cfg).run)
    except SyscallError as e:  # e.g. a broken model registry file
        print(f"llmos: boot failed: {e.message}", file=sys.stderr)
        return 1
    except BootError as e:
        print(f"llmos: boot failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
