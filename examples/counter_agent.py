"""A tiny agent process: it makes syscalls and reports what it sees.

Run under the kernel: `llmos spawn -- python examples/counter_agent.py 5`.
"""

import sys
import time

import llmagentos

c = llmagentos.connect()  # zero configuration: the kernel put socket and token in our env
n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
me = c.proc.stat()
print(f"pid {c.pid} ({me['name']}) caps={len(me['caps'])} starting {n} steps", flush=True)
for i in range(n):
    print(f"pid {c.pid} step {i + 1}/{n}: {len(c.proc.ps())} processes in the table", flush=True)
    time.sleep(0.3)
c.proc.exit(0)
