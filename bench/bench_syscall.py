"""Syscall overhead: null-syscall calls/s and latency for 1 and 8 client
processes, against a bare trio+msgpack echo server as the ceiling; and
spawn+wait of 100 trivial processes.

    python bench/bench_syscall.py
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

import llmagentos  # noqa: E402

CALLS = 20_000


def _worker(address: str, token: str, n: int, q: mp.Queue, ca: str | None) -> None:
    c = llmagentos.connect(address, token, ca=ca)
    for _ in range(200):  # warm up
        c.call("sys.null")
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        c.call("sys.null")
        lat.append(time.perf_counter() - t)
    q.put((time.perf_counter() - t0, lat))
    c.close()


def measure(address: str, token: str, clients: int, n: int, ca: str | None = None) -> dict:
    q: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_worker, args=(address, token, n, q, ca))
             for _ in range(clients)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(r[0] for r in results)
    lat = sorted(x for r in results for x in r[1])
    del t0
    return {
        "calls_per_s": clients * n / wall,
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
    }


def bench_spawn(k: BenchKernel, n: int = 100) -> float:
    c = k.client()
    t0 = time.perf_counter()
    for _ in range(n):
        c.proc.wait(c.proc.spawn(["true"]))
    ms = (time.perf_counter() - t0) * 1000 / n
    c.close()
    return ms


ROUNDS = 3  # echo and kernel alternate; medians, since two cores make single runs noisy


def run() -> dict:
    out: dict = {k: [] for k in ("echo_1", "echo_8", "kernel_1", "kernel_8")}
    with tempfile.TemporaryDirectory() as tmp, BenchKernel("--model", "none") as k:
        path = str(Path(tmp) / "echo.sock")
        echo = subprocess.Popen([sys.executable, str(Path(__file__).parent / "echo_server.py"),
                                 path], stdout=subprocess.PIPE, text=True)
        echo.stdout.readline()
        token = (k.run_dir / "token").read_text().strip()
        sock = str(k.run_dir / "kernel.sock")
        try:
            for _ in range(ROUNDS):
                out["echo_1"].append(measure(path, "x", 1, CALLS))
                out["kernel_1"].append(measure(sock, token, 1, CALLS))
                out["echo_8"].append(measure(path, "x", 8, CALLS // 4))
                out["kernel_8"].append(measure(sock, token, 8, CALLS // 4))
        finally:
            echo.kill()
            echo.wait()
        out["spawn_wait_ms"] = bench_spawn(k, 100)
    summarize(out, "kernel", "echo")
    return out


def summarize(out: dict, top: str, bottom: str) -> None:
    """Rounds of `measure` under out["<side>_<clients>"] (clients 1 and 8): each
    round's calls/s of top ÷ bottom and their median (ratios_N, ratio_N), then each
    side's medians in place of its rounds."""
    for n in ("1", "8"):
        out[f"ratios_{n}"] = [a["calls_per_s"] / b["calls_per_s"]
                              for a, b in zip(out[f"{top}_{n}"], out[f"{bottom}_{n}"])]
        out[f"ratio_{n}"] = statistics.median(out[f"ratios_{n}"])
    for name in (f"{side}_{n}" for side in (top, bottom) for n in ("1", "8")):
        out[name] = {key: statistics.median(m[key] for m in out[name])
                     for key in ("calls_per_s", "p50_us", "p99_us")}


def report(r: dict) -> None:
    print("== syscall overhead (sys.null; medians) ==")
    for name in ("echo_1", "kernel_1", "echo_8", "kernel_8"):
        m = r[name]
        print(f"  {name:9s} {m['calls_per_s']:9.0f} calls/s   p50 {m['p50_us']:6.1f} us"
              f"   p99 {m['p99_us']:7.1f} us")
    print(f"  kernel/echo ratio (median of {ROUNDS} alternating rounds): 1 client "
          f"{r['ratio_1']:.2f} {[round(x, 2) for x in r['ratios_1']]}, 8 clients "
          f"{r['ratio_8']:.2f} {[round(x, 2) for x in r['ratios_8']]}"
          f"   (goal >= 0.70; >= 15k calls/s for 1 client)")
    print(f"  spawn+wait of 100 trivial processes: {r['spawn_wait_ms']:.1f} ms per process")


if __name__ == "__main__":
    report(run())
