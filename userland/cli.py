"""`llmos`: the shell's view of the kernel.

Exit codes scripts can rely on:
  0  success
  1  the syscall failed (errno name and message on stderr, or in --json)
  2  usage error
  3  no kernel is running / cannot connect
  4  timed out
`llmos wait PID` exits with the child's exit status (128+N if killed by signal N).

This module is the command line: its parser and the dispatch to the command
groups (cli_kernel, cli_proc, cli_records, cli_ipc, driver_cli), whose shared output
and exit codes are in cli_io.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from llmagentos.syscalls import bootopts as kconfig

from . import cli_ipc
from .cli_io import EXIT_ERR, EXIT_NOKERNEL, EXIT_TIMEOUT, EXIT_USAGE, UsageError
from .cli_kernel import cmd_boot, cmd_call, cmd_metrics, cmd_shutdown, cmd_status, cmd_syscalls
from .cli_key import add_parser as add_key_parser
from .cli_mcp import add_commands as add_mcp_commands
from .cli_pipe import add_spawn_arguments
from .cli_proc import cmd_kill, cmd_logs, cmd_models, cmd_ps, cmd_spawn, cmd_stat, cmd_top, cmd_wait
from .cli_records import cmd_audit, cmd_traj_export, cmd_traj_ls, cmd_traj_plot, cmd_traj_show
from .cli_remote import add_parser as add_join_parser
from .cli_svc import add_parsers as add_service_parsers
from .driver_cli import cmd_driver_run
from .errors import KernelError

TRAJ_CMDS = {"ls": cmd_traj_ls, "export": cmd_traj_export, "plot": cmd_traj_plot}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmos", description="LLMAgentOS shell")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--run-dir", help="the kernel's runtime dir")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("boot", parents=[common], help="boot the kernel")
    b.add_argument("--detach", "-d", action="store_true", help="return once it accepts calls")
    kconfig.add_arguments(b, skip=("run_dir",))  # the kernel's own options, declared once
    b.add_argument("--timeout", type=float, default=60.0, help="--detach: seconds to wait")
    b.set_defaults(fn=cmd_boot)

    s = sub.add_parser("shutdown", parents=[common], help="shut the kernel down")
    s.add_argument("--grace", type=float, default=3.0)
    s.set_defaults(fn=cmd_shutdown)

    sub.add_parser("status", parents=[common], help="kernel status").set_defaults(fn=cmd_status)
    sub.add_parser("metrics", parents=[common], help="the kernel's metrics, Prometheus text "
                   "format").set_defaults(fn=cmd_metrics)
    add_join_parser(sub, common)
    sub.add_parser("ps", parents=[common], help="process table").set_defaults(fn=cmd_ps)
    sub.add_parser("models", parents=[common], help="the models the kernel knows and has "
                   "loaded, with each device's load").set_defaults(fn=cmd_models)

    tp = sub.add_parser("top", parents=[common], help="live device and process view")
    tp.add_argument("--interval", "-d", type=float, default=1.0)
    tp.add_argument("--iterations", "-n", type=int, default=0, help="frames (0: until ^C)")
    tp.set_defaults(fn=cmd_top)

    sp = sub.add_parser("spawn", parents=[common], help="spawn -- CMD ARGS...")
    sp.add_argument("--name")
    sp.add_argument("--cap", action="append", help="a capability (repeat); default: inherited")
    sp.add_argument("--limit", action="append", metavar="NAME=VALUE")
    sp.add_argument("--env", action="append", metavar="KEY=VALUE")
    sp.add_argument("--nice", type=int, default=0)
    sp.add_argument("--model", help="its default model (a loaded name); default: inherited")
    add_spawn_arguments(sp)
    sp.add_argument("--placement", default="local",
                    help="local (default), ray (any node of the kernel's Ray cluster) or "
                         "node:ID (that node, as `llmos status` lists it)")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_spawn)

    k = sub.add_parser("kill", parents=[common], help="kill [-SIG] PID...")
    k.add_argument("--signal", "-s", default="SIGTERM")
    k.add_argument("--payload", help="JSON (or text) for SIGINT/SIGUSR1/SIGUSR2 to carry")
    k.add_argument("pids", nargs="+", type=int)
    k.set_defaults(fn=cmd_kill)

    w = sub.add_parser("wait", parents=[common], help="wait for a child; exits with its status")
    w.add_argument("pid", type=int)
    w.add_argument("--timeout", type=float)
    w.set_defaults(fn=cmd_wait)

    st = sub.add_parser("stat", parents=[common], help="one process in detail")
    st.add_argument("pid", type=int)
    st.set_defaults(fn=cmd_stat)

    lg = sub.add_parser("logs", parents=[common], help="a process's stdout/stderr")
    lg.add_argument("pid", type=int)
    lg.add_argument("--follow", "-f", action="store_true")
    lg.set_defaults(fn=cmd_logs)

    dr = sub.add_parser("driver", help="userland tool drivers")
    drs = dr.add_subparsers(dest="driver_cmd", required=True)
    drr = drs.add_parser("run", parents=[common], help="run FILE's Driver class as a process")
    drr.add_argument("file")
    drr.add_argument("--class", dest="cls", help="which Driver subclass, if several")
    drr.add_argument("--cap", action="append", help="capabilities (default: inherited)")
    drr.set_defaults(fn=cmd_driver_run)

    tr = sub.add_parser("traj", help="trajectories: ls | show | export | plot")
    trs = tr.add_subparsers(dest="traj_cmd", required=True)
    for name, hlp in (("ls", "episodes, newest last"), ("export", "episodes as JSONL"),
                      ("plot", "a PNG learning curve")):
        t = trs.add_parser(name, parents=[common], help=hlp)
        t.add_argument("--family")
        t.add_argument("--kind", choices=["episode", "demo"])
        t.add_argument("--agent", help="agent name (or pid:N)")
        t.add_argument("--limit", type=int, default=1000 if name != "ls" else 50)
        if name == "export":
            t.add_argument("--out", "-o", help="file (default: stdout)")
        if name == "plot":
            t.add_argument("--out", "-o", default="learning_curve.png")
            t.add_argument("--window", type=int, default=20)
        t.set_defaults(fn=TRAJ_CMDS[name])
    tsh = trs.add_parser("show", parents=[common], help="one episode, step by step")
    tsh.add_argument("episode", type=int)
    tsh.set_defaults(fn=cmd_traj_show)

    au = sub.add_parser("audit", parents=[common], help="the audit log, newest last")
    au.add_argument("--pid", type=int)
    au.add_argument("--call", help="a glob, e.g. 'proc.*' or 'tool.call'")
    au.add_argument("--errno", help="an errno name, 'any' (failures) or 'ok'")
    au.add_argument("--since", type=float, metavar="SECONDS", help="only the last N seconds")
    au.add_argument("--limit", type=int, default=50)
    au.set_defaults(fn=cmd_audit)

    add_service_parsers(sub, common)  # llmos service ..., llmos block ...

    sy = sub.add_parser("syscalls", parents=[common], help="the call table")
    sy.add_argument("--markdown", action="store_true", help="as the docs/syscalls.md reference")
    sy.set_defaults(fn=cmd_syscalls)

    add_mcp_commands(sub, common)
    add_key_parser(sub, common)
    cli_ipc.add_parsers(sub, common)  # send, recv, publish

    c = sub.add_parser("call", parents=[common], help="call NAME ARGS... (JSON or text)")
    c.add_argument("name")
    c.add_argument("args", nargs="*")
    c.set_defaults(fn=cmd_call)
    return ap


def _split_kill_signal(argv: list[str]) -> list[str]:
    """`llmos kill -STOP 12` / `kill -9 12`: turn the dash form into --signal."""
    if not argv or argv[0] != "kill":
        return argv
    out = ["kill"]
    for a in argv[1:]:
        if a.startswith("-") and len(a) > 1 and not a.startswith("--") and a not in ("-s",) \
                and (a[1:].isdigit() or a[1:].isalpha() and a[1:].isupper()):
            out += ["--signal", a[1:]]
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _split_kill_signal(list(sys.argv[1:] if argv is None else argv))
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"llmos: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KernelError as e:
        if args.json:
            print(json.dumps({"error": {"name": e.name, "errno": e.errno,
                                        "message": e.message}}))
        else:
            print(f"llmos: {e}", file=sys.stderr)
        if e.name in ("ENOTCONN", "ECONNRESET"):
            return EXIT_NOKERNEL
        return EXIT_TIMEOUT if e.name == "ETIMEDOUT" else EXIT_ERR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llmos ... | head`: the reader left, as for any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (for the exit flush)
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
