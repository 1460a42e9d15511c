"""IPC between processes, one section each (SECTIONS: name, run, report); every
section runs on the same `--model none` kernel.

pipe: MB/s through a kernel pipe (ipc.pipe), three ways, against an OS pipe
between the same two programs as the ceiling:
  - syscalls: a child fs.write()s 64 KiB chunks, the bench fs.read()s them;
  - stdio: the writer's OS stdout and the reader's OS stdin are joined by the
    kernel (proc.spawn stdout=/stdin=), the way `llmos spawn` pipelines run;
  - os: `writer | reader` through a plain OS pipe (no kernel).

    python bench/bench_ipc.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

MB = 1 << 20
PIPE_BYTES = 64 * MB
ROUNDS = 3
PIPE_FLOOR_MB_S = 10.0  # our floor: the issue asks for the number, it sets no goal

WRITER = f"""
import sys
chunk = b"x" * 65536
for _ in range({PIPE_BYTES} // 65536):
    sys.stdout.buffer.write(chunk)
"""
READER = """
import sys
n = 0
while data := sys.stdin.buffer.read1(1 << 20):
    n += len(data)
print(n)
"""
# The writer through syscalls: fd 1 is the pipe's write end it was spawned with.
SYS_WRITER = f"""
import llmagentos
c = llmagentos.connect()
chunk = b"x" * 65536
for _ in range({PIPE_BYTES} // 65536):
    c.fs.write(1, chunk)
"""


def _stdio_pair(c) -> float:
    """The writer's OS stdout into the reader's OS stdin through a kernel pipe;
    seconds from the spawns to the reader's exit (startup counted, as for the OS pair)."""
    p = c.ipc.pipe()
    t0 = time.perf_counter()
    r = c.proc.spawn([sys.executable, "-c", READER], stdin=p["read"])
    w = c.proc.spawn([sys.executable, "-c", WRITER], stdout=p["write"])
    c.fs.close(p["read"])
    c.fs.close(p["write"])
    st = c.proc.wait(r, 600)
    secs = time.perf_counter() - t0
    c.proc.wait(w, 60)
    got = int(c.proc.logs(r)["data"].split()[-1])
    if st["exit_code"] != 0 or got != PIPE_BYTES:
        raise RuntimeError(f"reader got {got} of {PIPE_BYTES} bytes ({st})")
    return secs


def run_pipe(k: BenchKernel) -> dict:
    c = k.client()
    out: dict = {"syscalls": [], "stdio": [], "os": []}
    for _ in range(ROUNDS):
        out["syscalls"].append(_syscall_pair(c))
        out["stdio"].append(_stdio_pair(c))
        out["os"].append(_os_pair())
    c.close()
    res = {name: PIPE_BYTES / MB / statistics.median(secs) for name, secs in out.items()}
    res["ratio_stdio"] = res["stdio"] / res["os"]
    res["ratio_syscalls"] = res["syscalls"] / res["os"]
    return res


def _syscall_pair(c) -> float:
    """A child fs.write()s its fd 1 (the pipe's write end), the bench reads
    the other end with fs.read: every byte crosses two syscalls."""
    p = c.ipc.pipe()
    t0 = time.perf_counter()
    w = c.proc.spawn([sys.executable, "-c", SYS_WRITER], stdout=p["write"])
    c.fs.close(p["write"])
    n = 0
    while data := c.fs.read(p["read"], 65536):
        n += len(data)
    secs = time.perf_counter() - t0
    c.fs.close(p["read"])
    c.proc.wait(w, 60)
    if n != PIPE_BYTES:
        raise RuntimeError(f"read {n} of {PIPE_BYTES} bytes")
    return secs


def _os_pair() -> float:
    t0 = time.perf_counter()
    w = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE)
    r = subprocess.run([sys.executable, "-c", READER], stdin=w.stdout, capture_output=True,
                       check=True)
    w.stdout.close()
    w.wait()
    secs = time.perf_counter() - t0
    if int(r.stdout) != PIPE_BYTES:
        raise RuntimeError(f"os pipe moved {r.stdout!r} bytes")
    return secs


def report_pipe(r: dict) -> list[str]:
    ok = min(r["syscalls"], r["stdio"]) >= PIPE_FLOOR_MB_S
    return [
        f"  pipe, fs.write -> fs.read (64 KiB calls) {r['syscalls']:8.1f} MB/s   "
        f"({r['ratio_syscalls']:.2f}x the OS pipe)",
        f"  pipe, child stdout -> child stdin        {r['stdio']:8.1f} MB/s   "
        f"({r['ratio_stdio']:.2f}x the OS pipe)",
        f"  OS pipe between the same programs       {r['os']:8.1f} MB/s",
        f"  {'PASS' if ok else 'FAIL'}: both kernel paths >= {PIPE_FLOOR_MB_S:.0f} MB/s "
        f"(our floor; the issue sets no number)  [{PIPE_BYTES // MB} MiB, median of {ROUNDS}]",
    ]


# (name, run on a kernel, report lines); other IPC sections append here.
SECTIONS: list[tuple[str, Callable[[BenchKernel], dict], Callable[[dict], list[str]]]] = [
    ("pipe", run_pipe, report_pipe),
]


def run() -> dict:
    with BenchKernel("--model", "none") as k:
        return {name: fn(k) for name, fn, _ in SECTIONS}


def report(r: dict) -> None:
    print("== IPC ==")
    for name, _, lines in SECTIONS:
        print(f" [{name}]")
        for line in lines(r[name]):
            print(line)


if __name__ == "__main__":
    report(run())
