"""`llmos send`, `llmos recv`, `llmos publish`: the shell's mailbox (init's, pid 1).

    llmos send agent:router "my order 1234 is late"   # a string, or any JSON value
    llmos send 12 '{"type": "ping"}'
    llmos recv --timeout 30                            # exits 4 if nothing came
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .cli_io import EXIT_OK, UsageError, client, out


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("send", parents=[common], help="send DEST MESSAGE (DEST: a pid or "
                       "agent:NAME; MESSAGE: JSON, else text)")
    s.add_argument("dest")
    s.add_argument("message")
    s.add_argument("--timeout", type=float, default=0.0,
                   help="seconds to wait for room in a full mailbox (then EAGAIN)")
    s.set_defaults(fn=cmd_send)

    r = sub.add_parser("recv", parents=[common], help="take the next message sent to the shell")
    r.add_argument("--timeout", type=float, help="seconds to wait (default: for ever); "
                   "exit 4 if none came")
    r.add_argument("--from", dest="sender", help="only from this pid or agent:NAME")
    r.add_argument("--type", help="only messages whose 'type' field is this")
    r.add_argument("--topic", help="only messages published to this topic")
    r.set_defaults(fn=cmd_recv)

    p = sub.add_parser("publish", parents=[common], help="publish TOPIC MESSAGE to its "
                       "subscribers")
    p.add_argument("topic")
    p.add_argument("message")
    p.set_defaults(fn=cmd_publish)


def parse_dest(text: str) -> int | str:
    if text.isdigit():
        return int(text)
    if text.startswith("agent:") and len(text) > len("agent:"):
        return text
    raise UsageError(f"DEST is a pid or agent:NAME, not {text!r}")


def parse_message(text: str) -> Any:
    """A JSON value if the text is one, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_send(args: argparse.Namespace) -> int:
    dest = parse_dest(args.dest)
    with client(args) as c:
        res = c.ipc.send(dest, parse_message(args.message), args.timeout)
    out(args, res, lambda r: print(f"sent to {args.dest} (message {r['id']}"
                                   f"{', stored' if r['durable'] else ''})"))
    return EXIT_OK


def cmd_recv(args: argparse.Namespace) -> int:
    match = {k: v for k, v in (("from", args.sender and parse_dest(args.sender)),
                               ("type", args.type), ("topic", args.topic)) if v}
    with client(args) as c:
        env = c.ipc.recv(args.timeout, match or None)
    out(args, env, _show)
    return EXIT_OK


def _show(env: dict) -> None:
    where = f" on {env['topic']}" if env["topic"] else ""
    msg = env["message"]
    text = msg if isinstance(msg, str) else json.dumps(msg, default=str)
    print(f"from {env['sender']}{where}: {text}")


def cmd_publish(args: argparse.Namespace) -> int:
    with client(args) as c:
        n = c.ipc.publish(args.topic, parse_message(args.message))
    out(args, n, lambda n: print(f"{n} subscriber(s) got it"))
    return EXIT_OK
