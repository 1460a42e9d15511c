"""`llmos`: the shell's view of the kernel.

Exit codes scripts can rely on:
  0  success
  1  the syscall failed (errno name and message on stderr, or in --json)
  2  usage error
  3  no kernel is running / cannot connect
  4  timed out
`llmos wait PID` exits with the child's exit status (128+N if killed by signal N).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmagentos.syscalls import paths
from llmagentos.syscalls.table import TABLE, markdown

from .boot import boot_detached
from .client import Client, connect
from .errors import KernelError

EXIT_OK, EXIT_ERR, EXIT_USAGE, EXIT_NOKERNEL, EXIT_TIMEOUT = 0, 1, 2, 3, 4


class UsageError(Exception):
    pass


def _console():
    from rich.console import Console
    return Console() if sys.stdout.isatty() else Console(width=200)


def _table(rows: list[dict], cols: list[str], title: str | None = None) -> None:
    from rich.table import Table
    t = Table(title=title, box=None, header_style="bold")
    for c in cols:
        t.add_column(HEADERS.get(c, c.upper()),
                     justify="left" if c in ("name", "state", "call", "doc", "cap") else "right")
    for r in rows:
        t.add_row(*["" if r.get(c) is None else str(r.get(c)) for c in cols])
    _console().print(t)


def _out(args: argparse.Namespace, data: Any, human: Any = None) -> None:
    if args.json:
        print(json.dumps(data, default=str))
    elif human is not None:
        human(data)
    elif data is not None:
        print(data if isinstance(data, str) else json.dumps(data, indent=2, default=str))


def _client(args: argparse.Namespace) -> Client:
    return connect(run_dir=args.run_dir) if args.run_dir else connect()


# --- boot / shutdown ------------------------------------------------------------
def _kernel_options(args: argparse.Namespace) -> list[str]:
    """`llmos boot` options passed on to the kernel program."""
    out = []
    for opt in ("state_dir", "tcp", "policy", "quantum", "grace", "log_level", "config", "model",
                "slots", "n_ctx", "threads", "ray", "devices"):
        val = getattr(args, opt, None)
        if val is not None:
            out += ["--" + opt.replace("_", "-"), str(val)]
    return out


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
    _out(args, info, lambda i: print(
        f"kernel up: pid {i['pid']}, socket {i['socket']}"
        + (f", tcp {i['tcp']}" if i.get("tcp") else "")))
    return EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    with _client(args) as c:
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
    with _client(args) as c:
        st = c.sys.stats()

    def human(s: dict) -> None:
        print(f"LLMAgentOS {s['release']}  pid {s['pid']}  up {s['uptime']:.1f}s  "
              f"policy {s['policy']}")
        print(f"socket {s['socket']}" + (f"  tcp {s['tcp']}" if s.get("tcp") else ""))
        cont = s.get("containment")
        if cont:
            print(f"containment {cont['level']}  caps "
                  f"{', '.join(cont['controllers']) or 'none'}  group {cont['group']}")
        print(f"processes {s['processes']}  " + "  ".join(
            f"{k}={v}" for k, v in sorted(s["states"].items())))
        print("counters " + "  ".join(f"{k}={v}" for k, v in sorted(s["counters"].items())))
        dev = s.get("device")
        if dev:
            print(f"device {s['model']}: {dev['n_slots']} slots x {s['n_ctx']} tokens, "
                  f"policy {dev['policy']} (quantum {dev['quantum']}), "
                  f"{dev['tokens_out']} tokens out, {dev['preemptions']} preemptions")
        else:
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
    _out(args, st, human)
    return EXIT_OK


# --- processes --------------------------------------------------------------------
HEADERS = {"tokens_in": "IN", "tokens_out": "OUT", "cached_tokens": "CACHED",
           "device_time": "DEV_S", "syscalls": "CALLS", "uptime": "UP_S"}
PS_COLS = ["pid", "ppid", "state", "nice", "name", "uptime", "tokens_in", "tokens_out",
           "cached_tokens", "device_time", "syscalls"]


def cmd_ps(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = c.proc.ps()
    _out(args, rows, lambda r: _table(r, PS_COLS))
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
    with _client(args) as c:
        pid = c.proc.spawn(cmd, args.name, _kv(args.env, "--env") or None, os.getcwd(),
                           args.cap or None, limits or None, args.nice)
    _out(args, {"pid": pid}, lambda d: print(d["pid"]))
    return EXIT_OK


def cmd_kill(args: argparse.Namespace) -> int:
    with _client(args) as c:
        for pid in args.pids:
            c.proc.kill(pid, args.signal)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.proc.wait(args.pid, args.timeout)
    _out(args, st, lambda s: print(
        f"pid {s['pid']} exited {s['exit_code']}" if s["signal"] is None
        else f"pid {s['pid']} killed by {s['signal_name']}"))
    return st["exit_code"] if st["signal"] is None else 128 + st["signal"]


def cmd_stat(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.proc.stat(args.pid)

    def human(s: dict) -> None:
        for k, v in s.items():
            if isinstance(v, dict):
                v = "  ".join(f"{a}={b}" for a, b in v.items()) or "-"
            print(f"{k:>14}  {v}")
    _out(args, st, human)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    offset = 0
    with _client(args) as c:
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


def cmd_audit(args: argparse.Namespace) -> int:
    since = time.time() - args.since if args.since is not None else None
    with _client(args) as c:
        rows = c.sys.audit(args.pid, args.call, args.errno, since, args.limit)
    for r in rows:
        r["when"] = time.strftime("%H:%M:%S", time.localtime(r["time"]))
        r["result"] = r["errno"] or "ok"
    _out(args, rows, lambda rs: _table(rs, ["id", "when", "pid", "call", "result", "digest",
                                            "detail"]))
    return EXIT_OK


def _top_frame(c: Client):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    st = c.sys.stats()
    rows = c.proc.ps()
    dev = st.get("device")
    head = Text(f"LLMAgentOS {st['release']}  up {st['uptime']:.0f}s  "
                f"processes {st['processes']}  syscalls {st['counters'].get('syscalls', 0)}\n")
    if dev:
        snap = dev["snapshots"]
        head.append(
            f"device {st['model']}  util {dev['utilization'] * 100:5.1f}%  "
            f"batch {dev['batch_size']:4.1f}  {dev['tokens_per_s']:6.1f} tok/s  "
            f"queue {dev['queue_length']}  slots {dev['running']} running/"
            f"{dev['parked']} parked/{dev['n_slots']}  policy {dev['policy']}\n"
            f"kv snapshots {snap['count']}  ram {snap['ram_bytes'] / 1e6:.1f} MB  "
            f"disk {snap['disk_bytes'] / 1e6:.1f} MB  preemptions {dev['preemptions']}  "
            f"restores {dev['restores']}  prefix copies {dev['prefix_copies']}\n")
    t = Table(box=None, header_style="bold reverse")
    for col in PS_COLS:
        t.add_column(HEADERS.get(col, col.upper()),
                     justify="left" if col in ("name", "state") else "right")
    for r in rows:
        t.add_row(*["" if r.get(col) is None else str(r.get(col)) for col in PS_COLS])
    return Group(head, t), {"stats": st, "ps": rows}


def cmd_top(args: argparse.Namespace) -> int:
    from rich.live import Live
    with _client(args) as c:
        if args.iterations == 1 or args.json:
            frame, data = _top_frame(c)
            _out(args, data, lambda _: _console().print(frame))
            return EXIT_OK
        n = 0
        with Live(_top_frame(c)[0], console=_console(), refresh_per_second=4) as live:
            while args.iterations <= 0 or n < args.iterations:
                time.sleep(args.interval)
                live.update(_top_frame(c)[0])
                n += 1
    return EXIT_OK


def cmd_driver_run(args: argparse.Namespace) -> int:
    from .driver import cli_run
    with _client(args) as c:
        try:
            pid = cli_run(c, args.file, args.cls, args.cap)
        except (OSError, LookupError, ImportError, SyntaxError, TypeError) as e:
            raise UsageError(f"cannot load a driver from {args.file}: {e}") from None
    _out(args, {"pid": pid}, lambda d: print(d["pid"]))
    return EXIT_OK


TRAJ_COLS = ["id", "kind", "family", "owner", "steps", "total_reward", "success", "task"]


def cmd_traj(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.traj_cmd == "ls":
            rows = c.traj.list(args.family, args.kind, args.agent, args.limit)
            for r in rows:
                r["task"] = r["task"][:48]
            _out(args, rows, lambda rs: _table(rs, TRAJ_COLS))
        elif args.traj_cmd == "show":
            ep = c.traj.get(args.episode)

            def human(e: dict) -> None:
                print(f"episode {e['id']} ({e['kind']}, {e['family']}) by {e['owner']}: "
                      f"{e['steps']} steps, reward {e['total_reward']}, success {e['success']}")
                print(f"task: {e['task']}")
                for s in e["trajectory"]:
                    print(f"  t={s['t']:<3} reward={s['reward']:<6} "
                          f"action={json.dumps(s['action'])}  "
                          f"obs={json.dumps(s['observation'])[:80]}")
            _out(args, ep, human)
        elif args.traj_cmd == "export":
            rows = c.traj.list(args.family, args.kind, args.agent, args.limit)
            out = open(args.out, "w") if args.out else sys.stdout
            try:
                for r in rows:
                    out.write(json.dumps(c.traj.get(r["id"]), default=str) + "\n")
            finally:
                if args.out:
                    out.close()
            if args.out:
                print(f"{len(rows)} episodes written to {args.out}", file=sys.stderr)
        elif args.traj_cmd == "plot":
            rows = c.traj.list(args.family, "episode", args.agent, args.limit)
            if not rows:
                raise UsageError("no episodes match")
            plot_learning_curve(rows, args.out, args.window,
                                f"{args.family or 'all families'}: learning curve")
            print(f"{len(rows)} episodes plotted to {args.out}")
    return EXIT_OK


def plot_learning_curve(rows: list[dict], out: str, window: int, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rewards = [r["total_reward"] for r in rows]
    success = [1.0 if r["success"] else 0.0 for r in rows]

    def moving(xs: list[float]) -> list[float]:
        return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1])
                for i in range(len(xs))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(rewards, ".", alpha=0.3, label="reward per episode")
    ax.plot(moving(rewards), label=f"mean reward ({window}-episode window)")
    ax.plot(moving(success), label=f"success rate ({window}-episode window)")
    ax.set_xlabel("episode")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def cmd_syscalls(args: argparse.Namespace) -> int:
    rows = [sc.describe() for sc in TABLE]
    if args.markdown:
        print(markdown(TABLE))
        return EXIT_OK

    def human(_: Any) -> None:
        _table([{"nr": sc.number, "call": sc.signature(), "cap": sc.cap or "-", "doc": sc.doc}
                for sc in TABLE], ["nr", "call", "cap", "doc"])
    _out(args, rows, human)
    return EXIT_OK


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_call(args: argparse.Namespace) -> int:
    with _client(args) as c:
        res = c.call(args.name, *[_parse_arg(a) for a in args.args])
    _out(args, res)
    return EXIT_OK


# --- argument parsing ------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmos", description="LLMAgentOS shell")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--run-dir", help="the kernel's runtime dir")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("boot", parents=[common], help="boot the kernel")
    b.add_argument("--detach", "-d", action="store_true", help="return once it accepts calls")
    b.add_argument("--state-dir")
    b.add_argument("--tcp", metavar="HOST:PORT")
    b.add_argument("--policy", choices=["fifo", "rr", "priority", "fair"])
    b.add_argument("--quantum", type=int)
    b.add_argument("--model", help="model name, GGUF path, or 'none'")
    b.add_argument("--config", help="TOML model registry")
    b.add_argument("--slots", type=int)
    b.add_argument("--n-ctx", type=int)
    b.add_argument("--threads", type=int)
    b.add_argument("--ray", metavar="auto|ADDRESS",
                   help="devices on a Ray cluster (pip install 'llmagentos[ray]')")
    b.add_argument("--devices", type=int, help="--ray: device actors to place")
    b.add_argument("--grace", type=float)
    b.add_argument("--log-level")
    b.add_argument("--timeout", type=float, default=60.0, help="--detach: seconds to wait")
    b.set_defaults(fn=cmd_boot)

    s = sub.add_parser("shutdown", parents=[common], help="shut the kernel down")
    s.add_argument("--grace", type=float, default=3.0)
    s.set_defaults(fn=cmd_shutdown)

    sub.add_parser("status", parents=[common], help="kernel status").set_defaults(fn=cmd_status)
    sub.add_parser("ps", parents=[common], help="process table").set_defaults(fn=cmd_ps)

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
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_spawn)

    k = sub.add_parser("kill", parents=[common], help="kill [-SIG] PID...")
    k.add_argument("--signal", "-s", default="SIGTERM")
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
        t.set_defaults(fn=cmd_traj)
    tsh = trs.add_parser("show", parents=[common], help="one episode, step by step")
    tsh.add_argument("episode", type=int)
    tsh.set_defaults(fn=cmd_traj)

    au = sub.add_parser("audit", parents=[common], help="the audit log, newest last")
    au.add_argument("--pid", type=int)
    au.add_argument("--call", help="a glob, e.g. 'proc.*' or 'tool.call'")
    au.add_argument("--errno", help="an errno name, 'any' (failures) or 'ok'")
    au.add_argument("--since", type=float, metavar="SECONDS", help="only the last N seconds")
    au.add_argument("--limit", type=int, default=50)
    au.set_defaults(fn=cmd_audit)

    sy = sub.add_parser("syscalls", parents=[common], help="the call table")
    sy.add_argument("--markdown", action="store_true", help="as the docs/syscalls.md reference")
    sy.set_defaults(fn=cmd_syscalls)

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


if __name__ == "__main__":
    sys.exit(main())
