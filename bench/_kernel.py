"""Boot a real kernel for a benchmark (the same program `llmos boot` runs), and
run agent processes on it that start together."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import llmagentos


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
        stop_process(self.proc, 30)
        self.log.close()


# An agent process: connect, say ready, wait for "go" in its mailbox (SIGUSR1 would
# come as a proc.signal notification to a process with a connection, not as an OS
# signal), then llm.generate each prompt in turn.
AGENT = """
import json, sys, time, llmagentos
prompts, params = json.loads(sys.argv[1])
c = llmagentos.connect()
c.sys.null()
print("ready", flush=True)
c.ipc.recv(900)  # the start line: every agent's "go" is sent at once
out = []
for p in prompts:
    t0 = time.time()
    r = c.llm.generate(p, None, params)
    out.append({"start": t0, "end": time.time(), "usage": r["usage"], "text": r["text"],
                "finish_reason": r["finish_reason"]})
print(json.dumps(out), flush=True)
"""


def aggregate(runs: list[dict]) -> dict:
    """Tokens out of a set of generations over the wall time from the first start
    to the last finish."""
    tokens = sum(r["usage"]["completion_tokens"] for r in runs)
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "start_spread_s": max(r["start"] for r in runs) - min(r["start"] for r in runs)}


def run_agents(c: llmagentos.Client, jobs: list[tuple[list[str], dict]],
               timeout: float = 600, on_start: Callable[[], None] | None = None,
               placement: str = "local") -> list[list[dict]]:
    """One agent process per job (prompts generated one after another, with the
    job's sampling params), all started at once by a barrier, so process start-up
    is not what is timed. Returns, per job, per prompt: start and end (wall
    clock), usage, text and finish_reason. ``on_start`` runs as the barrier opens.
    ``placement``: where the agents run (proc.spawn's); a remote agent's output
    comes back only when it exits, so it is ready once it has made a syscall."""
    pids = [c.proc.spawn([sys.executable, "-c", AGENT, json.dumps(job)], f"agent{i}",
                         placement=placement)
            for i, job in enumerate(jobs)]
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting:
        rows = {r["pid"]: r for r in c.proc.ps()} if placement != "local" else {}
        for pid in list(waiting):
            log = c.proc.logs(pid)
            if log["data"].startswith(b"ready") or rows.get(pid, {}).get("syscalls", 0) > 0:
                waiting.discard(pid)
            elif log["state"] in ("ZOMBIE", "REAPED") or time.monotonic() > deadline:
                raise RuntimeError(f"agent pid {pid} did not get ready:\n"
                                   + log["data"].decode(errors="replace"))
        time.sleep(0.02)
    if on_start is not None:
        on_start()
    for pid in pids:
        c.ipc.send(pid, "go")
    results = []
    for pid in pids:
        status = c.proc.wait(pid, max(1.0, deadline - time.monotonic()))
        out = c.proc.logs(pid)["data"].decode(errors="replace")
        if status["exit_code"] != 0:
            raise RuntimeError(f"agent pid {pid} failed ({status}):\n{out}")
        results.append(json.loads(out.splitlines()[-1]))
    return results
