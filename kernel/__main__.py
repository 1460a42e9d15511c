"""The kernel image: `python -m llmagentos.kernel [options]` boots in the foreground.

`llmos boot` runs this program (as a shell starts a kernel image) rather
than importing the kernel into the CLI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from llmagentos.syscalls.errno import SyscallError

from .kernel import BootError, Kernel, KernelConfig


def parse_args(argv: list[str] | None = None) -> KernelConfig:
    ap = argparse.ArgumentParser(prog="python -m llmagentos.kernel",
                                 description="Boot the LLMAgentOS kernel (foreground).")
    ap.add_argument("--run-dir", type=Path, help="socket, token and pidfile live here")
    ap.add_argument("--state-dir", type=Path, help="durable state: logs, contexts, files")
    ap.add_argument("--tcp", metavar="HOST:PORT", help="also listen on loopback TCP")
    ap.add_argument("--grace", type=float, default=3.0, help="seconds between TERM and KILL")
    ap.add_argument("--max-frame", type=int, default=16 * 1024 * 1024,
                    help="largest accepted message, bytes")
    ap.add_argument("--max-connections", type=int, default=1024,
                    help="open connections at once; more are refused")
    ap.add_argument("--max-unauthenticated", type=int, default=64,
                    help="connections that have not said sys.hello yet, at once")
    ap.add_argument("--policy", default="fair", choices=["fifo", "rr", "priority", "fair"],
                    help="run-queue policy of the compute device")
    ap.add_argument("--quantum", type=int, default=16, help="tokens per turn (rr, priority, fair)")
    ap.add_argument("--model", default="gemma3-270m",
                    help="model name from the registry, a GGUF path, or 'none' (no device)")
    ap.add_argument("--config", type=Path, help="TOML model registry (more model names)")
    ap.add_argument("--slots", type=int, default=8, help="sequences on the device")
    ap.add_argument("--n-ctx", type=int, default=2048, help="tokens per slot")
    ap.add_argument("--threads", type=int, help="llama.cpp threads (default: 2)")
    ap.add_argument("--gpu-layers", type=int, help="layers to offload where a GPU exists")
    ap.add_argument("--snapshot-ram", type=int, default=256 << 20,
                    help="bytes of preempted KV state kept in RAM before spilling to disk")
    ap.add_argument("--embed-memory", action="store_true",
                    help="embed archived context messages; ctx.search then finds by meaning too")
    ap.add_argument("--ray", metavar="auto|ADDRESS",
                    help="place the compute devices on a Ray cluster ('auto': join the local "
                         "one or start it); needs pip install 'llmagentos[ray]'")
    ap.add_argument("--devices", type=int, default=1, help="--ray: device actors to place")
    ap.add_argument("--device-cpus", type=float, default=1.0,
                    help="--ray: CPUs each device actor reserves")
    ap.add_argument("--device-gpus", type=float, default=0.0,
                    help="--ray: GPUs each device actor reserves")
    ap.add_argument("--device-restarts", type=int, default=3,
                    help="--ray: times Ray restarts a dead device actor")
    ap.add_argument("--isolation", default="auto",
                    choices=["auto", "namespace", "landlock", "none"],
                    help="how spawned processes are kept from the kernel and each other "
                         "(docs/sandbox.md)")
    ap.add_argument("--containment", default="auto",
                    choices=["auto", "cgroup2", "cgroup1", "subreaper"],
                    help="how process trees are kept together and killed (default: the "
                         "strongest that works here)")
    ap.add_argument("--exec-memory", type=int, default=1 << 30,
                    help="bytes all exec runs of one process may hold together")
    ap.add_argument("--exec-pids", type=int, default=256,
                    help="processes all exec runs of one process may have at once")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    cfg = KernelConfig(tcp=a.tcp, grace=a.grace, max_frame=a.max_frame, policy=a.policy,
                       quantum=a.quantum, model=a.model, models_config=a.config,
                       slots=a.slots, n_ctx=a.n_ctx, threads=a.threads,
                       n_gpu_layers=a.gpu_layers, snapshot_ram=a.snapshot_ram,
                       embed_memory=a.embed_memory)
    cfg.ray, cfg.devices, cfg.device_restarts = a.ray, a.devices, a.device_restarts
    cfg.max_connections, cfg.max_unauthenticated = a.max_connections, a.max_unauthenticated
    cfg.device_cpus, cfg.device_gpus = a.device_cpus, a.device_gpus
    cfg.isolation = a.isolation
    cfg.containment, cfg.exec_memory, cfg.exec_pids = a.containment, a.exec_memory, a.exec_pids
    if a.run_dir:
        cfg.run_dir = a.run_dir.resolve()
    if a.state_dir:
        cfg.state_dir = a.state_dir.resolve()
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
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
