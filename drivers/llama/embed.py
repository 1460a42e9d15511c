"""Embeddings: a second, small llama.cpp context on the Device's model.

An embed request (an ``Embedding`` job) is computed in bounded chunks
(``EmbeddingContext.step``: at most ``CHUNK`` tokens per decode), so that the
scheduler can interleave them with generation steps and charge them to their
owner. The context does not pool: llama.cpp pools per decode, so a text split
over several decodes would be pooled wrongly; we sum the per-token vectors
ourselves while the text's KV cells carry the causal context from one chunk
to the next. Every decode of this context computes the full-vocabulary logits
of every token too (an embeddings context outputs them all): at llama.cpp's
usual batch of 2,048 that buffer alone was 2 GiB (262,144 x 2,048 floats), the
RSS growth an unbounded embed used to cost, hence the small chunk.

Each chunk runs whole on the compute thread, so embed jobs from several
threads never interleave inside a decode. A text in hand holds a sequence of
the context (and up to ``CTX`` cells) between chunks; only ``PARTIAL`` texts
may be half-done at once, so that their cells are always there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from llmagentos.drivers.llama.runtime import compute_thread
from llmagentos.syscalls.errno import SyscallError

if TYPE_CHECKING:
    from llmagentos.drivers.llama.device import Device


class Embedding:
    """One embed request's progress: texts as tokens, the running sum of the text in
    hand, the vectors done. Stepped by EmbeddingContext.step; not thread-safe."""

    def __init__(self, tokens: list[list[int]], normalize: bool, n_embd: int) -> None:
        self.tokens = tokens
        self.normalize = normalize
        self.n_embd = n_embd
        self.n_tokens = sum(map(len, tokens))
        self.vectors: list[list[float]] = []
        self.i = 0              # the text in hand
        self.pos = 0            # its tokens decoded so far
        self.seq: int | None = None  # its sequence while it is half-done
        self.acc = np.zeros(n_embd, dtype=np.float64)
        self.decoded = 0        # tokens decoded, rewinds included

    @property
    def done(self) -> bool:
        return self.i >= len(self.tokens)

    def finish_text(self) -> None:
        vec = self.acc / len(self.tokens[len(self.vectors)])
        if self.normalize:
            norm = float(np.linalg.norm(vec))
            vec = vec / norm if norm > 0 else vec
        self.vectors.append(vec.tolist())
        self.acc = np.zeros(self.n_embd, dtype=np.float64)


class EmbeddingContext:
    """The embedding context of one Device: created on first use, freed by close().

    ``device`` gives the model and its tokenizer (tokenize, text_bytes_for,
    n_vocab, bos, n_threads); the context is this object's own.
    """

    CTX = 1024   # tokens of a text that count (longer texts are truncated)
    CHUNK = 32   # tokens per embedding decode: bounds its time and its logits buffer
    SEQS = 16    # sequences of the embedding context (texts in flight in one chunk)
    PARTIAL = 2  # texts left half-done between chunks (each holds up to CTX cells)

    def __init__(self, device: Device) -> None:
        self.device = device
        self._ctx: llama_cpp.llama_context_p | None = None
        self._batch: Any = None
        self._free: list[int] = list(range(self.SEQS))  # sequences unused

    def close(self) -> None:
        """Free the context and its batch (before the model). Idempotent."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def job(self, texts: Sequence[str] | Sequence[Sequence[int]],
            normalize: bool = True) -> Embedding:
        """An embed request's state: texts (or token lists) cut to CTX tokens.

        Tokenizes (so call it off the event loop); the work is done by step().
        """
        dev = self.device
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise SyscallError("EINVAL", "embed takes a list of strings")
        toks: list[list[int]] = []
        cap = dev.text_bytes_for(self.CTX + 8)  # more of a text cannot count
        for t in texts:
            if isinstance(t, str):
                tk = dev.tokenize(t[:cap])
            elif isinstance(t, (list, tuple)):
                tk = list(t)
                if any(not isinstance(x, int) or isinstance(x, bool)
                       or not 0 <= x < dev.n_vocab for x in tk):
                    raise SyscallError("EINVAL", f"token ids must be in 0..{dev.n_vocab - 1}")
            else:
                raise SyscallError("EINVAL", "embed takes strings (or lists of token ids)")
            toks.append(tk[: self.CTX] or [dev.bos])
        return Embedding(toks, normalize, llama_cpp.llama_model_n_embd(dev.model))

    def runnable(self, job: Embedding) -> bool:
        """Can ``job`` make progress now? A job that starts a text may have to leave it
        half-done, and only PARTIAL texts may be (their cells are reserved)."""
        if job.done:
            return False
        return job.seq is not None or len(self._free) > self.SEQS - self.PARTIAL

    def step(self, job: Embedding, budget: int | None = None) -> int:
        """Decode the next chunk of ``job`` (at most CHUNK tokens); returns the
        number of tokens decoded (0: nothing runnable now, see runnable)."""
        return compute_thread.call(self._step, job, budget or self.CHUNK)

    def release(self, job: Embedding) -> None:
        """Forget ``job``'s half-done text, if any; it restarts that text when stepped
        again (how a parked embedder gives its cells back). Idempotent."""
        compute_thread.call(self._rewind, job)

    def embed(self, texts: Sequence[str], normalize: bool = True) -> list[list[float]]:
        """Mean-pooled embeddings, all at once (synchronous; the scheduler steps jobs
        itself). Texts longer than CTX tokens are truncated."""
        job = self.job(texts, normalize)
        try:
            while not job.done:
                if not self.step(job):
                    raise SyscallError("EBUSY", "every embedding sequence is in use")
        finally:
            self.release(job)
        return job.vectors

    def _rewind(self, job: Embedding) -> None:
        if job.seq is not None and self._ctx is not None:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx),
                                          job.seq, -1, -1)
            self._free.append(job.seq)
        job.seq = None
        job.pos = 0
        job.acc[:] = 0.0

    def _step(self, job: Embedding, budget: int) -> int:
        """On the compute thread: one decode of up to ``budget`` tokens of ``job``."""
        if not self.runnable(job):
            return 0
        ctx = self._context()
        mem = llama_cpp.llama_get_memory(ctx)
        b = self._batch
        budget = max(1, min(budget, self.CHUNK))
        spans: list[tuple[int, int, int, int]] = []  # (text, seq, first row, n)
        taken: list[int] = []
        i, pos, row = job.i, job.pos, 0
        while row < budget and i < len(job.tokens):
            if pos == 0:  # a new text needs a sequence of its own
                if not self._free:
                    break
                seq = self._free.pop()
                taken.append(seq)
                llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
            else:
                seq = job.seq
            toks = job.tokens[i]
            n = min(len(toks) - pos, budget - row)
            for j in range(n):
                b.token[row + j] = toks[pos + j]
                b.pos[row + j] = pos + j
                b.n_seq_id[row + j] = 1
                b.seq_id[row + j][0] = seq
                b.logits[row + j] = 1
            spans.append((i, seq, row, n))
            row += n
            pos += n
            if pos == len(toks):
                i, pos = i + 1, 0
        if row == 0:
            return 0
        b.n_tokens = row
        rc = llama_cpp.llama_decode(ctx, b)
        if rc != 0:  # give back what this chunk took; the text in hand starts over
            for seq in taken:
                llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
                self._free.append(seq)
            self._rewind(job)
            raise SyscallError("EIO", f"embedding decode failed with code {rc}")
        out = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(ctx), shape=(row, job.n_embd))
        for text, seq, first, n in spans:
            job.acc += out[first:first + n].sum(axis=0, dtype=np.float64)
            if text < i:  # the text is complete
                job.finish_text()
                llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
                self._free.append(seq)
                job.seq = None
            else:
                job.seq = seq
        job.i, job.pos = i, pos
        job.decoded += row
        return row

    def _context(self) -> llama_cpp.llama_context_p:
        if self._ctx is None:
            p = llama_cpp.llama_context_default_params()
            p.n_ctx = self.CTX * self.PARTIAL + self.CHUNK
            p.n_batch = p.n_ubatch = self.CHUNK
            p.n_seq_max = self.SEQS
            p.kv_unified = True
            p.embeddings = True
            p.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE  # we pool: see the module doc
            p.n_threads = p.n_threads_batch = self.device.n_threads
            p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            ctx = llama_cpp.llama_init_from_model(self.device.model, p)
            if not ctx:
                raise SyscallError("ENOMEM", "could not create the embedding context")
            self._ctx = ctx
            self._batch = llama_cpp.llama_batch_init(self.CHUNK, 0, 1)
        return self._ctx
