"""Handlers of the `llm` group: the compute device as syscalls.

The device loop (kernel/scheduler.py) owns the llama.cpp context; handlers
only submit requests to it and account what each process used.
"""

from __future__ import annotations

from typing import Any

import trio

from llmagentos.drivers.sampling import SamplingParams
from llmagentos.syscalls.errno import SyscallError

from .dispatch import Call, handler

MAX_EMBED_TEXTS = 256
MAX_TEXT_BYTES = 64 * 1024  # tokenized on the event loop, about 0.5 us a byte


def check_text_size(*texts: Any) -> None:
    """E2BIG before any tokenizing: a 15 MB prompt held the loop 7.7 s."""
    total = 0
    for t in texts:
        if isinstance(t, str):  # isascii() is O(1); encode only what is short anyway
            total += len(t) if len(t) > MAX_TEXT_BYTES or t.isascii() \
                else len(t.encode("utf-8", "surrogatepass"))
    if total > MAX_TEXT_BYTES:
        raise SyscallError("E2BIG", f"text of {total} bytes; at most {MAX_TEXT_BYTES} are "
                                    "tokenized in one call")


def _device(call: Call) -> Any:
    dev = call.kernel.device
    if dev is None:
        raise SyscallError("ENOSYS", "this kernel was booted without a compute device "
                                     "(--model none)")
    return dev


def check_token_quota(pcb: Any, params: SamplingParams, prompt_tokens: int) -> None:
    """EDQUOT before work starts; max_tokens is cut to what the quota leaves."""
    limit = pcb.limits.get("tokens")
    if limit is None:
        return
    used = pcb.usage.tokens_in + pcb.usage.tokens_out
    left = int(limit) - used - prompt_tokens
    if left <= 0:
        raise SyscallError("EDQUOT", f"token limit {int(limit)} reached (used {used}, "
                                     f"this prompt {prompt_tokens})")
    params.max_tokens = min(params.max_tokens, left)


def account(pcb: Any, usage: dict) -> None:
    u = pcb.usage
    u.tokens_in += usage["prompt_tokens"] - usage["cached_tokens"]
    u.cached_tokens += usage["cached_tokens"]
    u.tokens_out += usage["completion_tokens"]
    u.device_time += usage["device_time"]
    u.queue_wait += usage["queue_wait"]


async def run_generation(call: Call, tokens: list[int], params: SamplingParams,
                         stream: bool) -> dict:
    """Submit one request for the caller and wait for it; streams if asked."""
    k, pcb = call.kernel, call.caller
    check_token_quota(pcb, params, len(tokens))

    async def on_token(piece: str) -> None:
        await call.notify("llm.token", [call.msgid, piece])

    pcb.waiting_calls += 1  # in the run queue or on the device: WAITING, as for I/O
    try:
        res = await k.scheduler.generate(pcb.pid, tokens, params, nice=pcb.nice,
                                         on_token=on_token if stream else None)
    finally:
        pcb.waiting_calls -= 1
    account(pcb, res.usage)
    return {"text": res.text, "finish_reason": res.finish_reason, "usage": res.usage,
            "model": k.device.model_name}


def prompt_tokens(dev: Any, prompt: str | None, messages: list | None,
                  params: SamplingParams) -> list[int]:
    if (prompt is None) == (messages is None):
        raise SyscallError("EINVAL", "give exactly one of prompt or messages")
    if prompt is not None:
        return dev.tokenize(prompt)
    check_messages(messages)
    params.stop = list(params.stop) + [s for s in dev.chat_stop if s not in params.stop]
    return dev.tokenize_chat(messages)


def check_messages(messages: list) -> None:
    if not messages:
        raise SyscallError("EINVAL", "messages must not be empty")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise SyscallError("EINVAL", "each message must be a map with string role and "
                                         "content")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise SyscallError("EINVAL", f"unknown role {m['role']!r}")


@handler("llm.generate", runs="task")
async def generate(call: Call, prompt: str | None, messages: list | None, params: dict | None,
                   stream: bool, context: bool) -> dict:
    check_text_size(prompt, *(m.get("content") for m in messages or () if isinstance(m, dict)))
    dev = _device(call)
    sp = SamplingParams.from_dict(params)
    if context:
        gen_ctx = call.kernel.context_generation
        if gen_ctx is None:
            raise SyscallError("ENOSYS", "context memory is not available in this kernel")
        return await gen_ctx(call, prompt, messages, sp, stream)
    tokens = prompt_tokens(dev, prompt, messages, sp)
    return await run_generation(call, tokens, sp, stream)


@handler("llm.embed", runs="task")
async def embed(call: Call, texts: list | str) -> list:
    dev = _device(call)
    if isinstance(texts, str):
        texts = [texts]
    if not texts or len(texts) > MAX_EMBED_TEXTS or not all(isinstance(t, str) for t in texts):
        raise SyscallError("EINVAL", f"texts must be 1..{MAX_EMBED_TEXTS} strings")
    async with call.kernel.embed_lock:  # one embedding context: one user at a time
        return await trio.to_thread.run_sync(dev.embed, texts, abandon_on_cancel=False)


@handler("llm.tokenize")
async def tokenize(call: Call, text: str, special: bool) -> list:
    check_text_size(text)
    return _device(call).tokenize(text, special=special)


@handler("llm.detokenize")
async def detokenize(call: Call, tokens: list) -> str:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise SyscallError("EINVAL", "tokens must be integers")
    return _device(call).detokenize(tokens)


@handler("llm.models")
async def models(call: Call) -> list:
    k = call.kernel
    loaded = k.device.model_name if k.device is not None else None
    return [{**m, "loaded": m["name"] == loaded} for m in k.models.describe()]
