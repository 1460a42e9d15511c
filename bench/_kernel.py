"""Boot a real kernel for a benchmark (the same program `llmos boot` runs)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llmagentos


class BenchKernel:
    def __init__(self, *extra: str, wait: float = 120):
        self.tmp = Path(tempfile.mkdtemp(prefix="llmos-bench-"))
        self.run_dir = self.tmp / "run"
        self.log = open(self.tmp / "kernel.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmagentos.kernel", "--run-dir", str(self.run_dir),
             "--state-dir", str(self.tmp / "state"), "--log-level", "WARNING", *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError((self.tmp / "kernel.log").read_text())
            try:
                self.client().close()
                break
            except llmagentos.KernelError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def client(self) -> llmagentos.Client:
        return llmagentos.connect(run_dir=self.run_dir)

    def __enter__(self) -> "BenchKernel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
