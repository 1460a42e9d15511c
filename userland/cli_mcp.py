"""`llmos mcp serve`: a kernel process's tools and files as an MCP server (stdio)."""

from __future__ import annotations

import argparse
import os

from .cli_io import UsageError


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    mp = sub.add_parser("mcp", help="the MCP server face")
    mps = mp.add_subparsers(dest="mcp_cmd", required=True)
    s = mps.add_parser("serve", parents=[common],
                       help="serve a process's tools and sandbox files to an MCP host (stdio)")
    s.add_argument("--key", help="the process's key (a token, as proc.attach returns it); "
                                 "default: $LLMAGENTOS_KEY, which keeps it off the command line")
    s.add_argument("--timeout", type=float, default=30.0,
                   help="seconds each tool call may take (the kernel allows up to 600)")
    s.set_defaults(fn=cmd_mcp_serve)


def cmd_mcp_serve(args: argparse.Namespace) -> int:
    from .mcp_server import KEY_ENV, run_stdio  # the MCP SDK loads only for this command

    key = args.key or os.environ.get(KEY_ENV)
    if not key:
        raise UsageError(f"mcp serve needs a key: --key KEY or ${KEY_ENV}")
    if not 0 < args.timeout <= 600:
        raise UsageError("--timeout must be in (0, 600]")
    return run_stdio(key, run_dir=args.run_dir, timeout=args.timeout)
