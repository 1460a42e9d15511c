"""`llmos` process commands: ps, spawn, kill, wait, stat, logs and top."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .cli_io import EXIT_OK, UsageError, client, console, out, rich_table, table
from .cli_pipe import spawn_piped
from .client import Client

PS_COLS = ["pid", "ppid", "state", "nice", "name", "uptime", "tokens_in", "tokens_out",
           "cached_tokens", "device_time", "syscalls"]


def cmd_ps(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.proc.ps()
    out(args, rows, lambda r: table(r, PS_COLS))
    return EXIT_OK


MODEL_COLS = ["name", "kind", "loaded", "default", "n_ctx", "aliases", "running",
              "queue_length", "tokens_per_s"]


def model_rows(rows: list[dict]) -> list[dict]:
    """llm.models rows flattened for a table (the device summary's columns)."""
    return [{**r, **(r.get("device") or {}), "aliases": ", ".join(r["aliases"]) or None,
             "tokens_per_s": (round(r["device"]["tokens_per_s"], 1) if r.get("device")
                              else None)} for r in rows]


def cmd_models(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.llm.models()
    out(args, rows, lambda r: table(model_rows(r), MODEL_COLS))
    return EXIT_OK


def _kv(items: list[str], what: str) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise UsageError(f"{what} must be KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def cmd_spawn(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        raise UsageError("spawn needs a command: llmos spawn -- CMD ARGS...")
    limits = {k: float(v) for k, v in _kv(args.limit, "--limit").items()}
    kw = {"name": args.name, "env": _kv(args.env, "--env") or None, "cwd": os.getcwd(),
          "caps": args.cap or None, "limits": limits or None, "nice": args.nice,
          "model": args.model, "placement": args.placement}
    if args.pipe_stdin or args.pipe_stdout:
        return spawn_piped(args, cmd, kw)
    with client(args) as c:
        pid = c.proc.spawn(cmd, **kw)
    out(args, {"pid": pid}, lambda d: print(d["pid"]))
    return EXIT_OK


def cmd_kill(args: argparse.Namespace) -> int:
    payload = None
    if args.payload is not None:
        try:
            payload = json.loads(args.payload)
        except ValueError:
            payload = args.payload  # not JSON: the text itself
    with client(args) as c:
        for pid in args.pids:
            c.proc.kill(pid, args.signal, payload)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with client(args) as c:
        st = c.proc.wait(args.pid, args.timeout)
    out(args, st, lambda s: print(
        f"pid {s['pid']} exited {s['exit_code']}" if s["signal"] is None
        else f"pid {s['pid']} killed by {s['signal_name']}"))
    return st["exit_code"] if st["signal"] is None else 128 + st["signal"]


def cmd_stat(args: argparse.Namespace) -> int:
    with client(args) as c:
        st = c.proc.stat(args.pid)

    def human(s: dict) -> None:
        for k, v in s.items():
            if isinstance(v, dict):
                v = "  ".join(f"{a}={b}" for a, b in v.items()) or "-"
            print(f"{k:>14}  {v}")
    out(args, st, human)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    offset = 0
    with client(args) as c:
        while True:
            r = c.proc.logs(args.pid, offset)
            sys.stdout.buffer.write(r["data"])
            sys.stdout.flush()
            offset = r["offset"]
            if r["data"]:
                continue  # drain before deciding to stop
            if not args.follow or r["state"] in ("ZOMBIE", "REAPED"):
                return EXIT_OK
            time.sleep(0.2)


def _top_frame(c: Client):
    from rich.console import Group
    from rich.text import Text
    st = c.sys.stats()
    rows = c.proc.ps()
    head = Text(f"LLMAgentOS {st['release']}  up {st['uptime']:.0f}s  "
                f"processes {st['processes']}  syscalls {st['counters'].get('syscalls', 0)}\n")
    for name, dev in (st.get("devices") or {}).items():  # one line per loaded model
        head.append(
            f"device {name}{' (default)' if name == st['model'] else ''}  "
            f"util {dev['utilization'] * 100:5.1f}%  "
            f"batch {dev['batch_size']:4.1f}  {dev['tokens_per_s']:6.1f} tok/s  "
            f"queue {dev['queue_length']}  slots {dev['running']} running/"
            f"{dev['parked']} parked/{dev['n_slots']}  policy {dev['policy']}"
            + (f"  kv pool {dev['kv_pool']['used']}/{dev['kv_pool']['cells']} cells"
               if dev.get("kv_pool") else "") + "\n")
    if dev := st.get("device"):
        snap = dev["snapshots"]
        head.append(
            f"kv snapshots {snap['count']}  ram {snap['ram_bytes'] / 1e6:.1f} MB  "
            f"disk {snap['disk_bytes'] / 1e6:.1f} MB  preemptions {dev['preemptions']}  "
            f"restores {dev['restores']}  prefix copies {dev['prefix_copies']}\n")
    return (Group(head, rich_table(rows, PS_COLS, header_style="bold reverse")),
            {"stats": st, "ps": rows})


def cmd_top(args: argparse.Namespace) -> int:
    from rich.live import Live
    with client(args) as c:
        if args.iterations == 1 or args.json:
            frame, data = _top_frame(c)
            out(args, data, lambda _: console().print(frame))
            return EXIT_OK
        n = 0
        with Live(_top_frame(c)[0], console=console(), refresh_per_second=4) as live:
            while args.iterations <= 0 or n < args.iterations:
                time.sleep(args.interval)
                live.update(_top_frame(c)[0])
                n += 1
    return EXIT_OK


