"""`make bench`: every benchmark, each printing ratios measured in one run."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# (module, title); a module missing a dependency is reported, not fatal.
BENCHES = ["bench_syscall", "bench_tls", "bench_overhead", "bench_device", "bench_kernel_llm",
           "bench_gateway", "bench_memory", "bench_tools", "bench_remote", "bench_ipc",
           "bench_mailbox", "bench_learn", "bench_ray", "bench_scale"]


def main() -> int:
    failed = 0
    for name in BENCHES:
        if not (Path(__file__).parent / f"{name}.py").exists():
            continue
        t0 = time.monotonic()
        mod = importlib.import_module(name)
        try:
            text = mod.report(mod.run())
            if isinstance(text, str):
                print(text)
        except Exception as e:  # keep going: one broken bench must not hide the others
            failed += 1
            print(f"!! {name} failed: {type(e).__name__}: {e}")
        print(f"   ({name}: {time.monotonic() - t0:.0f}s)\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
