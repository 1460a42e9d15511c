"""The llama.cpp sampler chain of one request.

One ``Sampler`` per request owns a llama.cpp sampler chain (penalties ->
top-k -> top-p -> min-p -> temperature -> dist, or greedy at temperature 0)
and, for constrained output, a separate grammar sampler (GBNF, or a JSON
schema converted to GBNF by llama-cpp-python's converter).

Why the grammar is not simply in the chain: llama.cpp's grammar sampler checks
every candidate against the grammar stacks, and Gemma 3's vocabulary has
262,144 tokens, so a grammar at the head of the chain costs tens of ms per
token. We sample the way llama.cpp's own ``common_sampler`` does: sample
without the grammar, check only the chosen token (one candidate); when the
grammar rejects it, apply the grammar to the top-M candidates by logit
(M >= 256, and >= 4*top_k), then to the top 16*M, and only if too few of
those survive, to the whole vocabulary. This is exact for greedy decoding
(the best valid token is in the first set with any valid token) and for
top-k sampling when at least top_k of a set survive; otherwise the full pass
keeps it exact.

What a grammar costs: llama.cpp checks each candidate against each of the
grammar's parse stacks, and a rule with N alternatives starts N stacks, so
one pass over the vocabulary costs candidates x stacks (measured here: 3.6 s
for 2,000 alternatives, 34 s for 20,000, while a decode takes ~20 ms). That
runs inside the device's tick, where every other sequence waits for it. So a
grammar is bounded before it is compiled (size and fan-out: drivers/gbnf.py),
and after compiling, its cost per candidate is timed on a probe of the
vocabulary: one whose full pass would take more than GRAMMAR_MAX_PASS_SECONDS
is refused (E2BIG), a net for what the estimate misses. What a grammar costs
within those bounds is charged to its request as device time (see
StepResult.sample_seconds and the scheduler).
"""

from __future__ import annotations

import ctypes
import math
import time
from typing import Any

import llama_cpp
import numpy as np

from llmagentos.drivers.gbnf import check_grammar
from llmagentos.drivers.sampling import SamplingParams
from llmagentos.syscalls.errno import SyscallError

_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
GRAMMAR_TOP_M = 256
GRAMMAR_WIDEN = 16              # the second set of candidates is this many times the first
GRAMMAR_PROBE = 512             # candidates the cost probe checks
GRAMMAR_MAX_PASS_SECONDS = 5.0  # the most one pass over the vocabulary may cost

class Sampler:
    """One request's sampler chain (and optional grammar). Not thread-safe; free with close()."""

    def __init__(
        self,
        vocab: llama_cpp.llama_vocab_p,
        n_vocab: int,
        params: SamplingParams,
        *,
        prompt_tail: list[int] = (),  # type: ignore[assignment]
        eog_token: int = -1,
    ) -> None:
        self.params = params
        self.n_vocab = n_vocab
        self._eog = eog_token
        self.chain = None
        self.grammar = None
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            raise SyscallError("ENOMEM", "llama_sampler_chain_init failed")
        self.chain = chain
        p = params
        penalized = p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
        if penalized:
            # This llama.cpp takes n_vocab first (see its llama.h); without it the call is a
            # TypeError, and a 4-argument call through a stale binding would shift every value.
            pen = llama_cpp.llama_sampler_init_penalties(
                n_vocab, p.repeat_last_n, p.repeat_penalty, p.frequency_penalty,
                p.presence_penalty,
            )
            # The penalty window covers the prompt's tail too, as llama.cpp's server does.
            for tok in list(prompt_tail)[-p.repeat_last_n:] if p.repeat_last_n else []:
                llama_cpp.llama_sampler_accept(pen, tok)
            llama_cpp.llama_sampler_chain_add(chain, pen)
        if p.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            seed = llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else p.seed
            stages = [llama_cpp.llama_sampler_init_top_k(p.top_k)] if p.top_k > 0 else []
            stages += [
                llama_cpp.llama_sampler_init_top_p(p.top_p, 1),
                llama_cpp.llama_sampler_init_min_p(p.min_p, 1),
                llama_cpp.llama_sampler_init_temp(p.temperature),
                llama_cpp.llama_sampler_init_dist(seed),
            ]
            for stage in stages:
                llama_cpp.llama_sampler_chain_add(chain, stage)
        self.grammar_fallbacks = 0  # how often the single-token check failed (for tuning)
        self.grammar_pass_seconds = 0.0  # the measured cost of one pass over the vocabulary
        try:
            text = p.grammar_text()
            if text is not None:
                check_grammar(text)
                grammar = llama_cpp.llama_sampler_init_grammar(
                    vocab, text.encode("utf-8"), b"root")
                if not grammar:
                    raise SyscallError(
                        "EINVAL", "grammar does not parse as GBNF (or has no 'root' rule)")
                self.grammar = grammar
                self._ids = np.arange(n_vocab, dtype=np.intc)
                self._probe_cost()
        except BaseException:
            self.close()
            raise
        # Greedy with no state to keep (no penalties, no grammar): the first largest
        # logit, by numpy's vectorised argmax, as llama.cpp's greedy sampler picks it
        # (ties included) but without first copying every logit into a candidate
        # array: ~0.8 ms a token with Gemma 3's 262,144, on one core while the
        # device's other threads wait.
        self.argmax = p.temperature <= 0 and not penalized and self.grammar is None

    def _probe_cost(self) -> None:
        """Refuse a grammar whose full pass over the vocabulary would hold the device
        longer than GRAMMAR_MAX_PASS_SECONDS (timed on a spread of GRAMMAR_PROBE ids)."""
        ids = np.linspace(0, self.n_vocab - 1, min(GRAMMAR_PROBE, self.n_vocab)).astype(np.intc)
        best = math.inf
        for _ in range(3):  # this thread's CPU time, the least of three: not the machine's load
            cand = np.zeros(len(ids), dtype=_TOKEN_DATA)
            cand["id"] = ids
            t0 = time.thread_time()
            self._apply(self.grammar, cand)
            best = min(best, time.thread_time() - t0)
        per_pass = best * self.n_vocab / len(ids)
        self.grammar_pass_seconds = per_pass
        if per_pass > GRAMMAR_MAX_PASS_SECONDS:
            raise SyscallError(
                "E2BIG", f"grammar too costly: one pass over the vocabulary would take "
                         f"~{per_pass:.1f} s, over the bound of {GRAMMAR_MAX_PASS_SECONDS} s "
                         "(GRAMMAR_MAX_PASS_SECONDS); use fewer alternatives at each point")

    def sample(self, ctx: llama_cpp.llama_context_p, idx: int) -> int:
        """Sample from output row ``idx`` of the last decode and accept the token."""
        if self.argmax:
            row = llama_cpp.llama_get_logits_ith(ctx, idx)
            return int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx, idx))
        row = llama_cpp.llama_get_logits_ith(ctx, idx)
        logits = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
        cand = np.empty(self.n_vocab, dtype=_TOKEN_DATA)
        cand["id"] = self._ids
        cand["logit"] = logits
        cand["p"] = 0.0
        tok = self._apply_chain(cand)
        if not self._allowed(tok):
            self.grammar_fallbacks += 1
            tok = self._constrained(logits)
        llama_cpp.llama_sampler_accept(self.chain, tok)
        llama_cpp.llama_sampler_accept(self.grammar, tok)
        return tok

    def _apply(self, smpl: Any, cand: np.ndarray) -> llama_cpp.llama_token_data_array:
        arr = llama_cpp.llama_token_data_array(
            data=cand.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(cand), selected=-1, sorted=False,
        )
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return arr

    def _apply_chain(self, cand: np.ndarray) -> int:
        arr = self._apply(self.chain, cand)
        return int(cand["id"][arr.selected])

    def _allowed(self, tok: int) -> bool:
        one = np.zeros(1, dtype=_TOKEN_DATA)
        one["id"][0] = tok
        self._apply(self.grammar, one)
        return bool(np.isfinite(one["logit"][0]))

    def _constrained(self, logits: np.ndarray) -> int:
        p = self.params
        need = 1 if p.temperature <= 0 or p.top_k <= 0 else p.top_k
        m = max(GRAMMAR_TOP_M, 4 * p.top_k)
        sets = [np.argpartition(-logits, k - 1)[:k] for k in (m, m * GRAMMAR_WIDEN)
                if k < self.n_vocab] + [self._ids]
        for ids in sets:
            cand = np.empty(len(ids), dtype=_TOKEN_DATA)
            cand["id"] = ids
            cand["logit"] = logits[ids]
            cand["p"] = 0.0
            self._apply(self.grammar, cand)
            ok = cand[np.isfinite(cand["logit"])]
            if len(ok) >= need or (ids is self._ids and len(ok) > 0):
                return self._apply_chain(np.ascontiguousarray(ok))
        # The grammar admits nothing at all: end the sequence rather than break it.
        return self._eog

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None

    def __del__(self) -> None:
        self.close()

