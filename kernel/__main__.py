"""The kernel image: `python -m llmagentos.kernel [options]` boots in the foreground.

`llmos boot` runs this program (as a shell starts a kernel image) rather
than importing the kernel into the CLI.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from llmagentos.syscalls import bootopts as config
from llmagentos.syscalls.bootopts import KernelConfig
from llmagentos.syscalls.errno import SyscallError

from .kernel import BootError, Kernel


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
