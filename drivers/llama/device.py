"""The compute device: one llama.cpp model and context with ``n_seq_max`` slots.

A *slot* is a llama.cpp sequence id. Each slot holds the tokens of one
conversation in the (unified) KV cache, ``slot_tokens(slot)``, plus the tokens
still to be fed, queued by ``prepare``. One ``step(plan)`` is one tick of
continuous batching: one llama_batch with the next token of every generating
slot in the plan plus prompt chunks up to ``n_batch`` tokens, one
``llama_decode``, then one sample for every slot whose logits were computed.

Sizes: ``n_ctx`` is the most tokens one slot may hold (prompt + output);
``kv_size`` is the whole KV cache, a pool of cells shared by all slots
(``kv_unified``), so slots that share a copied prefix use fewer cells.
llama.cpp itself lets any sequence grow to ``kv_size``; the per-slot limit is
ours. The pool is sized by memory, not by slots: ``kv_memory`` bytes (default
``KV_MEMORY_SHARE`` of the free RAM, or of the GPU's free memory when layers
are offloaded) over the bytes of one cell (``kv_cell_bytes``: every layer's K
and V heads), at least one slot (``n_ctx``) and at most ``n_ctx * n_seq_max``.
So ``n_seq_max`` can be large (default: llama.cpp's most,
``llama_max_parallel_sequences()``): a slot costs only a row of reserved logits
(4 bytes x vocabulary, 1 MiB with Gemma 3's) until it holds tokens, and the
scheduler admits as many sequences as the pool holds. ``kv_used()`` counts the
cells held (``KvCells``). A step that finds no room first halves its prompt
chunks, then raises DeviceFullError (ENOSPC).

Numerics: in the unified cache a sequence's cells sit wherever they were free,
interleaved with other sequences', and attention sums over cells in cell
order, so the last bits of the logits (and, rarely, a greedy choice) depend
on the layout. A saved state restores bit-exactly and continues exactly when
it lands in an equivalent layout (e.g. one sequence at a time); with
``kv_unified=False`` each slot has its own stream, layouts are canonical and
restore is always exact, at ~25% less batched throughput here (16 slots:
134 vs 177 tok/s) and with whole-stream copies for ``copy_prefix``. Each
stream is then allocated ``n_ctx`` cells, and ``kv_size`` is a budget the
device keeps (a step past it fails as a full cache does): the same pool to
the scheduler, with exact numerics.

Attention: flash attention is on by default, as llama.cpp's server resolves
its ``auto``: on the CPU it skips the cells of other sequences that the mask
hides, which in a unified cache shared by 16 sequences is most of them (+15%
aggregate here). Its tiled kernel, taken for a ubatch of FA_TILE_Q (64) or
more tokens, skips only whole masked tiles, and decode steps interleave the
sequences' cells so no tile is whole: there 64 sequences ran 25% slower than
without flash attention. So on the CPU a step of that many generating slots
decodes them in balanced groups of fewer (``_groups``), while prompt chunks
(contiguous cells, whose causal mask does leave whole tiles) keep full ubatches.

Sliding-window attention (Gemma 3: 512) lets llama.cpp reuse cells that left
a sequence's window; ``prepare`` and ``copy_prefix`` check that the cells a
continuation needs are still there (``llama_memory_seq_pos_min``) and
otherwise start the slot over, as llama.cpp's server does.

Threads: the device is synchronous and owned by one thread at a time (the
scheduler's worker); its decodes run on the compute thread (runtime.py).
``tokenize``, ``detokenize``, ``render_chat`` and ``generation`` touch only
the read-only model and may be called from any thread (a grammar is compiled
in ``generation``: call it off the event loop).

Chat formatting is chat.py's; embeddings are embed.py's (a second context the
Device owns and delegates to).
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import llama_cpp
import psutil

from llmagentos.drivers.device import (
    FINISH_EOG,
    FINISH_LENGTH,
    FINISH_STOP,
    DeviceFullError,
    KvCells,
    StepResult,
    TokenEvent,
    check_prompt,
    common_prefix,
)
from llmagentos.drivers.llama.chat import ChatFormat
from llmagentos.drivers.llama.embed import Embedding, EmbeddingContext
from llmagentos.drivers.llama.runtime import (
    compute_thread,
    default_threads,
    init_backend,
    model_params,
)
from llmagentos.drivers.llama.sampler import Sampler
from llmagentos.drivers.models import (
    DEFAULT_MODEL,
    ModelRegistry,
    ModelSpec,
    gguf_longest_token,
    resolve_model,
)
from llmagentos.drivers.sampling import SamplingParams, TextStream
from llmagentos.syscalls.errno import SyscallError

log = logging.getLogger(__name__)
FA_TILE_Q = 64  # ggml's CPU flash attention tiles a ubatch of this many tokens or more
KV_MEMORY_SHARE = 1 / 16  # of the free memory, what the KV pool takes by default
GPU_KV_MEMORY_SHARE = 1 / 2  # of a GPU's free memory (the model's layers are already in)
_TYPE_BYTES = {llama_cpp.GGML_TYPE_F32: 4.0, llama_cpp.GGML_TYPE_F16: 2.0,  # per element
               llama_cpp.GGML_TYPE_Q8_0: 34 / 32, llama_cpp.GGML_TYPE_Q4_0: 18 / 32}


class Generation:
    """One request's decoding state: sampler, text, output tokens. Outlives slot moves."""

    def __init__(self, device: Device, prompt_tokens: Sequence[int], params: SamplingParams):
        self.prompt_tokens = list(prompt_tokens)
        self.params = params
        self.sampler = Sampler(
            device.vocab, device.n_vocab, params,
            prompt_tail=self.prompt_tokens, eog_token=device.eos,
        )
        self.stream = TextStream(params.stop)
        self.tokens: list[int] = []
        self.finished = False
        self.reason: str | None = None

    @property
    def context(self) -> list[int]:
        """Every token of the sequence so far: prompt + output."""
        return self.prompt_tokens + self.tokens

    @property
    def text(self) -> str:
        return self.stream.text

    def close(self) -> None:
        self.sampler.close()


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)   # resident in the KV cache, pos 0..n-1
    pending: list[int] = field(default_factory=list)  # queued to be fed, pos n..
    gen: Generation | None = None


class Device:
    """A llama.cpp model + context with slots. See the module doc for the contract."""

    compute_thread = compute_thread  # the scheduler runs its ticks there (runtime.py)

    def __init__(
        self,
        model: str | Path | ModelSpec = DEFAULT_MODEL,
        *,
        registry: ModelRegistry | None = None,
        n_seq_max: int | None = None,
        n_ctx: int | None = None,
        kv_size: int | None = None,
        n_batch: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        flash_attn: bool = True,
        extra_buffers: bool = False,
        kv_unified: bool = True,
        verbose: bool = False,
        kv_memory: int | None = None,
    ) -> None:
        spec = resolve_model(model, registry)
        if spec.kind != "gguf":
            raise SyscallError("EINVAL", f"model {spec.name!r} is of kind {spec.kind!r}, not a "
                                         "GGUF for llama.cpp (drivers.models.open_device)")
        self.spec = spec
        self.model_name = spec.name
        limit = llama_cpp.llama_max_parallel_sequences()
        self.n_ctx = n_ctx or spec.n_ctx or 1024
        self.n_batch = n_batch or spec.n_batch or 512
        # llama.cpp reserves a row of logits per sequence within the batch's outputs
        # (it aborts when n_seq_max > n_batch): the default fits the batch.
        self.n_seq_max = n_seq_max or spec.n_seq_max or min(limit, self.n_batch)
        if self.n_seq_max > self.n_batch:
            raise SyscallError("EINVAL", f"n_seq_max {self.n_seq_max} exceeds n_batch "
                                         f"{self.n_batch}: a step must hold a token of each")
        self.n_threads = n_threads or spec.n_threads or default_threads()
        n_gpu_layers = n_gpu_layers if n_gpu_layers is not None else (spec.n_gpu_layers or 0)
        if self.n_seq_max < 1 or self.n_seq_max > limit:
            raise SyscallError("EINVAL", f"n_seq_max must be in 1..{limit}")
        if kv_size is not None and kv_size < 1:
            raise SyscallError("EINVAL", f"kv_size must be positive, not {kv_size}")
        if kv_memory is not None and kv_memory < 1:
            raise SyscallError("EINVAL", f"kv_memory must be a positive number of bytes, "
                                         f"not {kv_memory}")
        self.path = spec.gguf_path()
        self._verbose = verbose
        init_backend(verbose)

        self.model = None
        self.ctx = None
        self._batch = None
        self.embeddings = EmbeddingContext(self)
        mparams = model_params(extra_buffers)
        # -1 is every layer (as in llama-cpp-python); llama.cpp itself wants a count
        # at least the model's, and offloads nothing for a negative one.
        mparams.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
        self.n_gpu_layers = n_gpu_layers
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        if n_gpu_layers and not self.gpu_offload:
            log.warning("--gpu-layers %s asked for, but this llama-cpp-python has no GPU "
                        "backend: every layer runs on the CPU (README: building for a GPU)",
                        "all" if n_gpu_layers < 0 else n_gpu_layers)
        model_p = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model_p:
            raise SyscallError(
                "EIO", f"llama.cpp could not load model {spec.name!r} from {self.path}")
        self.model = model_p
        self.vocab = llama_cpp.llama_model_get_vocab(model_p)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model_p)
        self.n_swa = llama_cpp.llama_model_n_swa(model_p)
        if self.n_ctx > self.n_ctx_train:
            self.close()
            raise SyscallError(
                "EINVAL", f"n_ctx {self.n_ctx} exceeds the model's {self.n_ctx_train}")
        eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.eos = eos if eos >= 0 else llama_cpp.llama_vocab_eot(self.vocab)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.max_token_bytes = _max_token_bytes(self.path, self.vocab, self.n_vocab)

        cparams = llama_cpp.llama_context_default_params()
        self.kv_cell_bytes = kv_cell_bytes(model_p, cparams)
        if kv_size is None:
            try:
                kv_size = self._pool_cells(kv_memory, n_gpu_layers > 0)
            except SyscallError:
                self.close()
                raise
        self.kv_size = kv_size
        # Split streams: n_ctx cells each; the pool is then a budget kept in step().
        cparams.n_ctx = self.kv_size if kv_unified else self.n_ctx * self.n_seq_max
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.n_seq_max
        cparams.kv_unified = kv_unified
        self.kv_unified = kv_unified
        self.flash_attn = flash_attn
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.no_perf = False
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = llama_cpp.llama_init_from_model(model_p, cparams)
        if not ctx:
            self.close()
            raise SyscallError("ENOMEM", f"llama_init_from_model failed (kv_size={self.kv_size})")
        self.ctx = ctx
        if kv_unified:
            self.kv_size = llama_cpp.llama_n_ctx(ctx)  # llama.cpp may round it up
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.cells = KvCells(self.n_seq_max)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        self._slots = [_Slot() for _ in range(self.n_seq_max)]
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._chat = ChatFormat.for_model(model_p, self.vocab, spec.chat_template,
                                          self.bos, self.eos)
        # Counters since load, for stats().
        self.steps = 0
        self.busy_seconds = 0.0
        self.tokens_decoded = 0
        self.tokens_prefilled = 0

    def _pool_cells(self, kv_memory: int | None, gpu: bool) -> int:
        """The KV pool in cells: ``kv_memory`` bytes (default: a share of the free
        memory), at least one slot's ``n_ctx``, at most every slot's."""
        most = self.n_ctx * self.n_seq_max
        if kv_memory is None:
            cells = int(free_memory(gpu) // self.kv_cell_bytes)
            return max(self.n_ctx, min(cells, most))
        cells = int(kv_memory // self.kv_cell_bytes)
        if cells < self.n_ctx:
            raise SyscallError(
                "EINVAL", f"kv_memory of {kv_memory} bytes holds {cells} KV cells of "
                          f"{self.kv_cell_bytes} bytes, less than one slot's n_ctx "
                          f"({self.n_ctx} tokens, {self.n_ctx * self.kv_cell_bytes} bytes)")
        return min(cells, most)

    def kv_used(self) -> int:
        """Cells of the KV pool held now (a shared prefix counts once)."""
        return self.cells.used()

    def exclusive_cells(self) -> list[int]:
        return self.cells.exclusive()

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context, batch and model. Idempotent. On the compute thread, after
        whatever it was running: a decode must never find its context freed under it."""
        compute_thread.call(self._close)

    def _close(self) -> None:
        for slot in getattr(self, "_slots", []):
            if slot.gen is not None:
                slot.gen = None
        self.embeddings.close()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Text -> tokens. ``special`` parses control tokens such as ``<end_of_turn>``.

        Its cost grows with the text (about 1 s per MB here): bound the text first
        (``check_text_size``, ``text_bytes_for``) and call it off the event loop.
        """
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, special)
            if n < 0:
                raise SyscallError("EINVAL", "text could not be tokenized")
        return list(buf[:n])

    def text_bytes_for(self, n_tokens: int) -> int:
        """The most UTF-8 bytes a text of ``n_tokens`` tokens can have: a longer text
        cannot fit, whatever it says, so it can be refused before tokenizing. (This
        holds for tokenizers that match text as it is, as SPM and BPE vocabularies do;
        a normalizing one, such as UGM's, could take more bytes per token.)"""
        return n_tokens * self.max_token_bytes

    def token_piece(self, token: int) -> bytes:
        """The bytes of one token (not special tokens); cached, since every step needs it."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = self._piece_buf
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise SyscallError("EINVAL", f"token ids must be in 0..{self.n_vocab - 1}")
        stream = TextStream()
        return "".join(stream.feed(self.token_piece(t)) for t in tokens) + stream.flush()

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def render_chat(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """Messages -> prompt text, via the model's chat template (or the plain format)."""
        return self._chat.render(messages, add_generation_prompt)

    def tokenize_chat(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenize(text, add_bos=not self._chat.starts_with_bos(text), special=True)

    @property
    def chat_stop(self) -> list[str]:
        """Stop strings a chat request should add (the plain format needs them)."""
        return list(self._chat.stop)

    @property
    def chat_template(self) -> str | None:
        return self._chat.template

    # -- requests and slots --------------------------------------------------------------

    def generation(
        self, prompt_tokens: Sequence[int], params: SamplingParams | dict | None
    ) -> Generation:
        """A request's decoding state (sampler built here: a bad grammar is EINVAL now)."""
        if not isinstance(params, SamplingParams):
            params = SamplingParams.from_dict(params)
        self.check_prompt(prompt_tokens)
        return Generation(self, prompt_tokens, params)

    def check_prompt(self, prompt_tokens: Sequence[int]) -> None:
        check_prompt(prompt_tokens, self.n_ctx, self.n_vocab)

    def slot_tokens(self, slot: int) -> list[int]:
        """The tokens resident in the slot's KV cache (not those still pending)."""
        return list(self._slots[slot].tokens)

    def slot_pending(self, slot: int) -> int:
        return len(self._slots[slot].pending)

    def prepare(self, slot: int, prompt_tokens: Sequence[int]) -> int:
        """Make the slot hold ``prompt_tokens``: keep the common prefix, queue the rest.

        Returns how many tokens were reused. When the whole prompt is resident, the
        last token is removed and queued again: sampling needs its logits.
        """
        self.check_prompt(prompt_tokens)
        s = self._slots[slot]
        prompt = list(prompt_tokens)
        n = common_prefix(s.tokens, prompt)
        if n == len(prompt):
            n -= 1
        self._truncate(slot, n)
        s.pending = prompt[len(s.tokens):]
        return len(s.tokens)

    def _truncate(self, slot: int, n: int) -> None:
        """Keep the first ``n`` resident tokens, if the KV cache still can.

        Sliding-window layers (Gemma 3: 512 tokens) let llama.cpp reuse a sequence's
        cells that fell out of its window, even with a full-size SWA cache. Appending
        is always safe; cutting back to ``n`` needs positions ``[n - n_swa, n)``, so
        when they are gone the slot starts over (as llama.cpp's server does).
        """
        s = self._slots[slot]
        if n < len(s.tokens):
            if n > 0 and not self._has_window(slot, n):
                n = 0
            if n == 0 or not llama_cpp.llama_memory_seq_rm(self.mem, slot, n, -1):
                llama_cpp.llama_memory_seq_rm(self.mem, slot, -1, -1)
                n = 0
            del s.tokens[n:]
            self.cells.truncate(slot, n)

    def _has_window(self, slot: int, n: int) -> bool:
        """Does ``slot`` still hold what a continuation at position ``n`` attends to?"""
        if self.n_swa <= 0:
            return True
        pos_min = llama_cpp.llama_memory_seq_pos_min(self.mem, slot)
        return 0 <= pos_min <= max(0, n - self.n_swa)

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        """Share the first ``n`` resident tokens of ``src`` with ``dst`` (no decode).

        ``dst`` is emptied first. Returns the number of tokens copied.
        """
        if src == dst:
            raise SyscallError("EINVAL", "copy_prefix: src and dst are the same slot")
        n = min(n, len(self._slots[src].tokens))
        self.release(dst)
        if n > 0 and not self._has_window(src, n):
            return 0  # the source's sliding-window cells for this prefix are gone
        if n > 0:
            if self.kv_unified:  # cells are shared: no data moves
                llama_cpp.llama_memory_seq_cp(self.mem, src, dst, 0, n)
                self.cells.copy(src, dst, n)
            else:  # another stream: llama.cpp copies whole streams only, so cut after
                llama_cpp.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
                llama_cpp.llama_memory_seq_rm(self.mem, dst, n, -1)
                self.cells.append(dst, n)
            self._slots[dst].tokens = self._slots[src].tokens[:n]
        return n

    def save(self, slot: int) -> bytearray:
        """The slot's KV state (no logits) as bytes; pair it with slot_tokens(slot)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot)
        data = bytearray(size)
        if size:
            buf = (ctypes.c_uint8 * size).from_buffer(data)
            written = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, slot)
            del buf
            if written != size:
                raise SyscallError(
                    "EIO", f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return data

    def restore(
        self, slot: int, data: bytes | bytearray | memoryview, tokens: Sequence[int]
    ) -> int:
        """Load a saved state into ``slot`` (which is emptied). Returns 0 on failure.

        The state carries no logits: call prepare() with the sequence afterwards, which
        re-feeds the last token when nothing else is pending.
        """
        s = self._slots[slot]
        s.pending = []
        s.tokens = []
        self.cells.release(slot)
        if not data:
            llama_cpp.llama_memory_seq_rm(self.mem, slot, -1, -1)
            return 0
        if isinstance(data, bytearray):
            buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
        else:
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        n = llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), slot)
        del buf
        if n == 0 or llama_cpp.llama_memory_seq_pos_max(self.mem, slot) != len(tokens) - 1:
            llama_cpp.llama_memory_seq_rm(self.mem, slot, -1, -1)
            return 0
        s.tokens = list(tokens)
        self.cells.append(slot, len(s.tokens))
        return n

    def release(self, slot: int) -> None:
        """Forget the slot's tokens and request (the request itself is not closed)."""
        llama_cpp.llama_memory_seq_rm(self.mem, slot, -1, -1)
        self.cells.release(slot)
        s = self._slots[slot]
        s.tokens = []
        s.pending = []
        s.gen = None

    def attach(self, slot: int, gen: Generation) -> None:
        """Let ``gen`` sample from this slot's logits from now on."""
        self._slots[slot].gen = gen

    def detach(self, slot: int) -> Generation | None:
        s = self._slots[slot]
        gen, s.gen = s.gen, None
        return gen

    def attached(self, slot: int) -> Generation | None:
        return self._slots[slot].gen

    # -- the tick --------------------------------------------------------------------------

    def step(self, plan: Sequence[int]) -> StepResult:
        """Advance every slot in ``plan`` (in that order of preference) by one decode.

        Slots with one pending token (generating) go first; prompt chunks fill the
        rest of the batch. Only a chunk that reaches the end of its prompt asks for
        logits. A slot in ``plan`` without a request or without pending tokens is skipped.
        """
        if self.ctx is None:  # closed: nothing may decode on a freed context
            raise SyscallError("ESHUTDOWN", "the device is closed")
        t0 = time.perf_counter()
        runnable = [s for s in dict.fromkeys(plan)
                    if self._slots[s].gen is not None and self._slots[s].pending
                    and not self._slots[s].gen.finished
                    and self._slots[s].gen.sampler.chain is not None]
        decode = [s for s in runnable if len(self._slots[s].pending) == 1]
        prefill = [s for s in runnable if len(self._slots[s].pending) > 1]
        groups = self._groups(decode)
        events: list[TokenEvent] = []
        fed: dict[int, int] = {}
        sampled: dict[int, float] = {}
        n_decode = n_prefill = retries = 0
        for i, group in enumerate(groups):
            try:  # prompt chunks go with the last group
                rows, tries = self._decode(group, prefill if i == len(groups) - 1 else [])
            except DeviceFullError:
                if fed:  # what decoded stands; the rest is left for the next step
                    break
                raise
            retries += tries
            for slot, take, first_row, wants_logits in rows:
                s = self._slots[slot]
                s.tokens.extend(s.pending[:take])
                del s.pending[:take]
                self.cells.append(slot, take)
                fed[slot] = take
                if wants_logits:
                    n_decode += 1
                    if take > 1:
                        n_prefill += take - 1
                    ts = time.perf_counter()
                    events.append(self._sample(slot, first_row + take - 1))
                    sampled[slot] = time.perf_counter() - ts
                else:
                    n_prefill += take
        dt = time.perf_counter() - t0
        if fed:
            self.steps += 1
            self.busy_seconds += dt
            self.tokens_decoded += n_decode
            self.tokens_prefilled += n_prefill
        return StepResult(events, fed, n_decode, n_prefill, dt, retries, sampled)

    def _groups(self, decode: list[int]) -> list[list[int]]:
        """The generating slots in balanced groups of fewer than FA_TILE_Q on the
        CPU with flash attention (see the module doc); else one group."""
        if not self.flash_attn or self.n_gpu_layers or len(decode) < FA_TILE_Q:
            return [decode]
        k = -(-len(decode) // (FA_TILE_Q - 1))
        size = -(-len(decode) // k)
        return [decode[i:i + size] for i in range(0, len(decode), size)]

    def _decode(self, decode: list[int], prefill: list[int]
                ) -> tuple[list[tuple[int, int, int, bool]], int]:
        """One llama_decode of these slots' pending tokens (decode first, then prompt
        chunks up to n_batch): its rows, and how often a full cache halved the chunks."""
        budget = self.n_batch
        retries = 0
        while True:
            rows = self._fill_batch(decode, prefill, budget)
            if not rows:
                return rows, retries
            if not self.kv_unified and self.cells.used() + self._batch.n_tokens > self.kv_size:
                rc = 1  # past the budget of split streams: as a full cache
            else:
                rc = compute_thread.call(llama_cpp.llama_decode, self.ctx, self._batch)
            if rc == 0:
                return rows, retries
            if rc == 1:
                n_prefill = sum(take for _, take, _, _ in rows if take > 1)
                if n_prefill > 0 and budget > len(decode) + 1:
                    budget = len(decode) + max(1, n_prefill // 2)
                    retries += 1
                    continue
                raise DeviceFullError(
                    f"KV cache full ({self.kv_size} cells): no room for {len(rows)} sequences; "
                    "release or save idle slots"
                )
            raise SyscallError("EIO", f"llama_decode failed with code {rc}")

    def _fill_batch(
        self, decode: list[int], prefill: list[int], budget: int
    ) -> list[tuple[int, int, int, bool]]:
        """Fill the llama_batch; returns (slot, n_tokens, first_row, wants_logits) per slot."""
        b = self._batch
        rows: list[tuple[int, int, int, bool]] = []
        i = 0
        for slot in decode + prefill:
            if i >= budget:
                break
            s = self._slots[slot]
            take = min(len(s.pending), budget - i)
            pos0 = len(s.tokens)
            last = take == len(s.pending)
            for j in range(take):
                b.token[i + j] = s.pending[j]
                b.pos[i + j] = pos0 + j
                b.n_seq_id[i + j] = 1
                b.seq_id[i + j][0] = slot
                b.logits[i + j] = 0
            if last:
                b.logits[i + take - 1] = 1
            rows.append((slot, take, i, last))
            i += take
        b.n_tokens = i
        return rows

    def _sample(self, slot: int, row: int) -> TokenEvent:
        s = self._slots[slot]
        gen = s.gen
        assert gen is not None
        if gen.params.max_tokens == 0:
            return self._finish(slot, None, "", FINISH_LENGTH)
        tok = gen.sampler.sample(self.ctx, row)
        if self.is_eog(tok):
            return self._finish(slot, tok, "", FINISH_EOG)
        gen.tokens.append(tok)
        piece = gen.stream.feed(self.token_piece(tok))
        if gen.stream.stopped:
            return self._finish(slot, tok, piece, FINISH_STOP)
        if len(gen.tokens) >= gen.params.max_tokens or len(s.tokens) + 1 >= self.n_ctx:
            return self._finish(slot, tok, piece, FINISH_LENGTH)
        s.pending = [tok]
        return TokenEvent(slot, tok, piece)

    def _finish(self, slot: int, tok: int | None, piece: str, reason: str) -> TokenEvent:
        s = self._slots[slot]
        gen = s.gen
        assert gen is not None
        piece += gen.stream.flush()
        gen.finished = True
        gen.reason = reason
        s.pending = []
        return TokenEvent(slot, tok, piece, True, reason)

    def perf(self) -> dict[str, float]:
        """llama.cpp's own counters (prompt eval / eval ms and token counts)."""
        p = llama_cpp.llama_perf_context(self.ctx)
        return {"prompt_eval_ms": p.t_p_eval_ms, "prompt_eval_tokens": p.n_p_eval,
                "eval_ms": p.t_eval_ms, "eval_tokens": p.n_eval}

    # -- embeddings (embed.py) ------------------------------------------------------------

    # The embedding context's sizes, as the kernel reads them off the device.
    EMBED_CTX = EmbeddingContext.CTX
    EMBED_CHUNK = EmbeddingContext.CHUNK
    EMBED_SEQS = EmbeddingContext.SEQS
    EMBED_PARTIAL = EmbeddingContext.PARTIAL

    def embedding(self, texts: Sequence[str] | Sequence[Sequence[int]],
                  *, normalize: bool = True) -> Embedding:
        """An embed request's state (tokenizes: call it off the event loop)."""
        return self.embeddings.job(texts, normalize)

    def embed_runnable(self, job: Embedding) -> bool:
        return self.embeddings.runnable(job)

    def embed_step(self, job: Embedding, budget: int | None = None) -> int:
        return self.embeddings.step(job, budget)

    def embed_release(self, job: Embedding) -> None:
        self.embeddings.release(job)

    def embed(self, texts: Sequence[str], *, normalize: bool = True) -> list[list[float]]:
        return self.embeddings.embed(texts, normalize)


def _meta(model: llama_cpp.llama_model_p, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def kv_cell_bytes(model: llama_cpp.llama_model_p,
                  cparams: llama_cpp.llama_context_params) -> int:
    """Bytes one KV cell (one token) takes over all layers: the K and V heads of the
    cache's types. Head sizes are the GGUF's attention.key_length / value_length
    (Gemma 3: 256, not n_embd / n_head). With a full-size sliding-window cache (the
    default here) every layer keeps every cell."""
    arch = _meta(model, "general.architecture") or ""
    n_embd_head = llama_cpp.llama_model_n_embd(model) // max(1, llama_cpp.llama_model_n_head(model))
    k = int(_meta(model, f"{arch}.attention.key_length") or n_embd_head)
    v = int(_meta(model, f"{arch}.attention.value_length") or n_embd_head)
    heads = llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model)
    return max(1, round(heads * (k * _TYPE_BYTES.get(cparams.type_k, 2.0)
                                 + v * _TYPE_BYTES.get(cparams.type_v, 2.0))))


def free_memory(gpu: bool = False) -> int:
    """The KV pool's default budget in bytes: ``KV_MEMORY_SHARE`` of the available
    RAM, or ``GPU_KV_MEMORY_SHARE`` of the first GPU's free memory when layers are
    offloaded and nvidia-smi answers."""
    if gpu and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True).stdout
            return int(int(out.split()[0]) * (1 << 20) * GPU_KV_MEMORY_SHARE)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    return int(psutil.virtual_memory().available * KV_MEMORY_SHARE)


def _max_token_bytes(path: Path, vocab: llama_cpp.llama_vocab_p, n_vocab: int) -> int:
    """An upper bound on the input bytes one token stands for: the longest vocabulary
    text (escaped forms such as "▁" or "<0x0A>" are no shorter than what they match),
    read off the GGUF, else asked of llama.cpp token by token."""
    read = gguf_longest_token(path)
    if read is not None and read[0] == n_vocab:
        return max(1, read[1])
    get = llama_cpp.llama_vocab_get_text
    return max(1, max(len(get(vocab, t) or b"") for t in range(n_vocab)))
