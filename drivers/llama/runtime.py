"""What llama.cpp needs once per process: the backend, the compute thread, and
how models are loaded.

The compute thread: this llama.cpp is built with OpenMP. libgomp keeps a pool
of helper threads per thread that ever started a parallel region, and once it
manages more threads than there are CPUs it stops spinning at barriers, and
ggml puts an OpenMP barrier after every graph node: on this 2-core machine a
decode run from a second thread (say, a trio worker after the main thread
decoded once) took 35 ms instead of 22. So every ``llama_decode`` of every
Device goes through one thread, ``compute_thread``, whichever thread calls it.
Run other llama.cpp work (e.g. a reference ``Llama``) through its ``call()``
as well.

Model loading: this build of llama.cpp crashes (SIGSEGV in
ggml_backend_amx_mul_mat) when it repacks weights for the CPU's AMX units on
this machine, so models load with ``use_extra_bufts=False`` (``model_params``)
unless a caller asks for the extra buffers.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

import llama_cpp

_backend_lock = threading.Lock()
_backend_ready = False


class ComputeThread:
    """The one thread that runs llama.cpp graph computations in this process
    (see the module doc for why)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ident: int | None = None

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the compute thread and return its result (blocking)."""
        if threading.get_ident() == self._ident:
            return fn(*args)
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="llama-compute")
                self._ident = self._pool.submit(threading.get_ident).result()
            pool = self._pool
        return pool.submit(fn, *args).result()


compute_thread = ComputeThread()


def init_backend(verbose: bool) -> None:
    """Start llama.cpp's backend (once per process) and set how much it logs."""
    global _backend_ready
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def model_params(extra_buffers: bool = False) -> llama_cpp.llama_model_params:
    """llama.cpp's default model parameters, without the AMX weight repack unless
    ``extra_buffers`` (see the module doc)."""
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = extra_buffers
    return params
