"""`make demo`: boot a kernel on the embedded model, run three agents at once
(one on a Gymnasium environment, one using tools, one learning), show the
process table while they run, the results after; then agents talking: a
customer's message from the shell, routed by one agent to a specialist over
mailboxes (examples/customer_service.py); and shut down."""

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
    sh("boot", "--detach", "--slots", "4", "--n-ctx", "1024")
    try:
        c = llmagentos.connect()
        agents = {name: c.proc.spawn([PY, str(HERE / "agents" / f"{name}.py")], name)
                  for name in ("env_agent", "tool_agent", "learning_agent")}
        # the customer-service agents start now and wait in their mailboxes
        subprocess.run([PY, str(HERE / "customer_service.py"), "--serve"], check=True)
        time.sleep(4)
        sh("ps")
        sh("top", "-n", "1")
        print(f"\npausing env_agent (pid {agents['env_agent']}) for two seconds: its device "
              "requests are parked, the others keep the device busy")
        sh("kill", "-STOP", str(agents["env_agent"]))
        time.sleep(2)
        sh("ps")
        sh("kill", "-CONT", str(agents["env_agent"]))
        for name, pid in agents.items():
            st = c.proc.wait(pid, 600)
            how = f"exit {st['exit_code']}" if st["signal"] is None else st["signal_name"]
            print(f"\n--- {name} (pid {pid}) finished: {how} ---")
            print(c.proc.logs(pid)["data"].decode(), end="")
        sh("traj", "ls", "--limit", "8")
        out = tmp / "learning_curve.png"
        sh("traj", "plot", "--family", "frozenlake-q", "--window", "10", "-o", str(out))
        print("\nagents talking: the router hands the customer to a specialist, who answers")
        sh("send", "agent:router", "Where is my order 1234? It is late")
        sh("recv", "--timeout", "120")
        subprocess.run([PY, str(HERE / "customer_service.py"), "--stop"], check=True)
        sh("traj", "ls", "--family", "customer-service")
        c.close()
    finally:
        sh("shutdown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
