"""The simulated compute device: the device contract (drivers/device.py) with
no model behind it, for measuring the kernel alone and for exact tests.

Tokens are bytes: id = byte + 3 (0 pad, 1 end of generation, 2 BOS; ids from
259 to ``n_vocab - 1`` exist, as the unused ids of a real vocabulary do, and
have no text). The next token is a fixed function of the last three tokens of
the slot and its length (a letter a..z), whatever the sampling parameters, the
batch, the slot or a preemption: output is deterministic.

Time: a step that decodes anything waits ``decode_s`` whatever the batch (on
the device's own compute thread), with the GIL released as a wait on a GPU is,
and reports what it really took (``StepResult.seconds``). ``token_cost_s``
replaces that with a simulated clock, (1 + tokens fed) x token_cost_s per
step, for tests whose orderings follow device time and must not follow the
machine's load.

Booted by ``llmos boot --model sim`` (a registry entry of ``kind = "sim"``,
drivers/models.py); bench/bench_overhead.py measures the kernel's own cost per
tick on it; tests/test_scheduler.py specifies the scheduler on it.
"""

from __future__ import annotations

import math
import re
import time
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from llmagentos.drivers.device import (
    FINISH_LENGTH,
    FINISH_STOP,
    ComputeThread,
    DeviceFullError,
    KvCells,
    StepResult,
    TokenEvent,
    check_prompt,
    common_prefix,
)
from llmagentos.drivers.llama.chat import ChatFormat
from llmagentos.drivers.llama.embed import Embedding
from llmagentos.drivers.sampling import SamplingParams, TextStream
from llmagentos.syscalls.errno import SyscallError

PAD, EOG, BOS = 0, 1, 2
BYTE0 = 3  # the id of byte 0
SPECIAL_TEXT = {"<bos>": BOS, "<eos>": EOG}  # what tokenize(special=True) parses
MAX_SLOTS = 4096


class SimGeneration:
    """One request's decoding state on the simulated device."""

    def __init__(self, prompt_tokens: Sequence[int], params: SamplingParams) -> None:
        self.prompt_tokens = list(prompt_tokens)
        self.params = params
        self.tokens: list[int] = []
        self.stream = TextStream(params.stop)
        self.finished = False
        self.reason: str | None = None
        self.closed = False

    @property
    def context(self) -> list[int]:
        return self.prompt_tokens + self.tokens

    @property
    def text(self) -> str:
        return self.stream.text

    def close(self) -> None:
        self.closed = True


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)   # resident
    pending: list[int] = field(default_factory=list)  # queued to be fed
    gen: SimGeneration | None = None


class SimDevice:
    """A deterministic device with a fixed decode time. See the module doc."""

    EOG = EOG
    EMBED_CTX = 1024   # tokens of a text that count, as on the llama.cpp device
    EMBED_CHUNK = 32   # tokens per embed step
    N_EMBD = 64        # a text's vector: its token counts folded into 64 bins

    def __init__(self, n_seq_max: int = 2, n_batch: int = 64, n_ctx: int = 4096,
                 kv_cap: int | None = None, *, decode_s: float = 0.0,
                 token_cost_s: float | None = None, n_vocab: int = 4096,
                 model_name: str = "sim", chat_template: str | None = None,
                 record: bool = False) -> None:
        for name, value, least, most in (("n_seq_max", n_seq_max, 1, MAX_SLOTS),
                                         ("n_batch", n_batch, 1, None),
                                         ("n_ctx", n_ctx, 2, None),
                                         ("n_vocab", n_vocab, BYTE0 + 256, None)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least \
                    or (most is not None and value > most):
                bound = f"{least}..{most}" if most is not None else f">= {least}"
                raise SyscallError("EINVAL", f"{name} must be an integer {bound}, not {value!r}")
        for name, secs in (("decode_s", decode_s), ("token_cost_s", token_cost_s or 0.0)):
            if not isinstance(secs, (int, float)) or isinstance(secs, bool) \
                    or not math.isfinite(secs) or not 0 <= secs <= 60:
                raise SyscallError("EINVAL", f"{name} must be a number of seconds in 0..60, "
                                             f"not {secs!r}")
        self.model_name = model_name
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        self.n_ctx = n_ctx
        self.n_vocab = n_vocab
        if kv_cap is not None and (not isinstance(kv_cap, int) or isinstance(kv_cap, bool)
                                   or kv_cap < 1):
            raise SyscallError("EINVAL", f"kv_cap must be a positive integer, not {kv_cap!r}")
        self.kv_cap = kv_cap  # cells the "KV cache" holds (None: every slot at full length)
        self.kv_size = kv_cap if kv_cap is not None else n_seq_max * n_ctx
        self.cells = KvCells(n_seq_max)
        self.decode_s = float(decode_s)
        self.token_cost_s = token_cost_s
        self.eos, self.bos = EOG, BOS
        self.max_token_bytes = 1
        self._chat = ChatFormat(chat_template, "<bos>", "<eos>")
        self._slots = [_Slot() for _ in range(n_seq_max)]
        self.compute_thread = ComputeThread(f"{model_name}-compute")
        weakref.finalize(self, self.compute_thread.stop)
        # Counters since creation.
        self.steps = 0
        self.busy_seconds = 0.0   # sum of StepResult.seconds
        self.wait_seconds = 0.0   # of which the simulated decode waited
        self.tokens_decoded = 0
        self.tokens_prefilled = 0
        self.saves = self.restores = self.copies = 0
        # With record: what each step fed, and the request of every sampled token in order
        # (tests read exact orderings from these; a booted kernel must not grow them).
        self.fed_log: list[dict[int, int]] | None = [] if record else None
        self.emitted: list[SimGeneration] | None = [] if record else None

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        for s in self._slots:
            s.gen = None
        self.compute_thread.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """One token per UTF-8 byte; with ``special``, "<bos>" and "<eos>" are theirs."""
        out = [BOS] if add_bos else []
        parts = re.split("(<bos>|<eos>)", text) if special else [text]
        for part in parts:
            if special and part in SPECIAL_TEXT:
                out.append(SPECIAL_TEXT[part])
                continue
            try:
                data = part.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise SyscallError("EINVAL", f"text is not valid Unicode: {exc}") from None
            out += [b + BYTE0 for b in data]
        return out

    def text_bytes_for(self, n_tokens: int) -> int:
        """The most UTF-8 bytes a text of ``n_tokens`` tokens can have (one per token)."""
        return n_tokens * self.max_token_bytes

    def token_piece(self, token: int) -> bytes:
        b = token - BYTE0
        return bytes((b,)) if 0 <= b < 256 else b""

    def detokenize(self, tokens: Sequence[int]) -> str:
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise SyscallError("EINVAL", f"token ids must be in 0..{self.n_vocab - 1}")
        stream = TextStream()
        return "".join(stream.feed(self.token_piece(t)) for t in tokens) + stream.flush()

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def render_chat(self, messages: list[dict[str, Any]], *,
                    add_generation_prompt: bool = True) -> str:
        return self._chat.render(messages, add_generation_prompt)

    def tokenize_chat(self, messages: list[dict[str, Any]], *,
                      add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenize(text, add_bos=not text.startswith("<bos>"), special=True)

    @property
    def chat_stop(self) -> list[str]:
        return list(self._chat.stop)

    @property
    def chat_template(self) -> str | None:
        return self._chat.template

    # -- requests and slots --------------------------------------------------------------

    @staticmethod
    def next_token(context: Sequence[int]) -> int:
        """The deterministic rule: a letter a..z (ids 100..125)."""
        return (sum(context[-3:]) * 7 + len(context)) % 26 + 100

    def generation(self, prompt_tokens: Sequence[int],
                   params: SamplingParams | dict | None) -> SimGeneration:
        params = SamplingParams.from_dict(params)
        if params.grammar is not None or params.json_schema not in (None, False):
            raise SyscallError("ENOSYS", "the simulated device does not constrain output "
                                         "(grammar, json_schema)")
        self.check_prompt(prompt_tokens)
        return SimGeneration(prompt_tokens, params)

    def check_prompt(self, prompt_tokens: Sequence[int]) -> None:
        check_prompt(prompt_tokens, self.n_ctx, self.n_vocab)

    def slot_tokens(self, slot: int) -> list[int]:
        return list(self._slots[slot].tokens)

    def slot_pending(self, slot: int) -> int:
        return len(self._slots[slot].pending)

    def prepare(self, slot: int, prompt_tokens: Sequence[int]) -> int:
        """Keep the common prefix, queue the rest (the whole prompt resident: its last
        token is queued again, sampling needs its logits); the tokens reused."""
        self.check_prompt(prompt_tokens)
        s = self._slots[slot]
        prompt = list(prompt_tokens)
        n = common_prefix(s.tokens, prompt)
        if n == len(prompt):
            n -= 1
        del s.tokens[n:]
        self.cells.truncate(slot, n)
        s.pending = prompt[n:]
        return n

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        if src == dst:
            raise SyscallError("EINVAL", "copy_prefix: src and dst are the same slot")
        n = max(0, min(n, len(self._slots[src].tokens)))
        self.release(dst)
        self._slots[dst].tokens = self._slots[src].tokens[:n]
        self.cells.copy(src, dst, n)
        self.copies += 1
        return n

    def save(self, slot: int) -> bytearray:
        self.saves += 1
        return bytearray(array("i", self._slots[slot].tokens).tobytes())

    def restore(self, slot: int, data: bytes | bytearray | memoryview,
                tokens: Sequence[int]) -> int:
        """Load a saved state into ``slot`` (emptied first); 0 when it is not the state
        of ``tokens``."""
        s = self._slots[slot]
        s.tokens, s.pending = [], []
        self.cells.release(slot)
        if not data or len(data) % 4 or array("i", bytes(data)).tolist() != list(tokens):
            return 0
        s.tokens = list(tokens)
        self.cells.append(slot, len(tokens))
        self.restores += 1
        return len(data)

    def release(self, slot: int) -> None:
        self._slots[slot] = _Slot()
        self.cells.release(slot)

    def kv_used(self) -> int:
        return self.cells.used()

    def exclusive_cells(self) -> list[int]:
        return self.cells.exclusive()

    def attach(self, slot: int, gen: SimGeneration) -> None:
        self._slots[slot].gen = gen

    def detach(self, slot: int) -> SimGeneration | None:
        s = self._slots[slot]
        gen, s.gen = s.gen, None
        return gen

    def attached(self, slot: int) -> SimGeneration | None:
        return self._slots[slot].gen

    # -- the tick --------------------------------------------------------------------------

    def step(self, plan: Sequence[int]) -> StepResult:
        """Feed every runnable planned slot (generating ones first, then prompt chunks up
        to n_batch tokens), wait the decode time, sample where a prompt is all fed."""
        t0 = time.perf_counter()
        slots = self._slots
        runnable = [i for i in dict.fromkeys(plan)
                    if (s := slots[i]).gen is not None and s.pending and not s.gen.finished]
        order = ([i for i in runnable if len(slots[i].pending) == 1]
                 + [i for i in runnable if len(slots[i].pending) > 1])
        budget = self.n_batch
        if order and self.kv_cap is not None:
            # As llama.cpp's device: prompt chunks shrink to the room left; a step that
            # cannot take every generating slot's token (and one prompt token) fails.
            room = self.kv_cap - self.cells.used()
            n_gen = sum(1 for i in order if len(slots[i].pending) == 1)
            if room < min(len(order), n_gen + 1):
                raise DeviceFullError(f"simulated KV cache full ({self.kv_cap} cells): no "
                                      f"room for {len(order)} sequences")
            budget = min(budget, room)
        fed: dict[int, int] = {}
        for i in order:
            if budget <= 0:
                break
            s = slots[i]
            take = min(budget, len(s.pending))
            budget -= take
            s.tokens += s.pending[:take]
            del s.pending[:take]
            self.cells.append(i, take)
            fed[i] = take
        if not fed:
            return StepResult([], {}, 0, 0, time.perf_counter() - t0)
        if self.decode_s:
            w0 = time.perf_counter()
            time.sleep(self.decode_s)  # releases the GIL, as a wait on the GPU does
            self.wait_seconds += time.perf_counter() - w0
        events = [self._sample(i) for i in fed if not slots[i].pending]
        n_fed = sum(fed.values())
        if self.fed_log is not None:
            self.fed_log.append(fed)
        if self.token_cost_s is not None:
            seconds = self.token_cost_s * (1 + n_fed)
        else:
            seconds = time.perf_counter() - t0
        self.steps += 1
        self.busy_seconds += seconds
        self.tokens_decoded += len(events)
        self.tokens_prefilled += n_fed - len(events)
        return StepResult(events, fed, len(events), n_fed - len(events), seconds)

    def _sample(self, i: int) -> TokenEvent:
        s = self._slots[i]
        gen = s.gen
        if gen.params.max_tokens == 0:
            return self._finish(i, None, "", FINISH_LENGTH)
        tok = self.next_token(s.tokens)
        gen.tokens.append(tok)
        if self.emitted is not None:
            self.emitted.append(gen)
        piece = gen.stream.feed(self.token_piece(tok))
        if gen.stream.stopped:
            return self._finish(i, tok, piece, FINISH_STOP)
        if len(gen.tokens) >= gen.params.max_tokens or len(s.tokens) + 1 >= self.n_ctx:
            return self._finish(i, tok, piece, FINISH_LENGTH)
        s.pending = [tok]
        return TokenEvent(i, tok, piece)

    def _finish(self, i: int, tok: int | None, piece: str, reason: str) -> TokenEvent:
        s = self._slots[i]
        gen = s.gen
        piece += gen.stream.flush()
        gen.finished, gen.reason = True, reason
        s.pending = []
        return TokenEvent(i, tok, piece, True, reason)

    # -- embeddings: a text's vector is its token counts folded into N_EMBD bins -----------

    def embedding(self, texts: Sequence[str] | Sequence[Sequence[int]],
                  *, normalize: bool = True) -> Embedding:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise SyscallError("EINVAL", "embed takes a list of strings")
        toks: list[list[int]] = []
        for t in texts:
            if isinstance(t, str):
                tk = self.tokenize(t[: self.text_bytes_for(self.EMBED_CTX + 8)])
            elif isinstance(t, (list, tuple)):
                tk = list(t)
                if any(not isinstance(x, int) or isinstance(x, bool)
                       or not 0 <= x < self.n_vocab for x in tk):
                    raise SyscallError("EINVAL", f"token ids must be in 0..{self.n_vocab - 1}")
            else:
                raise SyscallError("EINVAL", "embed takes strings (or lists of token ids)")
            toks.append(tk[: self.EMBED_CTX] or [BOS])
        return Embedding(toks, normalize, self.N_EMBD)

    def embed_runnable(self, job: Embedding) -> bool:
        return not job.done

    def embed_step(self, job: Embedding, budget: int | None = None) -> int:
        """Count the next chunk of ``job`` (at most EMBED_CHUNK tokens); the tokens done."""
        budget = max(1, min(budget or self.EMBED_CHUNK, self.EMBED_CHUNK))
        n = 0
        while n < budget and not job.done:
            toks = job.tokens[job.i]
            take = min(len(toks) - job.pos, budget - n)
            for t in toks[job.pos:job.pos + take]:
                job.acc[t % self.N_EMBD] += 1.0
            job.pos += take
            n += take
            if job.pos == len(toks):
                job.finish_text()
                job.i, job.pos = job.i + 1, 0
        if n and self.decode_s:
            time.sleep(self.decode_s)
        job.decoded += n
        return n

    def embed_release(self, job: Embedding) -> None:
        """Forget ``job``'s half-done text: it starts that text over. Idempotent."""
        job.pos = 0
        job.acc[:] = 0.0
