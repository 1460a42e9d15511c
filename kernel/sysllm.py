"""Handlers of the `llm` group: the compute devices as syscalls.

Each loaded model is a device and its run queue (kernel/modeltable.py); a
call uses the model it names (params ``model``), else the caller's own
(proc.spawn/attach ``model``, inherited), else the kernel's default. The
device loops (kernel/scheduler/) own the llama.cpp contexts; handlers only
submit requests and account what each process used. A local model's prompt
is tokenized here with its device; a model served elsewhere (kind "openai")
takes the text itself.

Sizes are checked before work, on the event loop, where the check costs
O(1) or one encode: a text longer than ``Device.text_bytes_for(n)`` bytes
cannot be fewer than ``n`` tokens. Tokenizing and chat rendering then run in
a worker thread (about 1 s per MB here).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from llmagentos.drivers.sampling import SamplingParams
from llmagentos.syscalls.errno import SyscallError

from .dispatch import Call, handler
from .modeltable import Loaded

if TYPE_CHECKING:
    from .services import Services

MAX_EMBED_TEXTS = 256      # texts per llm.embed
MAX_EMBED_TOKENS = 8192    # tokens per llm.embed, after each text is cut to EMBED_CTX
MAX_TOKENIZE_BYTES = 1 << 20  # text per llm.tokenize
STREAM_INTERVAL = 0.005    # seconds: pieces closer together than this share a write


def model_of(call: Call, name: Any = None) -> Loaded:
    """The loaded model a call uses: ``name``, else the caller's own, else the default."""
    if name is not None and (not isinstance(name, str) or not name):
        raise SyscallError("EINVAL", "model must be a non-empty string")
    return call.sys.table.for_process(call.caller, name)


def _device(call: Call, name: Any = None) -> Any:
    entry = model_of(call, name)
    if entry.device is None:
        raise SyscallError("EINVAL", f"model {entry.name!r} is served elsewhere (kind "
                                     f"{entry.kind!r}): it has no vocabulary here")
    return entry.device


def check_text_size(text: str, limit: int, what: str) -> None:
    """E2BIG when ``text`` is over ``limit`` UTF-8 bytes (O(1) for most long texts)."""
    n = len(text)
    if n <= limit:  # characters <= bytes <= 4 * characters
        n = len(text.encode("utf-8", "surrogatepass")) if 4 * n > limit else 0
    if n > limit:
        raise SyscallError("E2BIG", f"{what} of {n} bytes or more is over the bound of "
                                    f"{limit} bytes")


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


class TokenStream:
    """The llm.token notifications of one streamed generation. Pieces that come
    less than STREAM_INTERVAL after the last write are held and go out together
    with the next one: on a device faster than that (a GPU decodes a token in a
    millisecond or two), a write carries several tokens' text instead of costing
    a syscall and a client wake-up per token. At CPU speed every token is one
    write, as before. The text is the same either way, only cut differently."""

    def __init__(self, call: Call) -> None:
        self.notify = call.conn.notify_nowait  # per token: no layer it can do without
        self.msgid = call.msgid
        self.held: list[str] = []
        self.sent = 0.0

    def put(self, piece: str) -> None:  # called by the device loop: must not wait
        self.held.append(piece)
        now = time.monotonic()
        if now - self.sent >= STREAM_INTERVAL:
            self.sent = now
            self.flush()

    def flush(self) -> None:
        held = self.held
        if held:
            text = held[0] if len(held) == 1 else "".join(held)
            held.clear()
            self.notify("llm.token", [self.msgid, text])


async def submit(call: Call, entry: Loaded, prompt: str | None, messages: list | None,
                 params: SamplingParams, stream: bool) -> dict:
    """One generation on ``entry``'s run queue for the caller: a local model's prompt
    is tokenized with its own device (its chat template); a remote one takes the text."""
    if entry.local:
        tokens = await prompt_tokens(entry.device, prompt, messages, params)
        return await run_generation(call, tokens, params, stream, entry)
    if (prompt is None) == (messages is None):
        raise SyscallError("EINVAL", "give exactly one of prompt or messages")
    if messages is not None:
        check_messages(messages)
    return await _wait_queue(call, entry, 0, stream, lambda on_token: entry.queue.generate(
        call.caller.pid, prompt, messages, params, nice=call.caller.nice, on_token=on_token),
        params)


async def run_generation(call: Call, tokens: list[int], params: SamplingParams,
                         stream: bool, entry: Loaded) -> dict:
    """Submit one request of tokens for the caller and wait for it; streams if asked."""
    return await _wait_queue(
        call, entry, len(tokens), stream, lambda on_token: entry.queue.generate(
            call.caller.pid, tokens, params, nice=call.caller.nice, on_token=on_token), params)


async def _wait_queue(call: Call, entry: Loaded, n_prompt: int, stream: bool, start: Any,
                      params: SamplingParams) -> dict:
    pcb = call.caller
    check_token_quota(pcb, params, n_prompt)
    out = TokenStream(call) if stream else None
    pcb.waiting_calls += 1  # in the run queue or on the device: WAITING, as for I/O
    try:
        res = await start(out.put if out else None)
    finally:
        pcb.waiting_calls -= 1
        if out is not None:
            out.flush()  # what was held goes out before the answer
    account(pcb, res.usage)
    return {"text": res.text, "finish_reason": res.finish_reason, "usage": res.usage,
            "model": entry.name}


async def prompt_tokens(dev: Any, prompt: str | None, messages: list | None,
                        params: SamplingParams) -> list[int]:
    """The prompt as tokens: sized on the loop, tokenized (and rendered) off it."""
    if (prompt is None) == (messages is None):
        raise SyscallError("EINVAL", "give exactly one of prompt or messages")
    limit = dev.text_bytes_for(dev.n_ctx - 1)  # more bytes than this cannot fit a slot
    what = f"prompt (a slot holds {dev.n_ctx} tokens)"
    if prompt is not None:
        check_text_size(prompt, limit, what)
        return await trio.to_thread.run_sync(dev.tokenize, prompt)
    check_messages(messages)
    chars = sum(len(m["content"]) for m in messages)
    if chars > limit:  # not joined: that alone would be O(size) on the loop
        raise SyscallError("E2BIG", f"{what} of {chars} bytes or more is over the bound of "
                                    f"{limit} bytes")
    check_text_size("".join(m["content"] for m in messages), limit, what)
    params.stop = list(params.stop) + [s for s in dev.chat_stop if s not in params.stop]
    return await trio.to_thread.run_sync(dev.tokenize_chat, messages)


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
    # A ceiling before anything looks at the text (the context path too); the
    # device's own bound (what a slot can hold) follows in prompt_tokens.
    if prompt is not None:
        check_text_size(prompt, MAX_TOKENIZE_BYTES, "prompt")
    if messages is not None:
        chars = sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), str))
        if chars > MAX_TOKENIZE_BYTES:
            raise SyscallError("E2BIG", f"messages of {chars} characters are over the bound "
                                        f"of {MAX_TOKENIZE_BYTES} bytes")
    params = dict(params or {})
    entry = model_of(call, params.pop("model", None))
    sp = SamplingParams.from_dict(params)
    gen_ctx = call.sys.context_generation
    if context and gen_ctx is None:
        raise SyscallError("ENOSYS", "context memory is not available in this kernel")
    interrupts = call.caller.interrupts
    with trio.CancelScope() as scope:  # SIGINT cancels it: "stop what you are doing"
        interrupts.add(scope)
        try:
            if context:
                return await gen_ctx(call, prompt, messages, sp, stream, entry)
            return await submit(call, entry, prompt, messages, sp, stream)
        finally:
            interrupts.discard(scope)
    raise SyscallError("EINTR", "llm.generate was interrupted by SIGINT")


@handler("llm.embed", runs="task")
async def embed(call: Call, texts: list | str, model: str | None) -> list:
    entry, pcb = model_of(call, model), call.caller
    if isinstance(texts, str):
        texts = [texts]
    if not texts or len(texts) > MAX_EMBED_TEXTS or not all(isinstance(t, str) for t in texts):
        raise SyscallError("EINVAL", f"texts must be 1..{MAX_EMBED_TEXTS} strings")
    if not entry.local:
        chars = sum(len(t) for t in texts)
        if chars > MAX_TOKENIZE_BYTES:
            raise SyscallError("E2BIG", f"texts of {chars} characters are over the bound of "
                                        f"{MAX_TOKENIZE_BYTES} bytes")
        check_token_quota(pcb, SamplingParams(max_tokens=1), 0)  # EDQUOT once spent
        pcb.waiting_calls += 1
        try:
            res = await entry.queue.embed(pcb.pid, texts, nice=pcb.nice)
        finally:
            pcb.waiting_calls -= 1
        account(pcb, res.usage)
        return res.vectors
    dev = entry.device
    # Each text counts up to EMBED_CTX tokens, and has at least len/max_token_bytes.
    least = sum(min(-(-len(t) // dev.max_token_bytes), dev.EMBED_CTX) for t in texts)
    if least > MAX_EMBED_TOKENS:
        raise SyscallError("E2BIG", f"texts of at least {least} tokens; llm.embed takes at "
                                    f"most {MAX_EMBED_TOKENS} tokens per call")
    job = await trio.to_thread.run_sync(dev.embedding, texts)
    if job.n_tokens > MAX_EMBED_TOKENS:
        raise SyscallError("E2BIG", f"texts of {job.n_tokens} tokens; llm.embed takes at "
                                    f"most {MAX_EMBED_TOKENS} tokens per call")
    limit = pcb.limits.get("tokens")
    if limit is not None:
        used = pcb.usage.tokens_in + pcb.usage.tokens_out
        if used + job.n_tokens > limit:
            raise SyscallError("EDQUOT", f"token limit {int(limit)} reached (used {used}, "
                                         f"these texts {job.n_tokens})")
    pcb.waiting_calls += 1
    try:
        res = await run_embedding(entry, pcb.pid, job, nice=pcb.nice)
    finally:
        pcb.waiting_calls -= 1
    account(pcb, res.usage)
    return res.vectors


async def run_embedding(entry: Loaded, owner: int, job: Any, *,
                        nice: int | None = None) -> Any:
    """Run an embed job for ``owner`` on a model's device: through its run queue, or,
    where the run queue drives other devices (a cluster), chunk by chunk here."""
    sched = entry.queue
    if getattr(sched, "device", None) is entry.device:
        return await sched.embed(owner, job, nice=nice)
    from .scheduler import EmbedResult

    dev, spent = entry.device, 0.0
    try:
        while not job.done:
            t0 = time.perf_counter()
            if not await trio.to_thread.run_sync(dev.embed_step, job, abandon_on_cancel=False):
                await trio.sleep(0.01)  # the embedding sequences are all taken: wait a turn
            spent += time.perf_counter() - t0
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(dev.embed_release, job)
    return EmbedResult(job.vectors, {"prompt_tokens": job.n_tokens, "cached_tokens": 0,
                                     "completion_tokens": 0, "device_time": spent,
                                     "queue_wait": 0.0})


async def embed_texts(services: "Services", owner: int, texts: list[str]) -> list[list[float]]:
    """The kernel's own embeddings (context memory): the default model, under its run
    queue."""
    entry = services.table.get(None)
    if entry.device is None:
        raise SyscallError("ENOSYS", "context memory embeddings need a local default model")
    job = await trio.to_thread.run_sync(entry.device.embedding, texts)
    return (await run_embedding(entry, owner, job)).vectors


@handler("llm.tokenize", runs="task")
async def tokenize(call: Call, text: str, special: bool) -> list:
    check_text_size(text, MAX_TOKENIZE_BYTES, "text")  # before anything else looks at it
    dev = _device(call)
    return await call.in_thread(lambda: dev.tokenize(text, special=special))


@handler("llm.detokenize")
async def detokenize(call: Call, tokens: list) -> str:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise SyscallError("EINVAL", "tokens must be integers")
    return _device(call).detokenize(tokens)


@handler("llm.models")
async def models(call: Call) -> list:
    return call.sys.table.rows()


@handler("llm.load", runs="task")
async def load(call: Call, name: str) -> dict:
    table = call.sys.table
    entry = await table.load(name)  # ENOENT, ENOMEM past the budget
    return next(r for r in table.rows() if r["name"] == entry.name)


@handler("llm.unload", runs="task")
async def unload(call: Call, name: str) -> None:
    await call.sys.table.unload(name)
