"""`llmos` commands about the kernel itself: boot, shutdown, status, its
Prometheus metrics, the call table (`syscalls`) and a raw syscall (`call`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmagentos.syscalls import bootopts as kconfig
from llmagentos.syscalls import paths
from llmagentos.syscalls.table import TABLE, markdown

from .boot import boot_detached
from .cli_io import EXIT_OK, EXIT_TIMEOUT, client, out, table
from .errors import KernelError


def _kernel_options(args: argparse.Namespace) -> list[str]:
    """`llmos boot` options passed on to the kernel program, as given."""
    given = kconfig.given(args)
    given.pop("run_dir", None)
    for name in kconfig.PATH_OPTIONS:  # the kernel program may run elsewhere
        if name in given:
            given[name] = Path(given[name]).resolve()
    return kconfig.as_flags(given)


def cmd_boot(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else paths.default_run_dir()
    if not args.detach:  # the kernel replaces the shell command, signals and all
        os.execv(sys.executable, [sys.executable, "-m", "llmagentos.kernel", "--run-dir",
                                  str(run_dir), *_kernel_options(args)])
    shown = []

    def progress() -> None:
        if not shown and sys.stderr.isatty():
            print("llmos: booting (loading the model)...", file=sys.stderr)
            shown.append(True)

    info = boot_detached(run_dir, _kernel_options(args), args.timeout, progress)
    out(args, info, lambda i: print(
        f"kernel up: pid {i['pid']}, socket {i['socket']}"
        + (f", tcp {i['tcp']}" if i.get("tcp") else "")
        + (f", tls {i['tls']} (`llmos join` says how to reach it)" if i.get("tls") else "")
        + (f", OpenAI API {i['http']}/v1" if i.get("http") else "")))
    return EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    with client(args) as c:
        pid = c.sys.uname()["pid"]
        try:
            c.sys.shutdown(args.grace)
        except KernelError as e:
            if e.name != "ECONNRESET":  # the kernel may close before its answer lands
                raise
    deadline = time.monotonic() + args.grace + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        print(f"llmos: kernel pid {pid} still running", file=sys.stderr)
        return EXIT_TIMEOUT
    if not args.json:
        print("kernel down")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with client(args) as c:
        st = c.sys.stats()

    def human(s: dict) -> None:
        print(f"LLMAgentOS {s['release']}  pid {s['pid']}  up {s['uptime']:.1f}s  "
              f"policy {s['policy']}")
        print(f"socket {s['socket']}" + (f"  tcp {s['tcp']}" if s.get("tcp") else "")
              + (f"  tls {s['tls']}" if s.get("tls") else "")
              + (f"  http {s['http']}" if s.get("http") else ""))
        cont, iso = s.get("containment"), s.get("isolation")
        if cont:
            print(f"containment {cont['level']}  caps "
                  f"{', '.join(cont['controllers']) or 'none'}  group {cont['group']}")
        if iso:
            print(f"isolation {iso['level']}  landlock abi {iso['landlock_abi']}")
        print(f"processes {s['processes']}  " + "  ".join(
            f"{k}={v}" for k, v in sorted(s["states"].items())))
        print("counters " + "  ".join(f"{k}={v}" for k, v in sorted(s["counters"].items())))
        for name, dev in (s.get("devices") or {}).items():
            print(f"device {name}{' (default)' if name == s['model'] else ''}: "
                  f"{dev['n_slots']} slots, "
                  f"policy {dev['policy']} (quantum {dev['quantum']}), "
                  f"{dev['tokens_out']} tokens out, {dev['preemptions']} preemptions")
            pool = dev.get("kv_pool")
            if pool:
                size = f" ({pool['bytes'] / 2**20:.0f} MiB)" if pool.get("bytes") else ""
                print(f"  kv pool {pool['used']}/{pool['cells']} cells in use{size}")
        if not s.get("devices"):
            print("device none")
        cl = s.get("cluster")
        if cl:  # booted with --ray
            print(f"ray cluster {cl['address']}: nodes {cl['nodes_alive']} alive, "
                  f"{cl['nodes_dead']} dead; {cl['agents']} remote processes")
            for n in cl["nodes"]:
                print(f"  node {n['node']} {n['node_id'][:12]} "
                      f"{'alive' if n['alive'] else 'DEAD'}  cpus {n['cpus']} gpus {n['gpus']}")
            for d in cl["devices"]:
                print(f"  device {d['device']} on {d['node']} (actor pid {d['actor_pid']}) "
                      f"{'alive' if d['alive'] else 'DEAD'}  failures {d['failures']}")
            for lost in cl.get("lost", []):
                print(f"  LOST node {lost['node']} {lost['node_id'][:12]}: devices "
                      f"{lost['devices'] or 'none'}, processes {lost['processes'] or 'none'}")
    out(args, st, human)
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    with client(args) as c:
        text = c.sys.metrics()
    out(args, {"metrics": text}, lambda d: print(d["metrics"], end=""))
    return EXIT_OK


def cmd_syscalls(args: argparse.Namespace) -> int:
    rows = [sc.describe() for sc in TABLE]
    if args.markdown:
        print(markdown(TABLE))
        return EXIT_OK

    def human(_: Any) -> None:
        table([{"nr": sc.number, "call": sc.signature(), "cap": sc.cap or "-", "doc": sc.doc}
               for sc in TABLE], ["nr", "call", "cap", "doc"])
    out(args, rows, human)
    return EXIT_OK


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_call(args: argparse.Namespace) -> int:
    with client(args) as c:
        res = c.call(args.name, *[_parse_arg(a) for a in args.args])
    out(args, res)
    return EXIT_OK


