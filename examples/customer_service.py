"""Customer service by agents that talk over mailboxes.

A router agent reads each customer message, lets the model pick what it is
about (a grammar-constrained choice: the default model is a base model, so
its answer is held to one of three topics, each a team's) and hands the
ticket to that specialist's mailbox. The specialists use tools: billing adds up the amounts
with calc.eval, orders looks the order up in its kv store, tech has the model
write a first answer and stamps it with clock.now. Each answers the customer
directly. Every step goes to the trajectory store (`llmos traj ls`).

    llmos boot --detach
    python examples/customer_service.py --serve        # start the four agents
    llmos send agent:router "I was charged 19.99 twice for my plan"
    llmos recv --timeout 60                            # the specialist's answer
    python examples/customer_service.py --stop

Or all in one go, with a few sample requests: `python examples/customer_service.py`.
Mail to agent:router is durable: a message sent while the router is not
running waits for it.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import llmagentos

TEAMS = ("billing", "orders", "tech")
AGENTS = ("router", *TEAMS)
FAMILY = "customer-service"
# The base model names what a message is about (words it has seen next to such
# text far more often than team names); each topic is a team.
TOPICS = {"money": "billing", "delivery": "orders", "app": "tech"}
ROUTE_GRAMMAR = 'root ::= " "? ("money" | "delivery" | "app")'
ROUTE_PROMPT = """Message: I was charged twice this month
This is about: money
Message: Where is my package? Order 1001 has not arrived
This is about: delivery
Message: The app crashes every time I log in
This is about: app
Message: Please refund the fee on my invoice
This is about: money
Message: My parcel is late
This is about: delivery
Message: The website shows an error after the update
This is about: app
Message: {text}
This is about:"""
ORDERS = {"1001": "shipped on Monday, arriving Thursday", "1002": "being packed",
          "1234": "delayed at the depot, now due Friday"}
SAMPLES = ("I was charged 19.99 twice for my plan, please refund it",
           "Where is my order 1234? It is late",
           "The app shows a blank screen after the update")


def text_of(env: dict) -> str:
    msg = env["message"]
    return msg.get("text", "") if isinstance(msg, dict) else str(msg)


def reply_address(env: dict) -> int | str | None:
    """Where an answer goes: the sender's pid in this boot, else its agent name."""
    if env["from"] is not None:
        return env["from"]
    return env["sender"] if env["sender"].startswith("agent:") else None


# --- the agents -------------------------------------------------------------------
def router(c: llmagentos.Client) -> None:
    while True:
        env = c.ipc.recv()
        if env["type"] == "stop":
            return
        text = text_of(env)
        ep = c.traj.begin(text, FAMILY, "episode", {"agent": "router"})
        out = c.llm.generate(ROUTE_PROMPT.format(text=text[:500]), None,
                             {"grammar": ROUTE_GRAMMAR, "max_tokens": 4, "temperature": 0})
        team = TOPICS[out["text"].strip()]
        c.ipc.send(f"agent:{team}", {"type": "ticket", "text": text,
                                     "customer": reply_address(env), "episode": ep}, 30)
        c.traj.step(ep, text, {"route": team}, 0.0, {"customer": env["sender"]})
        c.traj.end(ep, True, {"route": team})


def billing(c: llmagentos.Client, text: str) -> tuple[str, dict]:
    amounts = re.findall(r"\d+(?:\.\d+)?", text) or ["0"]
    times = 2 if re.search(r"\btwice\b", text, re.I) else 1
    expr = f"({' + '.join(amounts)}) * {times}" if times > 1 else " + ".join(amounts)
    total = c.tool.call("calc.eval", {"expression": expr})
    return (f"A refund of {total['value']:.2f} is on its way to your card.",
            {"tool": "calc.eval", "args": {"expression": expr}, "result": total["value"]})


def orders(c: llmagentos.Client, text: str) -> tuple[str, dict]:
    m = re.search(r"\b(\d{4})\b", text)
    if m is None:
        return "Please tell us your four-digit order number.", {"tool": None}
    try:
        status = c.tool.call("kv.get", {"key": f"order:{m.group(1)}"})["value"]
    except llmagentos.KernelError:
        status = "not in our records"
    return (f"Order {m.group(1)} is {status}.",
            {"tool": "kv.get", "args": {"key": f"order:{m.group(1)}"}, "result": status})


def tech(c: llmagentos.Client, text: str) -> tuple[str, dict]:
    prompt = (f"Customer: {text[:300]}\nSupport engineer (one short sentence of advice): "
              "Please")
    out = c.llm.generate(prompt, None, {"max_tokens": 20, "temperature": 0, "stop": ["\n"]})
    now = c.tool.call("clock.now", {})
    return (f"Please{out['text'].rstrip()} (ticket opened {now['iso'][:19]}Z)",
            {"tool": "clock.now", "result": now["iso"], "draft": out["text"]})


SPECIALISTS = {"billing": billing, "orders": orders, "tech": tech}


def specialist(c: llmagentos.Client, team: str) -> None:
    if team == "orders":  # its records, kept under its name across restarts
        for order, status in ORDERS.items():
            c.tool.call("kv.set", {"key": f"order:{order}", "value": status})
    while True:
        env = c.ipc.recv()
        if env["type"] == "stop":
            return
        ticket = env["message"] if isinstance(env["message"], dict) else {"text": text_of(env)}
        text = str(ticket.get("text", ""))
        ep = c.traj.begin(text, FAMILY, "episode",
                          {"agent": team, "ticket": ticket.get("episode")})
        answer, used = SPECIALISTS[team](c, text)
        c.traj.step(ep, ticket, used, 0.0, None)
        if ticket.get("customer") is not None:
            try:
                c.ipc.send(ticket["customer"], {"type": "reply", "team": team, "text": answer,
                                                "request": text}, 30)
            except llmagentos.KernelError as e:  # the customer left: keep the answer on record
                answer += f" (undelivered: {e.name})"
        c.traj.step(ep, None, {"reply": answer}, 1.0, None)
        c.traj.end(ep, True, None)


# --- running them -------------------------------------------------------------------
def start(c: llmagentos.Client) -> dict[str, int]:
    """Spawn the four agents, each a named process running this file."""
    running = {p["name"]: p["pid"] for p in c.proc.ps() if p["state"] != "ZOMBIE"}
    return {role: running.get(role) or c.proc.spawn([sys.executable, __file__, "--role", role],
                                                    role)
            for role in AGENTS}


def stop(c: llmagentos.Client) -> None:
    for p in c.proc.ps():
        if p["name"] in AGENTS and p["state"] != "ZOMBIE":
            c.ipc.send(p["pid"], {"type": "stop"})
            try:
                c.proc.wait(p["pid"], 10)
            except llmagentos.KernelError:
                c.proc.kill(p["pid"], "SIGKILL")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", action="store_true", help="start the agents and return")
    ap.add_argument("--stop", action="store_true", help="stop the agents")
    ap.add_argument("--role", choices=AGENTS, help=argparse.SUPPRESS)
    ap.add_argument("requests", nargs="*", help="customer messages (default: three samples)")
    args = ap.parse_args(argv)
    c = llmagentos.connect()
    if args.role == "router":
        router(c)
    elif args.role:
        specialist(c, args.role)
    elif args.stop:
        stop(c)
    elif args.serve:
        print("agents:", start(c))
    else:
        pids = start(c)
        print("agents:", pids, flush=True)
        for text in args.requests or SAMPLES:
            c.ipc.send("agent:router", text)  # as `llmos send agent:router TEXT` does
            print(f"customer -> router: {text}", flush=True)
        t0 = time.monotonic()
        for _ in args.requests or SAMPLES:
            env = c.ipc.recv(120, {"type": "reply"})
            r = env["message"]
            print(f"{r['team']} -> customer: {r['text']}   (re: {r['request']!r})", flush=True)
        print(f"all answered in {time.monotonic() - t0:.1f}s")
        stop(c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
