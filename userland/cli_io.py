"""What every `llmos` command shares: its connection to the kernel, its
output (JSON with --json, else text and tables), and how it ends (exit codes,
`UsageError`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .client import Client, connect

EXIT_OK, EXIT_ERR, EXIT_USAGE, EXIT_NOKERNEL, EXIT_TIMEOUT = 0, 1, 2, 3, 4


class UsageError(Exception):
    """A command line that cannot be carried out: `llmos: message`, exit 2."""


def client(args: argparse.Namespace) -> Client:
    return connect(run_dir=args.run_dir) if args.run_dir else connect()


def out(args: argparse.Namespace, data: Any, human: Any = None) -> None:
    """`data` as one JSON line with --json, else through `human(data)`, else as it is."""
    if args.json:
        print(json.dumps(data, default=str))
    elif human is not None:
        human(data)
    elif data is not None:
        print(data if isinstance(data, str) else json.dumps(data, indent=2, default=str))


def console():
    from rich.console import Console
    return Console() if sys.stdout.isatty() else Console(width=200)


# Column titles where the key is not the title.
HEADERS = {"tokens_in": "IN", "tokens_out": "OUT", "cached_tokens": "CACHED",
           "device_time": "DEV_S", "syscalls": "CALLS", "uptime": "UP_S"}
_TEXT_COLS = ("name", "state", "call", "doc", "cap")  # left-aligned; numbers go right


def rich_table(rows: list[dict], cols: list[str], title: str | None = None,
               header_style: str = "bold"):
    from rich.table import Table
    t = Table(title=title, box=None, header_style=header_style)
    for c in cols:
        t.add_column(HEADERS.get(c, c.upper()), justify="left" if c in _TEXT_COLS else "right")
    for row in _cells(rows, cols):
        t.add_row(*row)
    return t


def _cells(rows: list[dict], cols: list[str]) -> list[list[str]]:
    return [["" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]


def table(rows: list[dict], cols: list[str], title: str | None = None) -> None:
    if sys.stdout.isatty():
        console().print(rich_table(rows, cols, title))
        return
    # Into a pipe or a file: plain columns, as ps(1) writes them (rich takes a
    # tenth of a second to import and more to lay out a long table).
    cells = [[HEADERS.get(c, c.upper()) for c in cols], *_cells(rows, cols)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    if title:
        print(title)
    for row in cells:
        print("  ".join(v.ljust(w) if c in _TEXT_COLS else v.rjust(w)
                        for v, w, c in zip(row, widths, cols)).rstrip())
