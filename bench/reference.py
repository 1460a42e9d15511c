"""The baseline the kernel is measured against: llama-cpp-python's own
high-level ``Llama`` on the packaged GGUF. Benchmarks import it from here, and
so do the tests that check the device's greedy output against it."""

from __future__ import annotations

from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as low

from llmagentos.drivers.llama import compute_thread, default_threads, model_params
from llmagentos.drivers.models import packaged_gemma_path


def reference_llama(n_ctx: int = 2048, n_threads: int | None = None, *, n_gpu_layers: int = 0,
                    path: str | None = None, flash_attn: bool = True) -> Any:
    """A ``Llama`` loaded as the Device loads its model (``model_params``: no AMX
    weight repack, which crashes this build), from ``path`` or the packaged GGUF;
    ``n_gpu_layers=-1`` offloads every layer. With flash attention, as the Device
    runs by default: the same llama.cpp kernels, so the same greedy text and a
    comparison of the kernel's own cost, not of two attention kernels.

    It is created on ``compute_thread``; run it there too (``compute_thread.call``),
    since a second OpenMP master thread slows every decode in the process.
    """
    n_threads = n_threads or default_threads()  # as many as the Device takes
    # Llama() takes its defaults from the low-level module; model_params reads the
    # package's own binding of the same function, which this leaves alone.
    original = low.llama_model_default_params
    low.llama_model_default_params = model_params
    try:
        return compute_thread.call(lambda: llama_cpp.Llama(
            str(path or packaged_gemma_path()), n_ctx=n_ctx, n_threads=n_threads,
            n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
            verbose=False))
    finally:
        low.llama_model_default_params = original
