"""Tool-call round trips: the in-kernel `calc.eval` against a userland driver
tool (a driver process built with the SDK: kernel -> drv.request -> driver ->
drv.reply -> kernel), on one kernel in one run, sync client, one caller.

    python bench/bench_tools.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

from llmagentos.driver import cli_run  # noqa: E402

CALLS = 2_000
WARMUP = 100

DRIVER = '''
from llmagentos import Driver, tool


class BenchDriver(Driver):
    namespace = "bench"

    @tool
    async def add(self, a: int, b: int) -> int:
        """Add two integers (an async tool: runs on the driver's trio loop)."""
        return a + b

    @tool
    def add_sync(self, a: int, b: int) -> int:
        """Add two integers (a sync tool: runs in a worker thread)."""
        return a + b
'''


def measure(call, *args, n: int = CALLS) -> dict:
    for _ in range(WARMUP):
        call(*args)
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        call(*args)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    lat.sort()
    return {"calls_per_s": n / wall, "p50_us": lat[n // 2] * 1e6,
            "p99_us": lat[int(n * 0.99)] * 1e6}


def run() -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, BenchKernel("--model", "none") as k:
        path = Path(tmp) / "bench_driver.py"
        path.write_text(DRIVER)
        c = k.client()
        cli_run(c, str(path), None, None)
        out["sys_null"] = measure(c.sys.null)
        out["calc_eval"] = measure(c.tool.call, "calc.eval", {"expression": "2+3"})
        out["driver_async"] = measure(c.tool.call, "bench.add", {"a": 2, "b": 3})
        out["driver_sync"] = measure(c.tool.call, "bench.add_sync", {"a": 2, "b": 3})
        c.close()
    out["ratio_async"] = out["driver_async"]["calls_per_s"] / out["calc_eval"]["calls_per_s"]
    out["ratio_sync"] = out["driver_sync"]["calls_per_s"] / out["calc_eval"]["calls_per_s"]
    return out


def report(r: dict) -> None:
    print(f"== tool calls ({CALLS} round trips each, one sync caller) ==")
    labels = {"sys_null": "sys.null (no tool, baseline)",
              "calc_eval": "calc.eval (in kernel)",
              "driver_async": "driver tool (async)",
              "driver_sync": "driver tool (sync, thread)"}
    for key, label in labels.items():
        m = r[key]
        print(f"  {label:28s} {m['calls_per_s']:7.0f} calls/s   p50 {m['p50_us']:7.1f} us"
              f"   p99 {m['p99_us']:7.1f} us")
    print(f"  driver/in-kernel ratio: async tool {r['ratio_async']:.2f}, "
          f"sync tool {r['ratio_sync']:.2f}")


if __name__ == "__main__":
    report(run())
