"""`llmos key`: the HTTP gateway's API keys (create, ls, revoke); each key is a process."""

from __future__ import annotations

import argparse
import sys

from .cli_io import EXIT_OK, UsageError, client, out, table

KEY_COLS = ["name", "pid", "key", "nice", "model", "tokens_in", "tokens_out", "limits"]


def _limits(items: list[str] | None) -> dict:
    limits = {}
    for it in items or []:
        name, eq, value = it.partition("=")
        if not eq:
            raise UsageError(f"--limit must be NAME=VALUE, got {it!r}")
        try:
            limits[name] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise UsageError(f"--limit {name}: {value!r} is not a number") from None
    return limits


def cmd_key_create(args: argparse.Namespace) -> int:
    with client(args) as c:
        r = c.key.create(args.name, args.cap or None, args.nice, _limits(args.limit) or None,
                         args.model)

    def human(d: dict) -> None:
        print(d["key"])
        print(f"(key {d['name']!r}, pid {d['pid']}: shown this once; the kernel keeps only "
              "its hash)", file=sys.stderr)
    out(args, r, human)
    return EXIT_OK


def cmd_key_ls(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.key.list()
    out(args, rows, lambda r: table([{**k, "limits": " ".join(
        f"{a}={b}" for a, b in k["limits"].items()) or None} for k in r], KEY_COLS))
    return EXIT_OK


def cmd_key_revoke(args: argparse.Namespace) -> int:
    with client(args) as c:
        for name in args.names:
            r = c.key.revoke(int(name) if name.isdigit() else name)
            out(args, r, lambda d: print(f"revoked {d['name']!r}"
                                         + (f" (pid {d['pid']})" if d["pid"] else "")))
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    k = sub.add_parser("key", help="API keys of the HTTP gateway: create | ls | revoke")
    ks = k.add_subparsers(dest="key_cmd", required=True)
    c = ks.add_parser("create", parents=[common], help="make a key (printed once)")
    c.add_argument("name", help="the key's name: also its process's and agent's name")
    c.add_argument("--cap", action="append", help="a capability (repeat); default: inherited")
    c.add_argument("--nice", type=int, default=0)
    c.add_argument("--limit", action="append", metavar="NAME=VALUE",
                   help="a process limit, e.g. tokens=100000 (repeat)")
    c.add_argument("--model", help="its default model (a loaded name)")
    c.set_defaults(fn=cmd_key_create)
    ks.add_parser("ls", parents=[common], help="the keys").set_defaults(fn=cmd_key_ls)
    r = ks.add_parser("revoke", parents=[common], help="revoke keys by name (or pid)")
    r.add_argument("names", nargs="+")
    r.set_defaults(fn=cmd_key_revoke)
