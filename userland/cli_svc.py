"""`llmos service` (supervised services) and `llmos block` (shared context blocks)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .cli_io import EXIT_OK, UsageError, client, out, table

SERVICE_COLS = ["name", "pid", "state", "restarts", "last_exit", "backoff", "argv"]
BLOCK_COLS = ["name", "version", "size", "writer", "attached"]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    sv = sub.add_parser("service", help="supervised services: add | ls | stop | restart | rm")
    svs = sv.add_subparsers(dest="service_cmd", required=True)
    a = svs.add_parser("add", parents=[common], help="add NAME -- CMD ARGS...: run a command "
                       "the kernel restarts when it dies")
    a.add_argument("name")
    a.add_argument("--restart", choices=["always", "on-failure"], default="always")
    a.add_argument("--cap", action="append", help="a capability (repeat); default: a child's")
    a.add_argument("--env", action="append", metavar="KEY=VALUE")
    a.add_argument("--backoff", type=float, default=0.1, help="first restart delay, seconds")
    a.add_argument("--backoff-max", type=float, default=30.0, help="longest restart delay")
    a.add_argument("--stable", type=float, default=10.0,
                   help="seconds up after which the delay starts over")
    a.add_argument("cmd", nargs=argparse.REMAINDER)
    a.set_defaults(fn=cmd_service_add)
    svs.add_parser("ls", parents=[common], help="the services").set_defaults(fn=cmd_service_ls)
    for name, hlp, fn in (("stop", "stop a service (not restarted)", cmd_service_stop),
                          ("restart", "start a service afresh", cmd_service_restart),
                          ("rm", "stop a service and forget it", cmd_service_rm)):
        p = svs.add_parser(name, parents=[common], help=hlp)
        p.add_argument("name")
        p.add_argument("--grace", type=float, default=3.0, help="seconds between TERM and KILL")
        p.set_defaults(fn=fn)

    bl = sub.add_parser("block", help="shared context blocks: ls | read | write | rm")
    bls = bl.add_subparsers(dest="block_cmd", required=True)
    bls.add_parser("ls", parents=[common], help="the blocks you may read").set_defaults(
        fn=cmd_block_ls)
    r = bls.add_parser("read", parents=[common], help="print a block's text")
    r.add_argument("name")
    r.set_defaults(fn=cmd_block_read)
    w = bls.add_parser("write", parents=[common], help="write NAME TEXT (or - for stdin); "
                       "creates the block")
    w.add_argument("name")
    w.add_argument("text")
    w.add_argument("--expect", type=int, metavar="VERSION",
                   help="only if the block is still at VERSION (else EAGAIN)")
    w.set_defaults(fn=cmd_block_write)
    d = bls.add_parser("rm", parents=[common], help="delete a block")
    d.add_argument("name")
    d.set_defaults(fn=cmd_block_rm)


def _exit(e: dict | None) -> str:
    if not e:
        return "-"
    if "error" in e:
        return f"{e['error']}: {e['message']}"
    return f"exit {e['exit_code']}" if e["signal"] is None else e["signal_name"]


def _service_table(rows: list[dict]) -> None:
    table([{**r, "pid": r["pid"] or "-", "last_exit": _exit(r["last_exit"]),
            "argv": " ".join(r["argv"])} for r in rows], SERVICE_COLS)


def cmd_service_add(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        raise UsageError("service add needs a command: llmos service add NAME -- CMD ARGS...")
    env = {}
    for it in args.env or []:
        if "=" not in it:
            raise UsageError(f"--env must be KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        env[k] = v
    with client(args) as c:
        row = c.svc.add(args.name, cmd, args.restart, args.cap or None, env or None,
                        os.getcwd(), args.backoff, args.backoff_max, args.stable)
    out(args, row, lambda r: print(f"{r['name']}: pid {r['pid']}"))
    return EXIT_OK


def cmd_service_ls(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.svc.list()
    out(args, rows, _service_table)
    return EXIT_OK


def cmd_service_stop(args: argparse.Namespace) -> int:
    with client(args) as c:
        row = c.svc.stop(args.name, args.grace)
    out(args, row, lambda r: print(f"{r['name']}: {r['state']}"))
    return EXIT_OK


def cmd_service_restart(args: argparse.Namespace) -> int:
    with client(args) as c:
        row = c.svc.restart(args.name, args.grace)
    out(args, row, lambda r: print(f"{r['name']}: pid {r['pid']}"))
    return EXIT_OK


def cmd_service_rm(args: argparse.Namespace) -> int:
    with client(args) as c:
        c.svc.remove(args.name, args.grace)
    out(args, {"removed": args.name}, lambda d: None)
    return EXIT_OK


def cmd_block_ls(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.ctx.block_list()
    out(args, rows, lambda r: table(r, BLOCK_COLS))
    return EXIT_OK


def cmd_block_read(args: argparse.Namespace) -> int:
    with client(args) as c:
        b = c.ctx.block_read(args.name)
    out(args, b, lambda d: print(d["text"]))
    return EXIT_OK


def cmd_block_write(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with client(args) as c:
        c.ctx.block_open(args.name, True)
        st = c.ctx.block_write(args.name, text, args.expect)
    out(args, st, lambda d: print(f"{d['name']}: version {d['version']}"))
    return EXIT_OK


def cmd_block_rm(args: argparse.Namespace) -> int:
    with client(args) as c:
        c.ctx.block_delete(args.name)
    out(args, {"deleted": args.name}, lambda d: None)
    return EXIT_OK
