"""`llmos` commands over what the kernel records: trajectories (`traj`) and
the audit log (`audit`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cli_io import EXIT_OK, UsageError, client, out, table

AUDIT_COLS = ["id", "when", "pid", "call", "result", "digest", "detail"]


def cmd_audit(args: argparse.Namespace) -> int:
    since = time.time() - args.since if args.since is not None else None
    with client(args) as c:
        rows = c.sys.audit(args.pid, args.call, args.errno, since, args.limit)
    for r in rows:
        r["when"] = time.strftime("%H:%M:%S", time.localtime(r["time"]))
        r["result"] = r["errno"] or "ok"
    out(args, rows, lambda rs: table(rs, AUDIT_COLS))
    return EXIT_OK


TRAJ_COLS = ["id", "kind", "family", "owner", "steps", "total_reward", "success", "task"]


def cmd_traj_ls(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.traj.list(args.family, args.kind, args.agent, args.limit)
    for r in rows:
        r["task"] = r["task"][:48]
    out(args, rows, lambda rs: table(rs, TRAJ_COLS))
    return EXIT_OK


def cmd_traj_show(args: argparse.Namespace) -> int:
    with client(args) as c:
        ep = c.traj.get(args.episode)

    def human(e: dict) -> None:
        print(f"episode {e['id']} ({e['kind']}, {e['family']}) by {e['owner']}: "
              f"{e['steps']} steps, reward {e['total_reward']}, success {e['success']}")
        print(f"task: {e['task']}")
        for s in e["trajectory"]:
            print(f"  t={s['t']:<3} reward={s['reward']:<6} "
                  f"action={json.dumps(s['action'])}  "
                  f"obs={json.dumps(s['observation'])[:80]}")
    out(args, ep, human)
    return EXIT_OK


def cmd_traj_export(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.traj.list(args.family, args.kind, args.agent, args.limit)
        sink = open(args.out, "w") if args.out else sys.stdout
        try:
            for r in rows:
                sink.write(json.dumps(c.traj.get(r["id"]), default=str) + "\n")
        finally:
            if args.out:
                sink.close()
    if args.out:
        print(f"{len(rows)} episodes written to {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_traj_plot(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.traj.list(args.family, "episode", args.agent, args.limit)
    if not rows:
        raise UsageError("no episodes match")
    plot_learning_curve(rows, args.out, args.window,
                        f"{args.family or 'all families'}: learning curve")
    print(f"{len(rows)} episodes plotted to {args.out}")
    return EXIT_OK


def plot_learning_curve(rows: list[dict], path: str, window: int, title: str) -> None:
    """Reward and success rate per episode, with moving means, as a PNG at `path`."""
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
    fig.savefig(path)
    plt.close(fig)


