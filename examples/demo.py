"""`make demo`: boot a kernel, run a few agent processes, show them, signal
one, wait for all, shut down. Everything goes through the `llmos` CLI and
the syscall client, as a user would do it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llmagentos

HERE = Path(__file__).parent
PY = sys.executable


def sh(*args: str) -> str:
    print(f"\n$ llmos {' '.join(args)}", flush=True)
    r = subprocess.run([PY, "-m", "llmagentos.cli", *args], capture_output=True, text=True)
    print(r.stdout + r.stderr, end="", flush=True)
    return r.stdout


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="llmos-demo-"))
    os.environ["LLMAGENTOS_RUN_DIR"] = str(tmp / "run")
    os.environ["LLMAGENTOS_STATE_DIR"] = str(tmp / "state")
    sh("boot", "--detach")
    try:
        c = llmagentos.connect()
        agents = {
            "counter-a": c.proc.spawn([PY, str(HERE / "counter_agent.py"), "4"], "counter-a"),
            "counter-b": c.proc.spawn([PY, str(HERE / "counter_agent.py"), "6"], "counter-b"),
            "sleeper": c.proc.spawn(["sleep", "30"], "sleeper"),
        }
        time.sleep(0.8)
        sh("ps")
        print(f"\nstopping counter-b (pid {agents['counter-b']}) for a second...")
        sh("kill", "-STOP", str(agents["counter-b"]))
        sh("ps")
        time.sleep(1)
        sh("kill", "-CONT", str(agents["counter-b"]))
        sh("kill", "-TERM", str(agents["sleeper"]))
        for name, pid in agents.items():
            st = c.proc.wait(pid, 60)
            how = f"exit {st['exit_code']}" if st["signal"] is None else st["signal_name"]
            print(f"{name} (pid {pid}) finished: {how}")
        for name in ("counter-a", "counter-b"):
            print(f"\n--- output of {name} ---")
            print(c.proc.logs(agents[name])["data"].decode(), end="")
        c.close()
    finally:
        sh("shutdown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
