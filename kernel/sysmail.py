"""Handlers of the `ipc` group's mailbox calls (kernel/mailbox.py is the mailboxes)."""

from __future__ import annotations

from typing import Any

from .dispatch import Call, handler


# send, recv and sendrecv run inline and go on in a task only when they must
# wait (a full mailbox, nothing to take, durable mail): kernel/mailbox.py
@handler("ipc.send")
async def send(call: Call, dest: int | str, message: Any, timeout: float) -> Any:
    return call.sys.mail.send_now(call, dest, message, timeout)


@handler("ipc.recv")
async def recv(call: Call, timeout: float | None, match: dict | None) -> Any:
    return call.sys.mail.recv_now(call, timeout, match)


@handler("ipc.sendrecv")
async def sendrecv(call: Call, dest: int | str, message: Any, timeout: float | None,
                   match: dict | None) -> Any:
    return call.sys.mail.sendrecv_now(call, dest, message, timeout, match)


@handler("ipc.peek", runs="task")  # stored bodies are read in a worker thread
async def peek(call: Call, match: dict | None, limit: int) -> list:
    return await call.sys.mail.peek(call, match, limit)


@handler("ipc.subscribe")
async def subscribe(call: Call, topic: str) -> list:
    return call.sys.mail.subscribe(call.caller, topic)


@handler("ipc.unsubscribe")
async def unsubscribe(call: Call, topic: str) -> list:
    return call.sys.mail.unsubscribe(call.caller, topic)


@handler("ipc.publish")
async def publish(call: Call, topic: str, message: Any) -> int:
    return call.sys.mail.publish(call.caller, topic, message)


@handler("ipc.mailbox")
async def mailbox(call: Call) -> dict:
    return call.sys.mail.describe(call.caller)
