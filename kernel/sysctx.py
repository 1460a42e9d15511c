"""Handlers of the `ctx` and `mem` groups: the memory manager as syscalls.

Identity (kernel/names.py): a process spawned with a name is the *named
agent* of that name and owns what it stores as ``agent:<name>`` (so it
outlives the process and a kernel restart); an unnamed process owns
``pid:<pid>``, deleted when it exits and, after a crash, at the next boot.
Init (the shell user) may act on any context. A process's context is
created the first time it is used (lazily, so a process that never talks
pays nothing) with the budget: the model's context minus the generation
reserve, or its `ctx_tokens` limit.
"""

from __future__ import annotations

from typing import Any

from llmagentos.drivers.sampling import SamplingParams
from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.table import INT64_MAX

from . import perms
from .dispatch import Call, handler
from .names import identity
from .proc import INIT_PID, PCB
from .sysllm import check_messages, submit

GEN_RESERVE = 256  # tokens kept free for the reply when a budget is derived
SUMMARY_INPUT_TOKENS = 768  # most of the old text a summary is written from


def owner_arg(pcb: PCB) -> str | None:
    """What the store checks ownership against: None (anything) for init."""
    return None if pcb.pid == INIT_PID else identity(pcb)


def default_budget(call: Call, pcb: PCB) -> int:
    table = call.sys.table
    entry = table.loaded.get(pcb.model or table.default or "")  # the process's own model
    budget = ((entry.n_ctx if entry is not None else None) or 2048) - GEN_RESERVE
    if "ctx_tokens" in pcb.limits:
        budget = min(budget, int(pcb.limits["ctx_tokens"]))
    return max(budget, 1)


def current(call: Call, ctx: int | None = None) -> int:
    """The context a call acts on: the one named, else the caller's own."""
    if ctx is not None:
        return ctx
    pcb = call.caller
    if pcb.ctx_id is None:
        mem = call.sys.memory
        if pcb.agent:  # a named agent continues its context across processes and boots
            try:
                pcb.ctx_id = mem.open(pcb.agent, identity(pcb))
                return pcb.ctx_id
            except SyscallError as e:
                if e.name != "ENOENT":
                    raise
            pcb.ctx_id = mem.create(identity(pcb), pcb.agent, default_budget(call, pcb))
        else:
            pcb.ctx_id = mem.create(identity(pcb), None, default_budget(call, pcb))
    return pcb.ctx_id


@handler("ctx.append")
async def append(call: Call, role: str, content: str, pinned: bool, ctx: int | None) -> dict:
    return call.sys.memory.append(current(call, ctx), role, content, pinned,
                                  owner=owner_arg(call.caller))


@handler("ctx.read")
async def read(call: Call, start: int, end: int | None, archived: bool, ctx: int | None) -> list:
    return call.sys.memory.read(current(call, ctx), start, end, archived,
                                owner=owner_arg(call.caller))


@handler("ctx.window")
async def window(call: Call, reserve: int, ctx: int | None) -> list:
    return generation_window(call, current(call, ctx), reserve)


@handler("ctx.stats")
async def stats(call: Call, ctx: int | None) -> dict:
    return call.sys.memory.stats(current(call, ctx), owner=owner_arg(call.caller))


@handler("ctx.pin", runs="task")
async def pin(call: Call, seq: int, pinned: bool, ctx: int | None) -> dict:
    mem = call.sys.memory
    return await call.in_thread(lambda: mem.pin(
        current(call, ctx), seq, pinned, owner=owner_arg(call.caller)))


@handler("ctx.fork", runs="task")
async def fork(call: Call, pid: int | None, name: str | None, ctx: int | None) -> int:
    sv, caller = call.sys, call.caller
    src = current(call, ctx)
    if pid is None:
        new_owner = identity(caller)
        target = None
    else:
        target = sv.procs.get(pid)
        if target.ppid != caller.pid:
            raise SyscallError("EPERM", f"pid {pid} is not a child of pid {caller.pid}")
        new_owner = identity(target)
    new = await call.in_thread(lambda: sv.memory.fork(
        src, new_owner, name=name, owner=owner_arg(caller)))
    if target is not None:
        old = target.ctx_id
        target.ctx_id = new  # the child continues from the parent's conversation
        if old is not None and not target.agent:
            sv.memory.delete(old)
    return new


@handler("ctx.search", runs="task")
async def search(call: Call, query: str, k: int, ctx: int | None) -> list:
    if not 1 <= k <= 100:
        raise SyscallError("EINVAL", "k must be in 1..100")
    mem, cid = call.sys.memory, current(call, ctx)
    return await call.in_thread(lambda: mem.search(
        cid, query, k, owner=owner_arg(call.caller)))


@handler("ctx.compact", runs="task")
async def compact(call: Call, strategy: str, upto: int | None, ctx: int | None) -> dict:
    if strategy != "summarize":
        raise SyscallError("EINVAL", f"unknown strategy {strategy!r}; known: summarize")
    sv, owner = call.sys, owner_arg(call.caller)
    entry = sv.table.for_process(call.caller)  # ENOSYS without a model
    cid = current(call, ctx)
    msgs = [m for m in sv.memory.read(cid, 0, None, True, owner=owner) if m["kind"] != "note"]
    if upto is None:  # default: what has been paged out, else the older half of the window
        archived = [m["seq"] for m in msgs if m["state"] == "archived"]
        upto = max(archived) if archived else (msgs[len(msgs) // 2]["seq"] if msgs else 0)
    old = [m for m in msgs if m["seq"] <= upto and m["kind"] == "message"]
    if not old:
        raise SyscallError("EINVAL", "nothing to summarize")
    text, budget = [], SUMMARY_INPUT_TOKENS
    for m in reversed(old):  # the newest old messages matter most
        budget -= m["tokens"] + 2
        if budget < 0:
            break
        text.append(f"{m['role']}: {m['content']}")
    prompt = ("Summarize the following conversation in two or three sentences, keeping "
              "names, numbers and decisions.\n\n" + "\n".join(reversed(text)) + "\n\nSummary:")
    params = SamplingParams(max_tokens=96, temperature=0.0)
    res = await submit(call, entry, prompt, None, params, False)
    # a base model may ramble on: keep its first paragraph
    first = res["text"].strip().split("\n\n")[0].strip() or "(no summary)"
    summary = "[summary of earlier conversation] " + first
    out = await call.in_thread(lambda: sv.memory.compact(cid, summary, upto, owner=owner))
    return {**out, "summary": summary, "usage": res["usage"]}


@handler("ctx.delete", runs="task")
async def delete(call: Call, ctx: int | None) -> None:
    pcb = call.caller
    cid = current(call, ctx)
    mem = call.sys.memory
    await call.in_thread(lambda: mem.delete(cid, owner=owner_arg(pcb)))
    if pcb.ctx_id == cid:
        pcb.ctx_id = None


@handler("ctx.open")
async def open_(call: Call, name: str, create: bool) -> int:
    pcb, mem = call.caller, call.sys.memory
    owner = identity(pcb)
    try:
        cid = mem.open(name, owner) if pcb.pid != INIT_PID else _open_any(mem, name)
    except SyscallError as e:
        if e.name != "ENOENT" or not create:
            raise
        cid = mem.create(owner, name, default_budget(call, pcb))
    pcb.ctx_id = cid
    return cid


def _open_any(mem: Any, name: str) -> int:
    for c in mem.list_contexts():
        if c["name"] == name:
            return c["id"]
    raise SyscallError("ENOENT", f"no context named {name!r}")


@handler("ctx.list")
async def list_(call: Call) -> list:
    return call.sys.memory.list_contexts(owner_arg(call.caller))


# --- generation from context (llm.generate(context=true)) ----------------------------
def block_messages(call: Call, cid: int) -> list[dict]:
    """The shared blocks attached to context ``cid``, each its current version
    whole (one snapshot of all of them), as system messages of kind 'block'.
    A block the caller may no longer read is EACCES, not left out silently."""
    pcb, sv = call.caller, call.sys
    out = []
    for b in sv.memory.blocks.attached(cid, owner=owner_arg(pcb)):
        if not perms.may_read_block(pcb, b["name"]):
            raise SyscallError("EACCES", f"block {b['name']!r} is attached to context {cid} "
                                         f"but reading it needs capability "
                                         f"'ctx.block.read:{b['name']}' (or detach it)")
        text = f"[shared block {b['name']}, version {b['version']}]\n{b['text']}"
        out.append({"seq": None, "role": "system", "kind": "block", "content": text,
                    "tokens": sv.count_tokens(text), "pinned": True, "state": "live",
                    "created": b["updated"], "block": b["name"], "version": b["version"]})
    return out


def generation_window(call: Call, cid: int, reserve: int) -> list[dict]:
    """What a generation from ``cid`` shows the model: the window, with the
    attached blocks after its leading system messages (where a chat template
    makes them part of the system prompt); room is kept for the blocks too."""
    blocks = block_messages(call, cid)
    room = min(reserve + sum(b["tokens"] for b in blocks), INT64_MAX)
    win = call.sys.memory.window(cid, room, owner=owner_arg(call.caller))
    at = next((i for i, m in enumerate(win) if m["role"] != "system"), len(win))
    return win[:at] + blocks + win[at:]


def chat_messages(window: list[dict]) -> list[dict]:
    """The window as messages a chat template accepts: leading system text
    first, later notes and tool results as user turns, same roles merged
    (templates such as Gemma's require user/assistant alternation)."""
    system: list[str] = []
    out: list[dict] = []
    for m in window:
        role, text = m["role"], m["content"]
        if role == "system" and not out:
            system.append(text)
            continue
        if role in ("system", "tool"):
            role, text = "user", f"[{m['role']}] {text}"
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    if out and out[0]["role"] == "assistant":
        out.insert(0, {"role": "user", "content": "(continue)"})
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


async def context_generation(call: Call, prompt: str | None, messages: list | None,
                             params: SamplingParams, stream: bool, entry: Any) -> dict:
    """Append the new turn, build the prompt from the window (and the attached
    shared blocks) through the chat template of the model ``entry`` (any loaded
    one), generate, append the reply.
    The process's device sequence holds the same tokens as its window, so only
    the new turn is prefilled."""
    sv, pcb = call.sys, call.caller
    mem, owner = sv.memory, owner_arg(pcb)
    cid = current(call)
    new = []
    if prompt is not None:
        new.append({"role": "user", "content": prompt})
    if messages is not None:
        check_messages(messages)
        new += messages
    for m in new:
        mem.append(cid, m["role"], m["content"], owner=owner)
    msgs = chat_messages(generation_window(call, cid, params.max_tokens))
    if not msgs or msgs[-1]["role"] == "assistant":
        raise SyscallError("EINVAL", "the context has no new user turn to answer")
    res = await submit(call, entry, None, msgs, params, stream)
    res["ctx"] = mem.append(cid, "assistant", res["text"].strip(), owner=owner)
    res["ctx"]["id"] = cid
    return res


# --- long-term memory ---------------------------------------------------------------
def resolve_namespace(call: Call, ns: str | None) -> str:
    return perms.mem_namespace(call.caller, identity(call.caller), ns)


@handler("mem.put")
async def mem_put(call: Call, key: str, value: Any, tags: list | None,
                  namespace: str | None) -> bool:
    ns = resolve_namespace(call, namespace)
    return call.sys.memory.mem_put(ns, key, value, tags)


@handler("mem.get")
async def mem_get(call: Call, key: str, namespace: str | None) -> dict:
    return call.sys.memory.mem_get(resolve_namespace(call, namespace), key)


@handler("mem.search", runs="task")
async def mem_search(call: Call, query: str, k: int, tags: list | None,
                     namespace: str | None) -> list:
    ns, mem = resolve_namespace(call, namespace), call.sys.memory
    if not 1 <= k <= 100:
        raise SyscallError("EINVAL", "k must be in 1..100")
    return await call.in_thread(lambda: mem.mem_search(ns, query, k, tags))


@handler("mem.delete")
async def mem_delete(call: Call, key: str, namespace: str | None) -> None:
    call.sys.memory.mem_delete(resolve_namespace(call, namespace), key)


@handler("mem.list")
async def mem_list(call: Call, namespace: str | None, tags: list | None) -> list:
    return call.sys.memory.mem_list(resolve_namespace(call, namespace), tags)

